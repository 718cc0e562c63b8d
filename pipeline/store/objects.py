"""OUT on object storage: ``output_dir: s3://bucket/prefix``, the bucket side of a run.

Nothing on object storage appends or renames, so OUT's local conventions map as follows:

    <prefix>/images/<source>/<key16>-<i>.<ext>    written once by key (`put_once`:
                                                  a conditional create, If-None-Match)
    <prefix>/summary.json, job.json, ...          small JSON, plainly overwritten (`put_bytes`)
    <prefix>/segments/<stream>/<seq:010d>-<random8>.jsonl
                                                  a manifest stream (``manifest.jsonl``, a
                                                  shard's ``manifest.shard-I-of-N.jsonl``):
                                                  one new object per flush (`append_segment`),
                                                  read back in seq order (`read_stream`)
    <prefix>/locks/<name>                         a run's lock (`acquire_lock`): a conditional
                                                  create; a heartbeat; a stale one taken
                                                  over conditionally on its ETag (If-Match)

Every method is synchronous (fsspec's sync API): a run calls them from threads
(`asyncio.to_thread`). fsspec and s3fs are imported only when an `ObjectOut` is made, so
the core install never needs them; without them the error names the ``s3`` extra. Other
fsspec protocols (``gs://``, ``az://``, ``abfs://``, ``memory://``) work through their
own packages, with conditional writes emulated by a read before the write (a race window
S3's real conditions do not have).

Endpoint and credentials come only from the standard environment variables, read by
botocore itself (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``):
never from the job spec, and never in a message or a log line of this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..errors import OutputError
from .layout import output_error, write_atomic

__all__ = [
    "LOCKS_DIR",
    "OBJECT_PROTOCOLS",
    "SEGMENTS_DIR",
    "ObjectLocation",
    "ObjectLock",
    "ObjectOut",
    "open_object_out",
    "parse_object_url",
]

OBJECT_PROTOCOLS = frozenset({"s3", "gs", "gcs", "az", "abfs", "abfss", "memory"})
"""The URL schemes an ``output_dir`` may name: s3 with the ``s3`` extra, the others
through their own fsspec packages (gcsfs, adlfs; memory for tests)."""
SEGMENTS_DIR = "segments"
LOCKS_DIR = "locks"
SEGMENT_NAME = re.compile(r"([0-9]{10})-([0-9a-f]{8})\.jsonl")
DEFAULT_STALE_AFTER_S = 120.0

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.S)
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9._-]+")  # a stream's or a lock's: one path part
_MAX_TRIES = 8
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# S3 answers 409 while another conditional write to the same key is in flight.
_CONFLICT = "ConditionalRequestConflict"
_PRECONDITION = "PreconditionFailed"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ObjectLocation:
    """Where an OUT lives on object storage: ``<protocol>://<bucket>/<prefix>``."""

    protocol: str
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the bucket's root
    url: str  # canonical, for messages: no credentials, no trailing slash


def parse_object_url(text: str) -> ObjectLocation | None:
    """The object location `text` names, or None when it is a local path.

    Raises `OutputError` (exit 2) for a URL synthaug cannot use: an
    unknown scheme, no bucket, credentials inside the URL (the message then does not
    repeat it), ``..`` in the prefix, or ``file://`` (give the local path itself).
    """
    match = _URL.fullmatch(text.strip())
    if match is None:
        return None
    protocol, rest = match[1].lower(), match[2]
    if protocol == "file":
        raise OutputError(f"output_dir {text}: give a local folder as a plain path")
    if protocol not in OBJECT_PROTOCOLS:
        known = ", ".join(f"{p}://" for p in sorted(OBJECT_PROTOCOLS))
        raise OutputError(f"output_dir {text}: unsupported scheme {protocol}:// (use {known})")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket:
        raise OutputError(
            f"output_dir {protocol}://...: credentials in the URL are not accepted; "
            "set them in the standard environment variables (AWS_ACCESS_KEY_ID, ...)"
        )
    if not bucket or not _BUCKET.fullmatch(bucket):
        raise OutputError(f"output_dir {text}: no bucket (write {protocol}://bucket/prefix)")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise OutputError(f"output_dir {text}: '.' and '..' are not allowed in the prefix")
    prefix = "/".join(parts)
    url = f"{protocol}://{bucket}/{prefix}" if prefix else f"{protocol}://{bucket}"
    return ObjectLocation(protocol=protocol, bucket=bucket, prefix=prefix, url=url)


