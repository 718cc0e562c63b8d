"""OUT on object storage: a run works in a local staging folder that the bucket mirrors.

Object stores neither append, rename nor lock as a disk does, and pods have no disk for a
job's images. So a run whose ``output_dir`` is a URL (``s3://bucket/prefix``) works in a
staging folder (`pipeline.jobspec.fields.staging_folder`) exactly as on a local OUT, and
`Mirror` keeps the bucket (`pipeline.store.objects.ObjectOut`) in step:

* **Before** the run: its lock is taken in the bucket (a conditional write with a
  heartbeat; a dead holder's goes stale). Every manifest stream of the bucket is read
  into the staging folder's manifest files: a local tail that never reached the bucket
  (this machine's last run was killed between two pushes) is pushed first, so nothing
  it paid for is lost. The small files (job.json, the summaries, search.json,
  balance.json, the inputs' hashes) come down. The bucket's images are listed, and the
  resume check takes that listing for the images: none is downloaded, except those a
  stage after storage still has to read (`fetch`).
* **During** the run, every `PUSH_EVERY_S`: the manifest lines appended since the last
  push go up as a new segment object, after the images they name (each written once, by
  its key's name): a line is in the bucket only once its images are.
* **After** it: a last push, the small files, the lock released.

A kill at any moment loses at most the lines of one push interval, whose items the next
run makes again: as locally, what is paid twice is bounded by what was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import OutputError, UsageError
from ..jobspec.fields import staging_folder
from ..jobspec.model import Spec
from ..manifest.folded import merge as fold_manifests
from ..records import ItemRecord
from ..shard import Shard
from ..shared_pace import PaceNote, note_name, read_notes
from ..store import layout
from ..store.objects import ObjectLock, ObjectOut, parse_object_url
from .pool import RunStop

__all__ = [
    "PUSH_EVERY_S",
    "Mirror",
    "ObjectPaceBoard",
    "local_copy",
    "merge_remote",
    "mirrored",
    "pulled_copy",
]

log = logging.getLogger("pipeline.runner")

PUSH_EVERY_S = 1.0
"""How often the new manifest lines go up: what a kill can lose (made again next run)."""
HEARTBEAT_S = 10.0
"""How often the run's lock in the bucket says the run is alive."""
STALE_LOCK_S = 60.0
"""A lock whose heartbeat is older than this was left by a run that died: taken over."""


def open_object_out(url: str) -> ObjectOut:
    """The bucket side of the OUT at `url` (the s3 extra imported now)."""
    location = parse_object_url(url)
    if location is None:
        raise UsageError(f"{url} is not on object storage")
    return ObjectOut(location)


def lock_name(shard: Shard | None) -> str:
    """A run's lock in the bucket: its lock file's name on a disk, without the dot."""
    return layout.lock_name(shard).lstrip(".")


def small_files(shard: Shard | None) -> tuple[str, ...]:
    """The small files a run reads and rewrites whole (fetched before, sent after)."""
    return (
        layout.JOB_NAME,
        layout.summary_name(shard),
        layout.SEARCH_NAME,
        layout.BALANCE_NAME,
        layout.INPUT_HASHES_NAME,
    )


