"""One run per output directory (or per shard of it) at a time.

Two runs appending to one manifest would pay twice for the same items, so a run holds
``OUT/.synthaug.lock`` for its whole life; a shard run (``--shard I/N``) holds
``OUT/.synthaug.shard-I-of-N.lock`` instead, so that the other shards of the same N run
beside it, and refuses to start while a run that overlaps it holds its own lock (a run
of all items, or a shard of another N: `overlapping_holders`). The lock is an
`fcntl.flock` on that file: the kernel drops it when its process dies, even by SIGKILL,
so a stale lock never blocks the next run. The file also records who holds it (pid,
host, start time) for the error message. Where a filesystem cannot `flock` (some network
mounts), the recorded pid is the lock instead: it is taken over when that process is
gone.

`flock` is POSIX, like the signal handling and folder fsyncs a run relies on: on any other
platform (Windows) `check_platform` refuses with one line pointing to WSL, at the CLI's
start and again where the lock is taken, instead of a traceback. Importing this module
works everywhere, so `import pipeline...` never fails on its own.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import OutputError, UsageError
from .layout import LOCK_NAME

try:
    import fcntl
except ImportError:  # not POSIX: `check_platform` refuses before fcntl is ever used
    _HAVE_FLOCK = False
else:
    _HAVE_FLOCK = True

__all__ = [
    "LOCK_NAME",
    "UNSUPPORTED_PLATFORM",
    "RunLock",
    "acquire_lock",
    "check_platform",
    "overlapping_holders",
]

UNSUPPORTED_PLATFORM = (
    "this platform ({platform}) is not supported: synthaug runs on Linux and macOS (POSIX); "
    "on Windows, run it inside WSL (https://learn.microsoft.com/windows/wsl/)"
)

# A holder that releases between our open() and flock() leaves us an unlinked file;
# retry a few times on the path's new file rather than give up.
_MAX_TRIES = 5
_FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})

log = logging.getLogger(__name__)


class RunLock:
    """The held lock on one OUT; release it (or leave the `with` block) when the run ends."""

    def __init__(self, path: Path, fd: int, *, flocked: bool) -> None:
        self._path = path
        self._fd: int | None = fd
        self._flocked = flocked

    @property
    def path(self) -> Path:
        """The lock file."""
        return self._path

    @property
    def held(self) -> bool:
        """True until `release` is called."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self._path):
                self._path.unlink(missing_ok=True)  # while still locked: no window for a thief
        finally:
            if self._flocked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_platform() -> None:
    """Raise `UsageError` (exit 2) on a platform without POSIX locks, signals and fsyncs."""
    if os.name != "posix" or not _HAVE_FLOCK:
        raise UsageError(UNSUPPORTED_PLATFORM.format(platform=sys.platform))


def acquire_lock(
    out_dir: Path,
    *,
    name: str = LOCK_NAME,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> RunLock:
    """Lock `out_dir` (its lock file `name`: a shard's own) for this process, or raise
    `OutputError` naming the live holder.

    Raises `UsageError` on a platform synthaug does not support (see `check_platform`).
    """
    check_platform()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    started = now()
    for _ in range(_MAX_TRIES):
        lock = _try_lock(out_dir, path, started)
        if lock is not None:
            return lock
    raise OutputError(f"could not lock {path}: another run keeps replacing it; try again")


def overlapping_holders(out_dir: Path, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The lock files among `names` in `out_dir` that a live process holds, with their
    holders' records: probed with a non-blocking flock, released at once (a file no one
    holds is left in place)."""
    held = []
    for name in names:
        try:
            fd = os.open(out_dir / name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            flocked = _flock(fd)
            holder = _read_holder(fd)
            if flocked is False or (flocked is None and _live_holder(holder)):
                held.append((name, holder))
        finally:
            os.close(fd)  # drops our probe's flock
    return held


def _live_holder(holder: dict[str, Any]) -> bool:
    """Without flock: whether the recorded holder is a live process (on another host: yes)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    return holder.get("host") != socket.gethostname() or _pid_alive(pid)


def _try_lock(out_dir: Path, path: Path, started: datetime) -> RunLock | None:
    """One attempt: the lock, None when the file changed under us, or raise if held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        flocked = _flock(fd)
        if flocked is False:
            raise _in_use(out_dir, _read_holder(fd))
        if flocked is None:
            _check_pid_holder(out_dir, path, _read_holder(fd))
        if not _same_file(fd, path):
            os.close(fd)  # the previous holder removed it as we opened it: try the new one
            return None
        stale = _read_holder(fd)
        if stale:
            log.info("taking over a stale lock on %s left by pid %s", out_dir, stale.get("pid"))
        _write_holder(fd, started)
    except BaseException:
        os.close(fd)  # closing also drops the flock
        raise
    return RunLock(path, fd, flocked=bool(flocked))


def _flock(fd: int) -> bool | None:
    """True when locked, False when another process holds it, None when unsupported here."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _FLOCK_UNSUPPORTED:
            return None
        raise
    return True


def _check_pid_holder(out_dir: Path, path: Path, holder: dict[str, Any]) -> None:
    """Without flock, a recorded holder blocks us unless it is a dead process on this host."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return
    if holder.get("host") != socket.gethostname():
        raise _in_use(out_dir, holder, hint=f"; if that run is gone, delete {path}")
    if _pid_alive(pid):
        raise _in_use(out_dir, holder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _in_use(out_dir: Path, holder: dict[str, Any], *, hint: str = "") -> OutputError:
    if holder:
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {holder.get('started_at', '?')}"
        )
    else:
        who = "holder still starting"
    return OutputError(
        f"{out_dir} is in use by another synthaug run ({who}): wait for it or stop it{hint}"
    )


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder's record, or {} when empty or unreadable (a holder mid-write)."""
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_holder(fd: int, started: datetime) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": started.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
