"""OUT on object storage (`pipeline.store.objects`) against a real S3 API: moto in server
mode on 127.0.0.1, reached through s3fs as a run will reach a bucket."""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from checks import S3_TEST_ENV, moto_s3_server

from pipeline.errors import OutputError
from pipeline.store.objects import (
    ObjectLocation,
    ObjectOut,
    open_object_out,
    parse_object_url,
)

SECRET = "moto-secret-NEVER-SHOWN-7c1e"
TOKEN = "moto-session-token-NEVER-SHOWN-42d9"
MANIFEST = "manifest.jsonl"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 on a free loopback port for the whole session."""
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A fresh bucket, and only the standard variables pointing a client at it."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in S3_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    bucket = f"synthaug-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    yield bucket
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def out(s3_bucket: str) -> ObjectOut:
    """An OUT under a prefix of the fresh bucket."""
    return open_object_out(f"s3://{s3_bucket}/jobs/nightly")


def second_writer(out: ObjectOut, clock: float = 0.0) -> ObjectOut:
    """Another process's view of the same OUT (its own client and caches); its clock
    `clock` seconds off."""
    return ObjectOut(out.location, clock=lambda: time.time() + clock)


def lines(data: bytes) -> list[bytes]:
    return data.splitlines()


# --- URLs and the extra ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("out/run", None, id="relative-path"),
        pytest.param("/data/out", None, id="absolute-path"),
        pytest.param(
            "s3://bkt/a/b/",
            ObjectLocation("s3", "bkt", "a/b", "s3://bkt/a/b"),
            id="s3-trailing-slash",
        ),
        pytest.param("S3://bkt", ObjectLocation("s3", "bkt", "", "s3://bkt"), id="s3-root"),
        pytest.param("gs://b1/x", ObjectLocation("gs", "b1", "x", "gs://b1/x"), id="gs"),
    ],
)
def test_parse_object_url(text: str, expected: ObjectLocation | None) -> None:
    """A local path is not a URL; a bucket URL is split into bucket and prefix."""
    assert parse_object_url(text) == expected


@pytest.mark.parametrize(
    ("text", "said"),
    [
        pytest.param("s3://", "no bucket", id="no-bucket"),
        pytest.param("s3:///prefix", "no bucket", id="empty-bucket"),
        pytest.param("ftp://host/x", "unsupported scheme", id="unknown-scheme"),
        pytest.param("s3://b/../x", "'..'", id="dotdot"),
        pytest.param("file:///tmp/x", "plain path", id="file-url"),
    ],
)
def test_unusable_urls_are_refused(text: str, said: str) -> None:
    """A URL synthaug cannot use is refused with the reason (exit 2)."""
    with pytest.raises(OutputError, match=said) as caught:
        parse_object_url(text)
    assert caught.value.exit_code == 2


def test_credentials_in_a_url_are_refused_without_repeating_them() -> None:
    """Credentials belong in the environment; the refusal does not echo them."""
    with pytest.raises(OutputError, match="environment variables") as caught:
        parse_object_url(f"s3://AKIA:{SECRET}@bucket/prefix")
    assert SECRET not in str(caught.value)


def test_missing_s3_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without s3fs, the error names the extra to install."""
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(OutputError) as caught:
        open_object_out("s3://bucket/prefix")
    assert str(caught.value) == (
        "output_dir s3://bucket/prefix needs the s3 extra: pip install 'synthaug[s3]'"
    )


def test_importing_the_module_does_not_import_fsspec() -> None:
    """The core install never imports fsspec or s3fs: only an ObjectOut does."""
    import subprocess

    code = (
        "import sys, pipeline.store.objects, pipeline.api; "
        "print(sorted(m for m in ('fsspec', 's3fs', 'botocore') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


# --- images and small files --------------------------------------------------------------


def test_put_once_never_replaces_an_image(out: ObjectOut, tmp_path: Path) -> None:
    """An image is written once by key: a second upload leaves the first in place."""
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(b"first image")
    second.write_bytes(b"another image")
    relpath = "images/cats/0123456789abcdef-0.png"
    assert out.put_once(relpath, first) is True
    assert out.put_once(relpath, second) is False
    assert second_writer(out).put_once(relpath, second) is False
    assert out.get_bytes(relpath) == b"first image"


def test_small_files_listing_and_download(out: ObjectOut, tmp_path: Path) -> None:
    """Small JSON is overwritten; images are listed with sizes; a download lands whole."""
    out.put_bytes("summary.json", b'{"ok": 1}')
    out.put_bytes("summary.json", b'{"ok": 2}')
    assert out.get_bytes("summary.json") == b'{"ok": 2}'
    assert out.get_bytes("job.json") is None
    assert out.exists("summary.json")
    assert not out.exists("job.json")
    image = tmp_path / "x.png"
    image.write_bytes(b"12345")
    out.put_once("images/dogs/aaaaaaaaaaaaaaaa-0.png", image)
    assert out.list_files("images/") == {"images/dogs/aaaaaaaaaaaaaaaa-0.png": 5}
    target = tmp_path / "staging" / "summary.json"
    assert out.download("summary.json", target) is True
    assert target.read_bytes() == b'{"ok": 2}'
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]  # no temp left
    assert out.download("job.json", tmp_path / "job.json") is False
    with pytest.raises(ValueError, match="inside OUT"):
        out.get_bytes("../elsewhere.json")


