"""Windows (no fcntl) is refused with one line pointing to WSL, never with a traceback.

Each test runs a fresh interpreter with ``fcntl`` made unimportable, as it is on Windows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WITHOUT_FCNTL = "import sys; sys.modules['fcntl'] = None\n"


def python_without_fcntl(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new interpreter where ``import fcntl`` raises ImportError."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_FCNTL + code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_cli_refuses_with_one_line_and_exit_2(tmp_path: Path) -> None:
    """`synthaug run` without POSIX prints one line naming WSL and exits 2, no traceback."""
    (tmp_path / "spec.yaml").write_text(
        "version: 1\nname: job\nbackend: {kind: mock}\nsources: [{name: a, prompt: a cat}]\n"
    )
    done = python_without_fcntl(
        "from pipeline.cli import main\nmain(['run', 'spec.yaml', '--no-progress'])", tmp_path
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("synthaug: error: ")
    assert "Linux and macOS" in lines[0]
    assert "WSL" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before any output folder was made


def test_package_imports_and_library_lock_refuses(tmp_path: Path) -> None:
    """Every module imports without fcntl; taking the lock raises UsageError, not ImportError."""
    code = (
        "import pkgutil, importlib, pipeline\n"
        "for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.'):\n"
        "    if m.name != 'pipeline.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "from pathlib import Path\n"
        "from pipeline.errors import UsageError\n"
        "from pipeline.store.lock import acquire_lock\n"
        "try:\n"
        "    acquire_lock(Path('out'))\n"
        "except UsageError as exc:\n"
        "    print('refused:', exc, 'exit', exc.exit_code)\n"
    )
    done = python_without_fcntl(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: ")
    assert "WSL" in done.stdout
    assert done.stdout.strip().endswith("exit 2")
    assert not (tmp_path / "out").exists()
