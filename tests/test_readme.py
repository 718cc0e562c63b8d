"""The README's CLI reference is generated from --help, so it cannot drift.

Regenerate with:  python tests/test_readme.py --write
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- CLI-REFERENCE -->", "<!-- /CLI-REFERENCE -->"
COMMANDS = ["run", "plan", "status", "grid", "mock-server", "schema"]


def help_text(args: list[str]) -> str:
    from pipeline.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([*args, "--help"])
    return out.getvalue().rstrip()


def cli_reference() -> str:
    parts = [BEGIN, "## CLI reference", "", "```text", "$ synthaug --help", help_text([]), "```"]
    for command in COMMANDS:
        parts += ["", "```text", f"$ synthaug {command} --help", help_text([command]), "```"]
    parts.append(END)
    return "\n".join(parts)


def current_block(text: str) -> str | None:
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, re.S)
    return match.group(0) if match else None


def words(text: str | None) -> list[str]:
    """The text's words: argparse's column layout differs between Python versions."""
    return (text or "").split()


def test_readme_cli_reference_matches_help(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reference in the README says what --help prints (word for word)."""
    monkeypatch.setenv("COLUMNS", "100")
    assert words(current_block(README.read_text())) == words(cli_reference()), (
        "README CLI reference is stale: run `python tests/test_readme.py --write`"
    )


if __name__ == "__main__" and "--write" in sys.argv:
    import os

    os.environ["COLUMNS"] = "100"
    text = README.read_text()
    block = current_block(text)
    new = text.replace(block, cli_reference()) if block else text.replace(BEGIN, cli_reference())
    README.write_text(new)
    print("README CLI reference updated")
