"""The import layers hold: every module imports only modules of lower layers.

The map is stated once, in the README's "Architecture" table; this test reads it, so the
README, this test and the package tree cannot disagree: a module missing from the table,
or a module the table names that does not exist, fails here too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"


def readme_layers() -> dict[str, int]:
    """module -> layer, from the README's Architecture table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for row in re.finditer(r"^\| (\d+) \| ([^|]+) \|", section, re.M):
        for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)`", row.group(2)):
            layers[name] = int(row.group(1))
    return layers


LAYERS = readme_layers()


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def is_module(name: str) -> bool:
    return (PACKAGE / (name.replace(".", "/") + ".py")).exists()


def pipeline_imports(path: Path) -> set[str]:
    """The package modules `path` imports (relative or absolute), as dotted names."""
    package = module_name(path).split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == "pipeline":
                base = []
            else:
                continue
            module = [*base, *(node.module.split(".") if node.module else [])]
            if not node.level:
                module = module[1:]  # drop "pipeline"
            for alias in node.names:
                candidate = ".".join([*module, alias.name])
                found.add(candidate if is_module(candidate) else ".".join(module))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline."):
                    found.add(alias.name.removeprefix("pipeline."))
    return {name for name in found if name not in ("", "__version__")}


MODULES = sorted(PACKAGE.rglob("*.py"))
PLAIN = [p for p in MODULES if p.name != "__init__.py"]
INITS = [p for p in MODULES if p.name == "__init__.py"]


@pytest.mark.parametrize("path", PLAIN, ids=module_name)
def test_imports_only_go_down(path: Path) -> None:
    """A module imports only modules of lower layers (nothing imports the CLI)."""
    me = module_name(path)
    for imported in pipeline_imports(path):
        assert imported in LAYERS, f"{me} imports {imported}, which the map does not place"
        assert LAYERS[imported] < LAYERS[me], (
            f"{me} (layer {LAYERS[me]}) imports {imported} (layer {LAYERS[imported]})"
        )


@pytest.mark.parametrize("path", INITS, ids=module_name)
def test_package_inits_import_only_their_own_modules(path: Path) -> None:
    """A package's __init__ re-exports its own modules and nothing else."""
    package = module_name(path).removesuffix("__init__").rstrip(".")
    for imported in pipeline_imports(path):
        if package:
            assert imported.startswith(f"{package}."), (package, imported)
        else:
            assert imported == "_version", imported


def test_the_map_and_the_tree_name_the_same_modules() -> None:
    """Every module has a layer in the README's map, and every mapped module exists."""
    assert {module_name(p) for p in PLAIN} == set(LAYERS)
