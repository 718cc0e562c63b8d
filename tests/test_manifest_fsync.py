"""The manifest's periodic fsync runs on the writer's own thread, never in `append`
(which the engine calls on the event loop); `sync` and `close` stay synchronous and
durable; sync hooks still run before each fsync of the manifest."""

from __future__ import annotations

import threading
from pathlib import Path

from checks import bare_record

from pipeline.manifest.writer import ManifestWriter
from pipeline.records import ItemRecord

KEY = "a" * 64
WAIT_S = 30.0  # a bound against hanging, not a timing assertion


class Clock:
    """A clock the test moves: the interval elapses when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Disk:
    """Records what each fsync covered and on which thread; `hold` makes the next
    fsync wait until `release` (a slow disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[str] = []
        self.threads: list[str] = []
        self.entered = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()

    def hold(self) -> None:
        self._gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self._gate.set()

    def hook(self) -> None:
        with self._lock:
            self.events.append("hook")

    def fsync(self, _fd: int) -> None:
        self.entered.set()
        assert self._gate.wait(WAIT_S)
        lines = len(self.path.read_bytes().splitlines())
        with self._lock:
            self.events.append(f"fsync {lines}")
            self.threads.append(threading.current_thread().name)

    def fsyncs(self) -> list[str]:
        with self._lock:
            return [event for event in self.events if event.startswith("fsync")]


def line(i: int) -> ItemRecord:
    return bare_record(KEY, attempts=i)


def test_the_periodic_fsync_runs_on_the_writers_thread_not_in_append(tmp_path: Path) -> None:
    """append returns while the interval's fsync is still under way (held on a slow disk),
    every line is with the OS at once, and the fsync ran on another thread."""
    path = tmp_path / "manifest.jsonl"
    clock, disk = Clock(), Disk(path)
    with ManifestWriter(path, fsync_interval_s=0.5, clock=clock, fsync=disk.fsync) as writer:
        writer.add_sync_hook(disk.hook)
        writer.append(line(0))
        assert disk.fsyncs() == []  # the interval has not elapsed
        disk.hold()
        clock.now = 1.0
        writer.append(line(1))  # the interval elapsed: an fsync is asked for, not made here
        assert disk.entered.wait(WAIT_S)
        writer.append(line(2))  # the fsync is still held: append does not wait for it
        assert len(path.read_bytes().splitlines()) == 3
        assert disk.fsyncs() == []
        disk.release()
    assert disk.threads[0] != threading.current_thread().name
    assert disk.threads[0].startswith("fsync ")
    assert disk.events[0] == "hook"  # the hooks ran before the manifest's first fsync
    assert disk.fsyncs()[-1] == "fsync 3"  # close: every line durable


def test_sync_is_synchronous_and_waits_for_a_background_fsync(tmp_path: Path) -> None:
    """sync() made during a background fsync returns only once its own fsync covered
    every line appended before it, the hooks having run first."""
    path = tmp_path / "manifest.jsonl"
    clock, disk = Clock(), Disk(path)
    with ManifestWriter(path, fsync_interval_s=0.5, clock=clock, fsync=disk.fsync) as writer:
        writer.add_sync_hook(disk.hook)
        disk.hold()
        clock.now = 1.0
        writer.append(line(0))
        assert disk.entered.wait(WAIT_S)
        writer.append(line(1))  # after the background fsync began
        disk.release()
        writer.sync()  # waits for the background fsync, then makes its own
        assert disk.fsyncs()[-1] == "fsync 2"
        assert disk.threads[-1] == threading.current_thread().name
        assert disk.events[-2:] == ["hook", "fsync 2"]


def test_close_fsyncs_a_line_written_during_a_background_fsync(tmp_path: Path) -> None:
    """A line appended while the background fsync runs is not taken as synced by it:
    close fsyncs again."""
    path = tmp_path / "manifest.jsonl"
    clock, disk = Clock(), Disk(path)
    writer = ManifestWriter(path, fsync_interval_s=0.5, clock=clock, fsync=disk.fsync)
    disk.hold()
    clock.now = 1.0
    writer.append(line(0))
    assert disk.entered.wait(WAIT_S)
    writer.append(line(1))
    disk.release()
    writer.close()
    writer.close()
    fsyncs = disk.fsyncs()
    assert fsyncs[-1] == "fsync 2"
    assert len(fsyncs) == 2  # the background one, then close's own


def test_an_interval_of_zero_fsyncs_each_line_before_append_returns(tmp_path: Path) -> None:
    """fsync_interval_s=0 asks for every line to be durable: on the appending thread."""
    path = tmp_path / "manifest.jsonl"
    disk = Disk(path)
    with ManifestWriter(path, fsync_interval_s=0.0, fsync=disk.fsync) as writer:
        writer.append(line(0))
        assert disk.fsyncs() == ["fsync 1"]
        writer.append(line(1))
        assert disk.fsyncs() == ["fsync 1", "fsync 2"]
    assert set(disk.threads) == {threading.current_thread().name}
