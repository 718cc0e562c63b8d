"""One synthaug run per output directory: the OUT lock."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline.errors import OutputError
from pipeline.store.lock import LOCK_NAME, acquire_lock

# Holds the lock on argv[1] until its stdin closes (or it is killed).
HOLDER = """
import sys
from pathlib import Path
from pipeline.store.lock import acquire_lock
with acquire_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock on tmp_path/out, ready when the fixture returns."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "out")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:  # leaving the block closes the pipes and reaps the process
        assert proc.stdout is not None
        assert proc.stdout.readline() == "locked\n"
        yield proc
        if proc.poll() is None:
            proc.kill()


def _dead_pid() -> int:
    """A pid no process can have: one above the kernel's maximum."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def _write_lock_file(out_dir: Path, pid: int, host: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host, "started_at": "2024-01-01T00:00:00Z"}
    (out_dir / LOCK_NAME).write_text(json.dumps(record))


def test_lock_records_holder_and_is_removed_on_release(tmp_path: Path) -> None:
    """The lock file names this run (pid, host, start) and disappears when the run ends."""
    started = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    with acquire_lock(tmp_path / "out", now=lambda: started) as lock:
        record = json.loads(lock.path.read_text())
        assert record == {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": "2025-03-01T12:00:00Z",
        }
        assert lock.held
    assert not lock.held
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_release_twice_is_harmless(tmp_path: Path) -> None:
    """Releasing an already released lock does nothing."""
    lock = acquire_lock(tmp_path)
    lock.release()
    lock.release()
    assert not lock.held


def test_second_acquire_in_same_process_is_refused(tmp_path: Path) -> None:
    """Two runs on one OUT are refused even inside one process."""
    with acquire_lock(tmp_path), pytest.raises(OutputError, match="in use"):
        acquire_lock(tmp_path)


@pytest.mark.slow
def test_second_run_is_refused_while_another_process_holds(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    """A second run on a busy OUT is told who holds it and what to do."""
    with pytest.raises(OutputError) as caught:
        acquire_lock(tmp_path / "out")
    message = str(caught.value)
    assert f"in use by another synthaug run (pid {holder.pid} on {socket.gethostname()}" in message
    assert message.endswith("wait for it or stop it")


@pytest.mark.slow
def test_lock_is_free_after_holder_finishes(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    """Once the other run ends normally, the next run gets the lock."""
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait() == 0
    with acquire_lock(tmp_path / "out") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_lock_of_a_killed_holder_is_taken_over(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    """A run killed with SIGKILL leaves a lock file that the next run takes over."""
    holder.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    assert (tmp_path / "out" / LOCK_NAME).exists()
    with acquire_lock(tmp_path / "out") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_stale_lock_file_of_dead_pid_is_taken_over(tmp_path: Path) -> None:
    """A leftover lock file naming a process that is gone does not block the next run."""
    _write_lock_file(tmp_path, _dead_pid(), socket.gethostname())
    with acquire_lock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem where flock is unsupported (some network mounts)."""

    def unsupported(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)


@pytest.mark.usefixtures("no_flock")
def test_without_flock_dead_pid_lock_is_taken_over(tmp_path: Path) -> None:
    """Without flock, a lock file naming a dead process on this host is taken over."""
    _write_lock_file(tmp_path, _dead_pid(), socket.gethostname())
    with acquire_lock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()


@pytest.mark.usefixtures("no_flock")
def test_without_flock_live_pid_lock_is_refused(tmp_path: Path) -> None:
    """Without flock, a lock file naming a live process on this host still blocks."""
    _write_lock_file(tmp_path, os.getppid(), socket.gethostname())
    with pytest.raises(OutputError, match=f"pid {os.getppid()} on "):
        acquire_lock(tmp_path)


@pytest.mark.usefixtures("no_flock")
def test_without_flock_other_host_lock_is_refused_with_fix(tmp_path: Path) -> None:
    """Without flock, a lock held from another host blocks and says how to clear it."""
    _write_lock_file(tmp_path, 1234, "other-host")
    with pytest.raises(OutputError, match=f"if that run is gone, delete .*{LOCK_NAME}"):
        acquire_lock(tmp_path)