def open_object_out(url: str) -> ObjectOut:
    """The `ObjectOut` at `url` (``s3://bucket/prefix``); `OutputError` when `url` is not
    an object URL synthaug can use, or the packages its protocol needs are missing."""
    location = parse_object_url(url)
    if location is None:
        raise OutputError(f"{url} is a local path, not an object storage URL")
    return ObjectOut(location)


class ObjectOut:
    """One OUT on a bucket: images written once, small JSON, manifest segments, locks.

    `filesystem` is an fsspec filesystem to use instead of a fresh one (tests); `clock`
    gives the wall-clock time of lock heartbeats.
    """

    def __init__(
        self,
        location: ObjectLocation,
        *,
        filesystem: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._loc = location
        self._s3 = location.protocol == "s3"
        self._fs = filesystem if filesystem is not None else _open_filesystem(location)
        self._errors = _remote_errors(self._s3)
        self._clock = clock
        self._append_lock = threading.Lock()
        self._last_segment: dict[str, tuple[int, str]] = {}  # stream -> (seq, key)

    @property
    def location(self) -> ObjectLocation:
        """The bucket and prefix this OUT lives under."""
        return self._loc

    def url(self, relpath: str = "") -> str:
        """The URL of `relpath` under OUT (OUT's own without it), for messages."""
        return f"{self._loc.url}/{relpath}" if relpath else self._loc.url

    # -- images and small files -------------------------------------------------------

    def put_once(self, relpath: str, local_file: Path) -> bool:
        """Upload `local_file` as `relpath` unless an object is already there: True when
        this call wrote it, False when it was present (it is never replaced; also when
        a retry of this call's request found its own first attempt landed)."""
        key = self._key(relpath)
        try:
            data = local_file.read_bytes()
        except OSError as exc:
            raise OutputError(f"cannot read {local_file} to upload it: {exc.strerror}") from exc
        return self._create(key, data) is not None

    def put_bytes(self, relpath: str, data: bytes) -> None:
        """Write `data` as `relpath`, replacing what is there (summary.json, job.json)."""
        key = self._key(relpath)
        with self._failing("writing", key):
            if self._s3:
                self._fs.call_s3(
                    "put_object",
                    Bucket=self._loc.bucket,
                    Key=key,
                    Body=data,
                    ContentType=_content_type(key),
                )
            else:
                self._fs.pipe_file(self._path(key), data)

    def get_bytes(self, relpath: str) -> bytes | None:
        """The bytes of `relpath`, or None when there is no such object."""
        found = self._read(self._key(relpath))
        return None if found is None else found[0]

    def exists(self, relpath: str) -> bool:
        """Whether an object is stored as `relpath`."""
        key = self._key(relpath)
        with self._failing("checking", key):
            if not self._s3:
                return bool(self._fs.isfile(self._path(key)))
            try:
                self._fs.call_s3("head_object", Bucket=self._loc.bucket, Key=key)
            except FileNotFoundError as exc:
                _reraise_missing_bucket(exc)
                return False
            return True

    def list_files(self, subprefix: str = "") -> dict[str, int]:
        """Every object under `subprefix` (a folder of OUT, "" for all) by its path
        relative to OUT, with its size: one listing, paginated, however many there are."""
        folder = "/".join(p for p in subprefix.split("/") if p)
        if folder:
            self._key(folder)  # validated like any relative path
        base = self._loc.prefix
        start = "/".join(p for p in (base, folder) if p)
        found = self._list(f"{start}/" if start else "")
        cut = len(base) + 1 if base else 0
        return {key[cut:]: size for key, size in found.items()}

    def download(self, relpath: str, local_path: Path) -> bool:
        """Copy `relpath` to `local_path` (a temporary name beside it, then a rename):
        True when copied, False when there is no such object."""
        key = self._key(relpath)
        with self._failing("reading", key):
            try:
                remote = self._fs.open(self._path(key), "rb")
            except FileNotFoundError:
                return False

        def copy(fh: IO[bytes]) -> None:
            with self._failing("reading", key):
                shutil.copyfileobj(remote, fh, 1 << 20)

        with remote:
            try:
                write_atomic(local_path, copy)
            except OSError as exc:
                raise output_error(local_path, exc) from exc
        return True

    # -- manifest segments ------------------------------------------------------------

    def append_segment(self, stream: str, data: bytes) -> str:
        """Store `data` (whole JSONL lines) as the next segment of `stream`; returns the
        segment's path relative to OUT.

        The seq is one more than the highest segment of the stream: known after the
        first listing, and each append asks only for the segments after the last one
        known (a listing that is almost always empty), so two writers interleave in time
        order. The object is created with If-None-Match: it never replaces another; a
        412 means someone took that name, and the append lists again and takes the next
        seq. A missing final newline is added, so two segments never glue two lines.
        """
        if not data:
            raise ValueError("an empty segment")
        if not data.endswith(b"\n"):
            data += b"\n"
        folder = self._stream_dir(stream)
        with self._append_lock:
            for _ in range(_MAX_TRIES):
                seq = self._refresh_last(stream, folder)[0] + 1
                key = f"{folder}{seq:010d}-{secrets.token_hex(4)}.jsonl"
                if self._create(key, data) is not None:
                    self._last_segment[stream] = (seq, key)
                    return self._relative(key)
        raise OutputError(
            f"could not append to {self.url(self._relative(folder))}: its segments keep changing"
        )

    def read_stream(self, stream: str) -> bytes:
        """All of `stream`'s segments in seq order, concatenated, each ending in a
        newline; b"" when it has none. A segment that vanishes while it is read
        (compacted meanwhile) makes it read the stream again."""
        folder = self._stream_dir(stream)
        for _ in range(_MAX_TRIES):
            parts = []
            for _seq, key in self._segments(folder):
                found = self._read(key)
                if found is None:
                    break
                parts.append(found[0] if found[0].endswith(b"\n") else found[0] + b"\n")
            else:
                return b"".join(part for part in parts if part != b"\n")
        raise OutputError(
            f"could not read {self.url(self._relative(folder))}: its segments keep changing"
        )

    def streams(self) -> list[str]:
        """The names of the manifest streams stored in this OUT, sorted."""
        root = self._key(SEGMENTS_DIR) + "/"
        names = {key[len(root) :].split("/", 1)[0] for key in self._list(root)}
        return sorted(name for name in names if _NAME.fullmatch(name))

    def compact(self, streams: list[str], into: str, data: bytes) -> str:
        """Replace `streams` by `data` stored as one segment of `into` (``merge``).

        In this order, so that a kill at any moment loses no line: (1) list the
        segments the streams hold now; (2) write `data` as a new segment of `into`,
        after all of its existing ones; (3) only then delete the listed segments (of
        `into` too when it is among `streams`). Killed after (2), a reader sees the old
        segments and the compacted one: lines twice, the compacted copy last, which
        "last line per key wins" reads the same. `data` must hold every line of
        `streams`; the caller holds their locks, so no segment appears meanwhile (one
        that does is not listed in (1) and is kept).
        """
        old = {stream: self._segments(self._stream_dir(stream)) for stream in streams}
        written = self.append_segment(into, data)
        doomed = [key for segments in old.values() for _seq, key in segments]
        self._delete_keys(doomed)
        return written

    # -- locks --------------------------------------------------------------------------

    def acquire_lock(
        self, name: str, *, holder: str, stale_after_s: float = DEFAULT_STALE_AFTER_S
    ) -> ObjectLock:
        """Take ``locks/<name>`` for `holder`, or raise `OutputError` naming the holder.

        The lock object is created with If-None-Match. When one is there and its
        heartbeat is older than `stale_after_s`, it is taken over by a write conditional
        on the ETag just read (If-Match): of two takers, one wins and the other finds the
        winner's fresh heartbeat and refuses. Heartbeats are compared with this host's
        clock: hosts must agree on the time to well within `stale_after_s`. A lock left
        by a process of this host that is gone is stale at once.
        """
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad lock name {name!r}")
        key = self._key(f"{LOCKS_DIR}/{name}")
        now = self._clock()
        record: dict[str, Any] = {
            "holder": holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _iso(now),
            "heartbeat": _iso(now),
            "token": secrets.token_hex(8),
        }
        body = _lock_body(record)
        for _ in range(_MAX_TRIES):
            etag = self._create(key, body)
            if etag is not None:
                return ObjectLock(self, key, record, etag)
            found = self._read(key)
            if found is None:
                continue  # released meanwhile: create again
            other = _parse_lock(found[0])
            if other.get("token") == record["token"]:  # our create, retried after a lost answer
                return ObjectLock(self, key, record, found[1])
            age = _age(other, self._clock())
            if age is not None and age < stale_after_s and not _dead_here(other):
                raise _held(self.url(self._relative(key)), other, age, stale_after_s)
            log.warning(
                "taking over the stale lock %s of %s (last heartbeat %s)",
                self.url(self._relative(key)),
                other.get("holder", "?"),
                other.get("heartbeat", "unknown"),
            )
            record["heartbeat"] = _iso(self._clock())
            etag = self._replace(key, _lock_body(record), found[1])
            if etag is not None:
                return ObjectLock(self, key, record, etag)
        url = self.url(self._relative(key))
        raise OutputError(f"could not lock {url}: it keeps changing; try again")

    def held_locks(self, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[str]:
        """The names of the locks in ``locks/`` whose holder is alive (a heartbeat
        younger than `stale_after_s`), sorted: a run refuses to overlap them."""
        root = self._key(LOCKS_DIR) + "/"
        held = []
        now = self._clock()
        for key in self._list(root):
            found = self._read(key)
            record = {} if found is None else _parse_lock(found[0])
            age = _age(record, now)
            if age is not None and age < stale_after_s and not _dead_here(record):
                held.append(key[len(root) :])
        return sorted(held)

    # -- the primitives, on S3 or any fsspec filesystem ---------------------------------

    def _put(self, key: str, data: bytes, **condition: str) -> dict[str, Any]:
        """One S3 PUT of `data` at `key` under `condition` (``IfNoneMatch``/``IfMatch``)."""
        answer: dict[str, Any] = self._fs.call_s3(
            "put_object",
            Bucket=self._loc.bucket,
            Key=key,
            Body=data,
            ContentType=_content_type(key),
            **condition,
        )
        return answer

    def _create(self, key: str, data: bytes) -> str | None:
        """Create `key` holding `data` if absent: its ETag, or None when present."""
        with self._failing("writing", key):
            if not self._s3:
                try:
                    self._fs.pipe_file(self._path(key), data, mode="create")
                except FileExistsError:
                    return None
                return _digest(data)
            for attempt in range(_MAX_TRIES):
                try:
                    answer = self._put(key, data, IfNoneMatch="*")
                except FileExistsError:
                    return None
                except OSError as exc:
                    if _s3_code(exc) == _PRECONDITION:
                        return None
                    if _s3_code(exc) != _CONFLICT:
                        raise
                    time.sleep(0.05 * (attempt + 1))  # another create of this key in flight
                    continue
                return str(answer["ETag"])
        raise OutputError(
            f"writing {self.url(self._relative(key))}: other writes to it keep conflicting"
        )

    def _replace(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace `key` by `data` if its ETag is still `etag`: the new ETag, or None
        when it changed or is gone."""
        with self._failing("writing", key):
            if not self._s3:  # emulated: a race window between the read and the write
                found = self._read(key)
                if found is None or found[1] != etag:
                    return None
                self._fs.pipe_file(self._path(key), data)
                return _digest(data)
            try:
                answer = self._put(key, data, IfMatch=etag)
            except FileNotFoundError as exc:
                _reraise_missing_bucket(exc)
                return None
            except OSError as exc:
                if _s3_code(exc) in (_PRECONDITION, _CONFLICT):
                    return None
                raise
            return str(answer["ETag"])

    def _read(self, key: str) -> tuple[bytes, str] | None:
        """`key`'s bytes and the ETag of exactly those bytes, or None when absent."""
        with self._failing("reading", key):
            try:
                if not self._s3:
                    data = bytes(self._fs.cat_file(self._path(key)))
                    return data, _digest(data)
                from fsspec.asyn import sync

                result: tuple[bytes, str] = sync(self._fs.loop, self._get_object, key)
                return result
            except FileNotFoundError as exc:
                _reraise_missing_bucket(exc)
                return None

    async def _get_object(self, key: str) -> tuple[bytes, str]:
        answer = await self._fs._call_s3("get_object", Bucket=self._loc.bucket, Key=key)
        async with answer["Body"] as body:
            data = await body.read()
        return bytes(data), str(answer["ETag"])

    def _delete_if(self, key: str, etag: str) -> bool:
        """Delete `key` if its ETag is still `etag`; False when it changed."""
        with self._failing("deleting", key):
            if not self._s3:
                found = self._read(key)
                if found is None or found[1] != etag:
                    return False
                self._fs.rm_file(self._path(key))
                return True
            try:
                self._fs.call_s3("delete_object", Bucket=self._loc.bucket, Key=key, IfMatch=etag)
            except FileNotFoundError as exc:
                _reraise_missing_bucket(exc)
                return False
            except OSError as exc:
                if _s3_code(exc) == _PRECONDITION:
                    return False
                raise
            return True

    def _delete_keys(self, keys: list[str]) -> None:
        if keys:
            with self._failing("deleting", keys[0]):
                self._fs.rm([self._path(key) for key in keys])

    def _list(self, folder: str, *, start_after: str = "") -> dict[str, int]:
        """Every key under the key prefix `folder` (after `start_after`), with sizes."""
        with self._failing("listing", folder):
            found: dict[str, int] = {}
            if not self._s3:
                root = f"{self._loc.bucket}/"
                for path, info in self._fs.find(self._path(folder), detail=True).items():
                    key = path.removeprefix("/").removeprefix(root)
                    if info.get("type") == "file" and key.startswith(folder) and key > start_after:
                        found[key] = int(info.get("size") or 0)
                return found
            ask: dict[str, Any] = {"Bucket": self._loc.bucket, "Prefix": folder}
            if start_after:
                ask["StartAfter"] = start_after
            while True:
                page = self._fs.call_s3("list_objects_v2", **ask)
                for item in page.get("Contents", []):
                    found[str(item["Key"])] = int(item["Size"])
                if not page.get("IsTruncated"):
                    return found
                ask["ContinuationToken"] = page["NextContinuationToken"]

    def _segments(self, folder: str, *, start_after: str = "") -> list[tuple[int, str]]:
        """The segments under `folder`, as (seq, key) in reading order."""
        found = []
        for key in self._list(folder, start_after=start_after):
            match = SEGMENT_NAME.fullmatch(key[len(folder) :])
            if match:
                found.append((int(match[1]), key))
        return sorted(found)

    def _refresh_last(self, stream: str, folder: str) -> tuple[int, str]:
        """The stream's last segment (seq, key): (0, "") when it has none."""
        last = self._last_segment.get(stream, (0, ""))
        newer = self._segments(folder, start_after=last[1])
        if newer and newer[-1] > last:
            last = newer[-1]
        self._last_segment[stream] = last
        return last

    def _stream_dir(self, stream: str) -> str:
        if not _NAME.fullmatch(stream):
            raise ValueError(f"bad stream name {stream!r}")
        return self._key(f"{SEGMENTS_DIR}/{stream}") + "/"

    def _key(self, relpath: str) -> str:
        """The object key of OUT's `relpath`; ValueError for a path leaving OUT."""
        parts = PurePosixPath(relpath).parts
        if not parts or relpath.startswith("/") or any(p in (".", "..") for p in parts):
            raise ValueError(f"not a path inside OUT: {relpath!r}")
        rel = "/".join(parts)
        return f"{self._loc.prefix}/{rel}" if self._loc.prefix else rel

    def _relative(self, key: str) -> str:
        return key[len(self._loc.prefix) + 1 :] if self._loc.prefix else key

    def _path(self, key: str) -> str:
        return f"{self._loc.bucket}/{key}"

    @contextmanager
    def _failing(self, action: str, key: str) -> Iterator[None]:
        """Turn a storage failure into one `OutputError` line naming the object (never
        a credential: botocore's messages carry none, and nothing else is added)."""
        try:
            yield
        except (FileNotFoundError, FileExistsError):
            if self._bucket_missing():
                raise OutputError(
                    f"{action} {self.url(self._relative(key))}: bucket {self._loc.bucket} "
                    "does not exist (create it, or fix output_dir and AWS_ENDPOINT_URL)"
                ) from None
            raise
        except OutputError:
            raise
        except self._errors as exc:
            reason = str(exc) or type(exc).__name__
            raise OutputError(
                f"{action} {self.url(self._relative(key))} failed ({reason}): check the "
                "bucket, AWS_ENDPOINT_URL and the AWS_* credential variables, then run again"
            ) from exc

    def _bucket_missing(self) -> bool:
        try:
            if self._s3:
                self._fs.call_s3("head_bucket", Bucket=self._loc.bucket)
                return False
            return not self._fs.exists(self._loc.bucket)
        except FileNotFoundError:
            return True
        except self._errors:
            return False


class ObjectLock:
    """A held lock object of an `ObjectOut`: refresh its heartbeat, release it."""

    def __init__(self, out: ObjectOut, key: str, record: dict[str, Any], etag: str) -> None:
        self._out = out
        self._key = key
        self._record = dict(record)
        self._etag: str | None = etag

    @property
    def url(self) -> str:
        """The lock object's URL."""
        return self._out.url(self._out._relative(self._key))

    @property
    def held(self) -> bool:
        """True until `release` is called."""
        return self._etag is not None

    @property
    def record(self) -> dict[str, Any]:
        """What the lock object says: holder, host, pid, started, heartbeat."""
        return dict(self._record)

    def refresh(self) -> None:
        """Write a new heartbeat, conditional on the lock being ours still; raise
        `OutputError` when it was taken over (this run must stop writing)."""
        if self._etag is None:
            raise OutputError(f"{self.url} was released: take it again")
        record = {**self._record, "heartbeat": _iso(self._out._clock())}
        etag = self._out._replace(self._key, _lock_body(record), self._etag)
        if etag is None:
            self._etag = None
            found = self._out._read(self._key)
            other = _parse_lock(found[0]) if found else {}
            who = other.get("holder") or "nobody (deleted)"
            raise OutputError(
                f"lost the lock {self.url}: it is now held by {who}, after this run's "
                "heartbeat went stale; stop this run and check which one should go on"
            )
        self._record, self._etag = record, etag

    def release(self) -> None:
        """Delete the lock object if it is still ours; safe to call twice."""
        etag, self._etag = self._etag, None
        if etag is not None and not self._out._delete_if(self._key, etag):
            log.warning("%s was taken over by another run before this one released it", self.url)

    def __enter__(self) -> ObjectLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open_filesystem(location: ObjectLocation) -> Any:
    """A fresh fsspec filesystem for `location` (no shared instance, no listing cache:
    another writer's objects must be seen at once)."""
    extra = f"output_dir {location.url} needs the s3 extra: pip install 'synthaug[s3]'"
    try:
        import fsspec

        if location.protocol == "s3":
            import s3fs  # noqa: F401
    except ImportError as exc:
        if location.protocol == "s3":
            raise OutputError(extra) from exc
        raise OutputError(f"output_dir {location.url} needs fsspec: pip install fsspec") from exc
    if location.protocol == "s3":
        _quiet_botocore()
    try:
        return fsspec.filesystem(
            location.protocol, skip_instance_cache=True, use_listings_cache=False
        )
    except ImportError as exc:
        raise OutputError(f"output_dir {location.url}: {exc}") from exc


def _quiet_botocore() -> None:
    """Keep botocore's DEBUG and INFO records from being made, unless its level was set on
    purpose: they print every signed request, ``AWS_SESSION_TOKEN`` included, and
    ``--log-level DEBUG`` must never show a credential."""
    for name in ("botocore", "aiobotocore"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # its INFO lines ("Found credentials") are noise
            logger.setLevel(logging.WARNING)


def _remote_errors(s3: bool) -> tuple[type[BaseException], ...]:
    """What a failing storage call raises: OSError (fsspec's), and botocore's own."""
    if not s3:
        return (OSError,)
    from botocore.exceptions import BotoCoreError, ClientError  # comes with s3fs

    return (OSError, BotoCoreError, ClientError)


def _s3_code(exc: BaseException) -> str:
    """The S3 error code behind an exception s3fs translated ("" when none)."""
    seen: BaseException | None = exc
    while seen is not None:
        answer = getattr(seen, "response", None)
        if isinstance(answer, dict):
            return str(answer.get("Error", {}).get("Code", ""))
        seen = seen.__cause__
    return ""


def _reraise_missing_bucket(exc: FileNotFoundError) -> None:
    """A missing bucket is an error, never a missing object."""
    if _s3_code(exc) == "NoSuchBucket":
        raise exc


def _content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or (
        "application/x-ndjson" if key.endswith(".jsonl") else "application/octet-stream"
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime(_TIME_FORMAT)


def _lock_body(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")


def _parse_lock(data: bytes) -> dict[str, Any]:
    """A lock object's record; {} when it is not one (then it counts as stale)."""
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _dead_here(record: dict[str, Any]) -> bool:
    """Whether the lock's holder was a process of this host that is gone (killed): its
    lock is stale at once, as a disk's flock is dropped with its process."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def _age(record: dict[str, Any], now: float) -> float | None:
    """Seconds since the record's heartbeat; None when it has no readable one."""
    try:
        beat = datetime.strptime(str(record["heartbeat"]), _TIME_FORMAT)
    except (KeyError, ValueError):
        return None
    return now - beat.replace(tzinfo=timezone.utc).timestamp()


def _held(url: str, holder: dict[str, Any], age: float, stale_after_s: float) -> OutputError:
    who = (
        f"{holder.get('holder', '?')}: pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, started {holder.get('started', '?')}, "
        f"last heartbeat {max(age, 0):.0f}s ago"
    )
    return OutputError(
        f"{url} is held by another synthaug run ({who}): wait for it or stop it; a holder "
        f"silent for {stale_after_s:.0f}s is taken over"
    )