class Mirror:
    """One run's staging folder and its bucket; see the module docstring."""

    def __init__(self, bucket: ObjectOut, staging: Path, shard: Shard | None) -> None:
        self._bucket = bucket
        self._staging = staging
        self._shard = shard
        self._stream = layout.manifest_name(shard)
        self._pushed = 0  # bytes of the local stream the bucket holds
        self._listing: dict[str, int] = {}
        self._lock: ObjectLock | None = None
        self._sent: dict[str, int] = {}  # small file -> the mtime it was sent at

    @property
    def listing(self) -> dict[str, int]:
        """The images the bucket holds, by path in OUT, with their sizes."""
        return self._listing

    # --- before ------------------------------------------------------------------------

    def pull(self) -> None:
        """Take the lock, bring the manifests and small files down, list the images."""
        self._staging.mkdir(parents=True, exist_ok=True)
        holder = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = self._bucket.acquire_lock(
            lock_name(self._shard), holder=holder, stale_after_s=STALE_LOCK_S
        )
        try:
            self._refuse_overlap()
            self._listing = dict(self._bucket.list_files(layout.IMAGES_DIR + "/"))
            remote = set(self._bucket.streams())
            self._pull_own_stream()
            for stream in remote - {self._stream}:
                layout.write_atomic(self._staging / stream, self._bucket.read_stream(stream))
            for name in self._local_streams() - remote - {self._stream}:
                (self._staging / name).unlink()  # merged away in the bucket
            for name in small_files(self._shard):
                if self._bucket.exists(name):
                    self._bucket.download(name, self._staging / name)
                    self._sent[name] = (self._staging / name).stat().st_mtime_ns
        except BaseException:
            self._release()
            raise

    def _refuse_overlap(self) -> None:
        """As on a disk: a shard refuses while a run of every item or a shard of another N
        holds its lock in the bucket; a run of every item, while any shard does."""
        own = lock_name(self._shard)
        for name in self._bucket.held_locks(stale_after_s=STALE_LOCK_S):
            if name == own:
                continue
            match = layout.SHARD_LOCK.fullmatch("." + name)
            shard = self._shard
            if shard is None or match is None or int(match[2]) != shard.count:
                raise OutputError(
                    f"{self._bucket.url}: a run overlapping this one holds {name} "
                    "(let it finish, or run the same --shard I/N as it)"
                )

    def _pull_own_stream(self) -> None:
        """This run's manifest: the bucket's, plus a local tail it never received."""
        remote = self._bucket.read_stream(self._stream)
        path = self._staging / self._stream
        try:
            local = path.read_bytes()
        except FileNotFoundError:
            local = b""
        if len(local) > len(remote) and local.startswith(remote):
            self._pushed = len(remote)
            pushed = self.push()
            log.info("sent %d manifest bytes a killed run on this machine had kept", pushed)
            return
        layout.write_atomic(path, remote)
        self._pushed = len(remote)

    def _local_streams(self) -> set[str]:
        return {path.name for path in layout.manifest_files(self._staging)}

    def pace_board(self, shard: Shard) -> ObjectPaceBoard:
        """Where this job's shards on one key share their pace: in the bucket, so that
        shards on several machines share it too."""
        return ObjectPaceBoard(self._bucket, shard)

    # --- during ------------------------------------------------------------------------

    def push(self) -> int:
        """Send the lines appended since the last push (their images first); the bytes sent."""
        path = self._staging / self._stream
        try:
            with path.open("rb") as file:
                file.seek(self._pushed)
                data = file.read()
        except FileNotFoundError:
            return 0
        data = data[: data.rfind(b"\n") + 1]  # whole lines only: the writer may be mid-line
        if not data:
            return 0
        for relpath in _image_paths(data.splitlines()):
            if relpath not in self._listing:
                local = self._staging / relpath
                self._bucket.put_once(relpath, local)
                self._listing[relpath] = local.stat().st_size
        self._bucket.append_segment(self._stream, data)
        self._pushed += len(data)
        return len(data)

    def push_small_files(self) -> None:
        """Send the small files changed since they were last sent (job.json as soon as the
        run wrote it: a new machine needs it to read the manifest)."""
        for name in small_files(self._shard):
            path = self._staging / name
            try:
                stamp = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._sent.get(name) != stamp:
                self._bucket.put_bytes(name, path.read_bytes())
                self._sent[name] = stamp

    @contextlib.asynccontextmanager
    async def pushing(self, run_stop: RunStop) -> AsyncIterator[None]:
        """Push every `PUSH_EVERY_S` and keep the lock alive while the body runs; a lock
        taken over by another run (this one's heartbeat went stale) stops the run.

        job.json goes up first, before anything is paid: a machine that resumes needs it
        to read the manifest (its key scheme)."""
        await asyncio.to_thread(self.push_small_files)
        stop = asyncio.Event()
        task = asyncio.create_task(self._push_loop(stop, run_stop), name="mirror")
        try:
            yield
        finally:
            stop.set()
            await task

    async def _push_loop(self, stop: asyncio.Event, run_stop: RunStop) -> None:
        beat = 0.0
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError before 3.11
                await asyncio.wait_for(stop.wait(), PUSH_EVERY_S)
            try:
                await asyncio.to_thread(self.push)
                await asyncio.to_thread(self.push_small_files)
            except Exception as exc:  # the next push sends it again
                log.warning("could not send the manifest to %s: %s", self._bucket.url, exc)
            beat += PUSH_EVERY_S
            if beat >= HEARTBEAT_S:
                beat = 0.0
                await asyncio.to_thread(self.heartbeat, run_stop)

    def heartbeat(self, run_stop: RunStop) -> None:
        """Say the run is alive in its lock. A lock another run took over stops this run
        (exit 3: two runs of one shard would pay twice); a bucket that does not answer is
        tried again at the next beat."""
        lock = self._lock
        if lock is None:
            return
        try:
            lock.refresh()
        except Exception as exc:  # lost, or the bucket did not answer
            if lock.held:
                log.warning("could not refresh the lock in %s: %s", self._bucket.url, exc)
                return
            log.error("%s", exc)
            error = exc if isinstance(exc, OutputError) else OutputError(str(exc))
            run_stop.disk(error, self._staging)

    async def fetch(self, records: Iterable[ItemRecord]) -> None:
        """Bring down the stored images of `records` the staging folder lacks (a stage
        after storage reads them; they were made on another machine)."""
        wanted = [
            output.path
            for record in records
            for output in record.outputs
            if output.path in self._listing and not (self._staging / output.path).exists()
        ]
        for relpath in wanted:
            await asyncio.to_thread(self._bucket.download, relpath, self._staging / relpath)
        if wanted:
            log.info("fetched %d stored images a stage still has to read", len(wanted))

    # --- after -------------------------------------------------------------------------

    def finish(self) -> None:
        """The last lines, the small files, then the lock released."""
        try:
            self.push()
            self.push_small_files()
        finally:
            self._release()

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            with contextlib.suppress(Exception):
                lock.release()