def test_list_files_returns_every_object_past_one_page(out: ObjectOut, s3_bucket: str) -> None:
    """A resume over thousands of images sees all of them (the listing is paginated)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for i in range(2500):  # straight into moto: 2,500 PUTs over HTTP would take long
        backend.put_object(s3_bucket, f"jobs/nightly/images/cats/{i:016x}-0.png", b"png")
    backend.put_object(s3_bucket, "jobs/other/images/cats/elsewhere-0.png", b"png")
    listed = out.list_files("images")
    assert len(listed) == 2500
    assert listed["images/cats/00000000000009c3-0.png"] == 3


# --- manifest segments -------------------------------------------------------------------


def test_two_writers_interleaved_keep_every_line_in_order(out: ObjectOut) -> None:
    """Two writers on one stream: every line exactly once, in the order written."""
    other = second_writer(out)
    written = []
    for i in range(6):
        writer = out if i % 2 == 0 else other
        line = f'{{"key": "k{i}", "by": "{"ab"[i % 2]}"}}\n'.encode()
        writer.append_segment(MANIFEST, line)
        written.append(line.rstrip(b"\n"))
    assert lines(out.read_stream(MANIFEST)) == written
    assert lines(other.read_stream(MANIFEST)) == written
    assert out.streams() == [MANIFEST]


def test_a_segment_without_a_final_newline_glues_no_lines(out: ObjectOut) -> None:
    """A segment cut short of its newline does not join its last line to the next."""
    out.put_bytes(f"segments/{MANIFEST}/0000000001-0badc0de.jsonl", b'{"key": "a"}')
    out.append_segment(MANIFEST, b'{"key": "b"}')  # no newline either: one is added
    out.append_segment(MANIFEST, b'{"key": "c"}\n')
    assert lines(out.read_stream(MANIFEST)) == [b'{"key": "a"}', b'{"key": "b"}', b'{"key": "c"}']
    assert out.read_stream("manifest.shard-1-of-2.jsonl") == b""


def test_compact_replaces_streams_by_one_segment(out: ObjectOut) -> None:
    """After a merge, the manifest reads the merged lines, and the shards' streams are gone."""
    shards = ["manifest.shard-0-of-2.jsonl", "manifest.shard-1-of-2.jsonl"]
    out.append_segment(MANIFEST, b'{"key": "a"}\n')
    out.append_segment(shards[0], b'{"key": "b"}\n')
    out.append_segment(shards[1], b'{"key": "c"}\n')
    merged = b'{"key": "a"}\n{"key": "b"}\n{"key": "c"}\n'
    out.compact([MANIFEST, *shards], MANIFEST, merged)
    assert out.streams() == [MANIFEST]
    assert out.read_stream(MANIFEST) == merged
    assert len(out.list_files(f"segments/{MANIFEST}")) == 1
    out.append_segment(MANIFEST, b'{"key": "d"}\n')  # appends go on after it
    assert lines(out.read_stream(MANIFEST))[-1] == b'{"key": "d"}'


