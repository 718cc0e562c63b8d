"""The import layers of ../shared/STYLE.md hold: imports only go down.

Adjusted where the code taught us: `template` and `sources` sit below `spec`, because
the spec validates its templates and files at load time (so bad input fails before
anything is sent).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

LAYERS: dict[str, int] = {
    "errors": 0,
    "_version": 0,
    "records": 1,
    "template": 2,
    "sources": 2,
    "image_check": 2,  # pure checks of image bytes, below outputs, which stores them
    "specfile": 2,  # below spec, which uses it to read the file and word its errors
    "registry": 2,  # the backend kinds; names each kind's class, imports it only to open it
    "models": 2,  # the image-model catalogue: spec checks params against it, pricing prices it
    "spec": 3,
    "credentials": 4,
    "pricing": 4,
    "pace": 4,  # the adaptive rate (pure arithmetic on time), below the limiter that paces by it
    # independent mechanisms: none imports another (backends/* may import backends/base)
    "limiter": 5,
    "retry": 5,
    "outputs": 5,
    "lock": 5,
    "manifest": 5,
    "backends": 5,
    "budget": 5,
    "items": 6,
    "snapshot": 6,  # a cache of what manifest reads
    "freshness": 6,  # the resume check: manifest's recorded stats against outputs' files
    "engine": 7,
    "runner": 8,
    "plan": 10,
    "report": 10,
    "sheet_text": 8,  # below grid and gallery, which both use it
    "grid_model": 9,  # between sheet_text (path_inside) and grid, which draws it
    "grid": 10,
    "gallery": 10,
    "api": 11,  # the Python API: plan, run, status for library callers
    "cli": 12,
    "__main__": 13,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def top(name: str) -> str:
    return name.split(".")[0]


def pipeline_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipeline":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("pipeline."):
                found.add(node.module.removeprefix("pipeline."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline."):
                    found.add(alias.name.removeprefix("pipeline."))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_only_go_down(path: Path) -> None:
    """A module imports only modules of lower layers (nothing imports the CLI)."""
    me = module_name(path)
    my_layer = LAYERS[top(me)]
    for imported in pipeline_imports(path):
        if imported == "__version__":
            continue
        other = LAYERS[top(imported)]
        if top(me) == "backends" and top(imported) == "backends":
            # a backend may use base, and a helper module named after it (mock -> mock_image)
            allowed = imported == "backends.base" or imported.startswith(f"{me}_")
            # the mock kind is the Roboflow client against the embedded server
            allowed |= me == "backends.embedded" and imported in ("backends.mock", "backends.roboflow")
            assert allowed or me == "backends.base", (me, imported)
            continue
        assert other < my_layer, f"{me} (layer {my_layer}) imports {imported} (layer {other})"


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in a layer before it lands."""
    assert {top(module_name(p)) for p in MODULES} <= set(LAYERS)