class ObjectPaceBoard:
    """`pipeline.shared_pace.PaceBoard` in the bucket: one object per shard's note."""

    def __init__(self, bucket: ObjectOut, shard: Shard) -> None:
        self._bucket = bucket
        self._shard = shard

    def read(self) -> list[PaceNote]:
        return read_notes(self._shard, self._get)

    def write(self, note: PaceNote) -> None:
        name = note_name(self._shard, note.shard)
        self._bucket.put_bytes(f"{layout.PACE_DIR}/{name}", json.dumps(note.to_json()).encode())

    def _get(self, name: str) -> bytes | None:
        return self._bucket.get_bytes(f"{layout.PACE_DIR}/{name}")


def _image_paths(lines: Iterable[bytes]) -> list[str]:
    """The stored images an ok line names (others name none)."""
    paths = []
    for raw in lines:
        try:
            line: Any = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("status") == "ok":
            for output in line.get("outputs") or ():
                if isinstance(output, dict) and isinstance(output.get("path"), str):
                    paths.append(output["path"])
    return paths


@contextlib.asynccontextmanager
async def mirrored(spec: Spec, shard: Shard | None) -> AsyncIterator[Mirror | None]:
    """A run's mirror when its OUT is on object storage (None for a local OUT): pulled
    before the body, finished after it (also when it fails or is interrupted)."""
    url = spec.output_url
    if url is None:
        yield None
        return
    bucket = await asyncio.to_thread(open_object_out, url)  # imports s3fs: not on the loop
    mirror = Mirror(bucket, spec.output_dir, shard)
    await asyncio.to_thread(mirror.pull)
    try:
        yield mirror
    finally:
        await asyncio.to_thread(mirror.finish)


@contextlib.contextmanager
def pulled_copy(url: str, folder: Path, *, required: bool = True) -> Iterator[ObjectOut]:
    """The manifests and small files of the OUT at `url`, read into `folder`: what
    `status`, `merge` and `plan` read (the images stay in the bucket). `required`: an
    OUT without a manifest is a `UsageError` (not for `plan`, of a job not run yet)."""
    bucket = open_object_out(url)
    streams = bucket.streams()
    if not streams and required:
        raise UsageError(f"no manifest in {url}: run `synthaug run SPEC` first")
    names = {layout.JOB_NAME, layout.SUMMARY_NAME, layout.BALANCE_NAME, layout.SEARCH_NAME}
    for stream in streams:
        layout.write_atomic(folder / stream, bucket.read_stream(stream))
        if match := layout.SHARD_MANIFEST.fullmatch(stream):
            names.add(layout.summary_name(Shard(int(match[1]), int(match[2]))))
    for name in sorted(names):
        if bucket.exists(name):
            bucket.download(name, folder / name)
    yield bucket


def local_copy(url: str) -> tuple[Path, int]:
    """A local copy of the OUT at `url` for what reads its images (`grid`, `export`):
    its manifests, small files and the images its ok lines name, in a folder beside the
    URL's staging folder (a run on this machine keeps its own); (folder, images fetched).
    Images already there with the bucket's size are not fetched again."""
    folder = staging_folder(url).with_name(staging_folder(url).name + "-copy")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in layout.manifest_files(folder):
        stale.unlink()  # the bucket's streams replace them (a merge may have folded some)
    with pulled_copy(url, folder) as bucket:
        listing = bucket.list_files(layout.IMAGES_DIR + "/")
        fetched = 0
        for path in layout.manifest_files(folder):
            for relpath in _image_paths(path.read_bytes().splitlines()):
                local = folder / relpath
                size = listing.get(relpath)
                if size is None or (local.exists() and local.stat().st_size == size):
                    continue
                if bucket.download(relpath, local):
                    fetched += 1
    return folder, fetched


def merge_remote(url: str) -> tuple[int, int]:
    """``synthaug merge s3://...``: every manifest stream of the bucket folded into one
    ``manifest.jsonl`` there (`ObjectOut.compact`: the new object first, the old
    segments deleted after, so a kill loses nothing). Refused while a run holds a lock
    in the bucket; (manifests folded, items)."""
    bucket = open_object_out(url)
    holder = f"{socket.gethostname()}:{os.getpid()}:merge"
    own = lock_name(None)
    lock = bucket.acquire_lock(own, holder=holder, stale_after_s=STALE_LOCK_S)
    try:
        held = [n for n in bucket.held_locks(stale_after_s=STALE_LOCK_S) if n != own]
        if held:
            raise OutputError(f"{url}: a run holds {held[0]}: merge when every shard has finished")
        with tempfile.TemporaryDirectory(prefix="synthaug-merge-") as tmp:
            folder = Path(tmp)
            with pulled_copy(url, folder):
                streams = bucket.streams()
                files, items = fold_manifests(folder)
                merged = (folder / layout.MANIFEST_NAME).read_bytes()
            bucket.compact(streams, layout.MANIFEST_NAME, merged)
        return files, items
    finally:
        lock.release()