def test_compact_killed_before_deleting_loses_no_line(
    out: ObjectOut, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after writing the merged segment, before any delete: every line is still
    read, the merged copy last (last line per key wins)."""
    shard = "manifest.shard-0-of-2.jsonl"
    out.append_segment(MANIFEST, b'{"key": "a", "v": 1}\n')
    out.append_segment(shard, b'{"key": "b", "v": 1}\n')

    def killed(self: ObjectOut, keys: list[str]) -> None:
        raise KeyboardInterrupt  # the process dies here

    merged = b'{"key": "a", "v": 1}\n{"key": "b", "v": 1}\n'
    with monkeypatch.context() as patched:
        patched.setattr(ObjectOut, "_delete_keys", killed)
        with pytest.raises(KeyboardInterrupt):
            out.compact([MANIFEST, shard], MANIFEST, merged)
    reader = second_writer(out)
    got = set(lines(reader.read_stream(MANIFEST))) | set(lines(reader.read_stream(shard)))
    assert got == {b'{"key": "a", "v": 1}', b'{"key": "b", "v": 1}'}
    assert reader.read_stream(MANIFEST).endswith(merged)
    reader.compact(reader.streams(), MANIFEST, merged)  # merging again finishes the job
    assert reader.read_stream(MANIFEST) == merged
    assert reader.streams() == [MANIFEST]


# --- locks -------------------------------------------------------------------------------


def test_a_held_lock_refuses_naming_its_holder(out: ObjectOut) -> None:
    """A second run is refused with the first run's holder, host and pid."""
    with out.acquire_lock(".synthaug.lock", holder="nightly-pod-1"):
        with pytest.raises(OutputError, match="nightly-pod-1") as caught:
            second_writer(out).acquire_lock(".synthaug.lock", holder="nightly-pod-2")
        assert "wait for it or stop it" in str(caught.value)
        assert out.held_locks() == [".synthaug.lock"]
    assert out.held_locks() == []
    second_writer(out).acquire_lock(".synthaug.lock", holder="nightly-pod-2").release()


def test_a_stale_lock_is_taken_over(out: ObjectOut) -> None:
    """A holder silent past `stale_after_s` (a dead pod) is taken over."""
    dead = second_writer(out, clock=-1000.0).acquire_lock("run.lock", holder="dead-pod")
    assert out.held_locks(stale_after_s=120) == []
    lock = out.acquire_lock("run.lock", holder="new-pod", stale_after_s=120)
    assert lock.record["holder"] == "new-pod"
    assert out.held_locks() == ["run.lock"]
    with pytest.raises(OutputError, match="lost the lock"):
        dead.refresh()  # the dead holder's refresh fails: it must stop writing
    dead.release()  # and its release leaves the new holder's lock alone
    assert out.held_locks() == ["run.lock"]
    lock.refresh()
    lock.release()
    assert out.held_locks() == []


@pytest.mark.parametrize("round_", range(3))
def test_two_concurrent_takeovers_have_one_winner(out: ObjectOut, round_: int) -> None:
    """Two runs taking over one stale lock at once: exactly one wins."""
    second_writer(out, clock=-1000.0).acquire_lock("run.lock", holder="dead-pod")
    takers = [second_writer(out) for _ in range(2)]
    barrier = threading.Barrier(len(takers))
    results: list[object] = [None] * len(takers)

    def take(i: int) -> None:
        barrier.wait()
        try:
            results[i] = takers[i].acquire_lock("run.lock", holder=f"taker-{i}")
        except OutputError as exc:
            results[i] = exc

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(takers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [r for r in results if not isinstance(r, OutputError)]
    losers = [r for r in results if isinstance(r, OutputError)]
    assert len(winners) == 1, results
    assert len(losers) == 1
    assert "taker-" in str(losers[0])  # the loser names the winner


def test_refresh_after_a_takeover_raises(out: ObjectOut) -> None:
    """A holder whose lock someone else took learns it at its next heartbeat."""
    lock = out.acquire_lock("run.lock", holder="slow-pod")
    thief = second_writer(out, clock=1000.0)  # sees slow-pod's heartbeat as old
    taken = thief.acquire_lock("run.lock", holder="thief-pod")
    with pytest.raises(OutputError, match="thief-pod"):
        lock.refresh()
    assert not lock.held
    taken.release()


# --- the generic fsspec path ---------------------------------------------------------------


def test_other_protocols_write_once_and_lock() -> None:
    """Another fsspec protocol (memory://) keeps the same promises, emulated."""
    bucket = f"mem-{uuid.uuid4().hex[:8]}"
    mem = open_object_out(f"memory://{bucket}/out")
    mem.put_bytes("job.json", b"{}")
    assert mem.put_once("job.json", Path(__file__)) is False
    mem.append_segment(MANIFEST, b"1\n")
    second_writer(mem).append_segment(MANIFEST, b"2")
    assert mem.read_stream(MANIFEST) == b"1\n2\n"
    segments = mem.list_files(f"segments/{MANIFEST}")
    assert len(segments) == 2
    assert mem.list_files() == {"job.json": 2, **segments}
    with mem.acquire_lock("run.lock", holder="a"), pytest.raises(OutputError, match="held by"):
        mem.acquire_lock("run.lock", holder="b")


# --- secrets -----------------------------------------------------------------------------


def test_no_credential_in_errors_or_logs(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing call (a missing bucket) says what failed, and neither its message, its
    causes nor any log line at DEBUG holds the secret key or the session token."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    good = open_object_out(f"s3://{s3_bucket}/out")
    good.put_bytes("summary.json", b"{}")
    missing = open_object_out("s3://no-such-bucket-here/out")
    with pytest.raises(OutputError, match="does not exist") as caught:
        missing.put_bytes("summary.json", b"{}")
    with pytest.raises(OutputError, match="does not exist"):
        missing.get_bytes("summary.json")
    with pytest.raises(OutputError, match="does not exist"):
        missing.acquire_lock("run.lock", holder="me")
    chain: list[BaseException] = []
    seen: BaseException | None = caught.value
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for credential in (SECRET, TOKEN):
        assert all(credential not in f"{exc!s} {exc!r}" for exc in chain)
        assert all(credential not in record.getMessage() for record in caplog.records)
    assert any(record.levelno == logging.DEBUG for record in caplog.records)
