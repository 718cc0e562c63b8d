"""The documentation stays true to the code: links resolve, the spec reference names
every key of the spec model, the CLI page every exit code, and nothing points outside
the repository."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pipeline import errors
from pipeline.jobspec.model import Spec

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["README.md", "spec.md", "outputs.md", "keys-and-resume.md", "cli.md", "faults.md"]

# [text](target) links, outside code; a target is relative unless it has a scheme or
# starts with '#' (an anchor in the same page) or '/'.
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
_PARENT_PATH = re.compile(r"(?:\.\./)+[^\s)`'\"]*")


def markdown_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def relative_links(path: Path) -> Iterator[str]:
    """The relative link and image targets of a Markdown file, outside fenced code."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    for pattern in (_LINK, _IMAGE):
        for match in pattern.finditer(text):
            target = match.group(1)
            if not _SCHEME.match(target) and not target.startswith(("#", "/")):
                yield target


def inside_repo(path: Path) -> bool:
    """True when `path` resolves to somewhere under the repository root."""
    return path.resolve().is_relative_to(ROOT)


def test_docs_pages_exist_and_are_indexed() -> None:
    """docs/README.md links every documentation page."""
    index = DOCS / "README.md"
    linked = {target.split("#")[0] for target in relative_links(index)}
    for page in PAGES[1:]:
        assert (DOCS / page).is_file(), f"docs/{page} is missing"
        assert page in linked, f"docs/README.md does not link {page}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link in README.md and docs/*.md points to an existing file in the repo."""
    for target in relative_links(path):
        resolved = path.parent / target.split("#")[0]
        assert inside_repo(resolved), f"{path.name}: link {target} leaves the repository"
        assert resolved.exists(), f"{path.name}: link {target} points to nothing"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_path_outside_the_repo(path: Path) -> None:
    """README and docs name no path outside the repository (no /work/, no ../ escaping it)."""
    text = path.read_text(encoding="utf-8")
    assert "/work/" not in text, f"{path.name} names a machine path under /work/"
    for found in _PARENT_PATH.findall(text):
        assert inside_repo(path.parent / found), f"{path.name}: {found} leaves the repository"


def schema_keys(node: Any, defs: Mapping[str, Any], path: str = "") -> Iterator[str]:
    """Every property key of a JSON schema, nested ones too, as dotted paths."""
    if isinstance(node, Mapping):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield from schema_keys(defs[ref.rsplit("/", 1)[-1]], defs, path)
        for key, sub in (node.get("properties") or {}).items():
            dotted = f"{path}.{key}" if path else key
            yield dotted
            yield from schema_keys(sub, defs, dotted)
        for combinator in ("anyOf", "allOf", "oneOf"):
            for sub in node.get(combinator) or ():
                yield from schema_keys(sub, defs, path)
        if "items" in node:
            yield from schema_keys(node["items"], defs, f"{path}[]")


def test_spec_reference_names_every_key() -> None:
    """docs/spec.md mentions every top-level and nested key of the job spec model."""
    schema = Spec.model_json_schema()
    keys = sorted(set(schema_keys(schema, schema.get("$defs", {}))))
    assert "sources[].images" in keys  # the walk reaches nested keys
    text = (DOCS / "spec.md").read_text(encoding="utf-8")
    # documented = a table row that starts with the key, as each section's table does
    rows = set(re.findall(r"^\| `([A-Za-z_]+)` \|", text, re.M))
    missing = [k for k in keys if k.rsplit(".", 1)[-1] not in rows]
    assert not missing, f"docs/spec.md has no table row for: {', '.join(missing)}"


def test_cli_page_lists_every_exit_code() -> None:
    """docs/cli.md names every exit code constant of pipeline/errors.py."""
    codes = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert len(codes) >= 7
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for name, value in codes.items():
        assert f"`{value}`" in text, f"docs/cli.md does not list exit code {value} ({name})"
