"""The resume check's stat pass: is each recorded image file still in place with the
size and mtime its manifest line recorded?

A finished job of a million images asks that a million times on every resume. Here it
is one C-level pipeline (`os.stat` through OUT's descriptor, compared with the recorded
stat, regular files only), with a Python step only where a file is missing: about 2 us a
file, most of it the system call.

Only the standard library, on purpose: this file also runs as a child process
(``python -I -S statpass.py OUT``, see `pipeline.manifest.freshness.StatPass`), so that
the pass runs on a second core while the parent expands the job's keys. The parent
writes chunks of recorded files on the child's stdin (an 8-byte length, then a marshal
of ``(paths, stats)``) and closes it; the child answers on stdout with a marshal of the
indexes that differ, counted over all chunks.
"""

from __future__ import annotations

import marshal
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from functools import partial
from itertools import compress, count, tee
from operator import attrgetter, length_hint, ne, or_
from stat import S_ISREG
from typing import IO

__all__ = ["DIR_FLAGS", "STAT_DIR_FD", "differing", "loads_indexes", "main", "write_chunk"]

DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
STAT_DIR_FD = os.stat in os.supports_dir_fd  # stat relative to OUT's descriptor
_STAT_KEY = attrgetter("st_size", "st_mtime_ns")
_LENGTH = 8  # bytes of a chunk's length prefix

Stat = tuple[int, int]


def differing(
    stat: Callable[[str], os.stat_result],
    paths: Sequence[str],
    stats: Sequence[Stat | None],
) -> list[int]:
    """Indexes of `paths` whose `stat` fails, is not a regular file's, or has another
    (size, mtime_ns) than the one at the same index of `stats`.

    A failing stat stops the C-level pass with an exception: its index is noted and the
    pass goes on after it.
    """
    names = iter(paths)
    recorded = iter(stats)
    found: list[int] = []
    start = 0
    while True:
        results, modes = tee(map(stat, names))
        differs = map(or_, map(ne, map(_STAT_KEY, results), recorded), map(_not_regular, modes))
        try:
            found.extend(compress(count(start), differs))
            return found
        except (OSError, ValueError):  # gone, unreadable, or a name with a NUL byte
            position = len(paths) - length_hint(names) - 1
            found.append(position)
            next(recorded, None)  # its recorded stat was not taken yet
            start = position + 1


def _not_regular(info: os.stat_result) -> bool:
    return not S_ISREG(info.st_mode)


def write_chunk(stream: IO[bytes], paths: list[str], stats: list[Stat | None]) -> None:
    """Send one chunk of recorded files to a child."""
    payload = marshal.dumps((paths, stats))
    stream.write(len(payload).to_bytes(_LENGTH, "little") + payload)


def loads_indexes(data: bytes) -> list[int]:
    """The child's answer: a list of indexes; `ValueError` when it is anything else."""
    try:
        found = marshal.loads(data)
    except (EOFError, TypeError) as exc:
        raise ValueError(f"not a marshal: {exc}") from exc
    if not isinstance(found, list) or not all(isinstance(i, int) for i in found):
        raise ValueError("not a list of indexes")
    return found


def main(argv: Sequence[str]) -> int:
    """The child: stat the chunks read on stdin relative to OUT (``argv[1]``) and write
    the differing indexes on stdout. A thread reads the chunks as they come, so that the
    parent is never held up waiting for the pipe (a pipe holds only 64 kB)."""
    fd = os.open(argv[1], DIR_FLAGS)
    stat = partial(os.stat, dir_fd=fd, follow_symlinks=False)
    chunks: queue.SimpleQueue[tuple[list[str], list[Stat | None]] | None] = queue.SimpleQueue()
    threading.Thread(target=_read_chunks, args=(sys.stdin.buffer, chunks), daemon=True).start()
    found: list[int] = []
    base = 0
    while (chunk := chunks.get()) is not None:
        paths, stats = chunk
        found.extend(base + index for index in differing(stat, paths, stats))
        base += len(paths)
    sys.stdout.buffer.write(marshal.dumps(found))
    sys.stdout.buffer.flush()
    return 0


def _read_chunks(
    stream: IO[bytes], chunks: queue.SimpleQueue[tuple[list[str], list[Stat | None]] | None]
) -> None:
    """Queue each chunk `write_chunk` sent, then None at the end of `stream`."""
    try:
        while header := stream.read(_LENGTH):
            chunks.put(marshal.loads(stream.read(int.from_bytes(header, "little"))))
    finally:
        chunks.put(None)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
