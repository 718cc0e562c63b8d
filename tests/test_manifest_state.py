"""Reading the manifest back: the fast path, the state cache, and the full parse agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.manifest.cache import StateCache, cache_path, load_cached_state
from pipeline.manifest.log import ManifestState, _fast_ok, load_state
from pipeline.manifest.writer import ManifestWriter
from pipeline.records import (
    ErrorInfo,
    GeneratedImage,
    InputImage,
    ItemRecord,
    OutputFile,
    UploadRecord,
)

KEYS = [f"{i:02x}" * 32 for i in range(6)]
MTIME_NS = 1_700_000_000_123_456_789
# Text meant to fool a line scanner: JSON markers, quotes, escapes, non-ASCII, newlines.
TRICKY = st.lists(
    st.sampled_from(
        [
            *['"', "\\", ",", "{", "}", "[", "]", ":", "\n", "é", "☃", "a", " ", "/"],
            *['"outputs":[', '{"path":"images/s/', '],"attempts":', '","status":"ok"'],
        ]
    ),
    max_size=12,
).map("".join)


def _record(key: str, status: str, prompt: str, n: int, source: str = "src") -> ItemRecord:
    outputs = tuple(
        OutputFile(
            path=f"images/{source}/{key[:16]}-{i}.png",
            sha256=f"{i:064x}",
            width=8,
            height=8,
            url=f"https://x.test/{prompt}",
            id=prompt,
            bytes=100 + i,
            mtime_ns=MTIME_NS + i,
            upload=_upload(i, prompt),
        )
        for i in range(n if status == "ok" else 0)
    )
    error = ErrorInfo("http_status", 500, prompt) if status == "failed" else None
    return ItemRecord(
        key=key,
        status=status,  # type: ignore[arg-type]
        source=source,
        vars={"v": prompt, "outputs": prompt},
        repeat=0,
        input=InputImage("url", prompt) if prompt else None,
        prompt=prompt,
        params={"n": n, "style": prompt},
        outputs=outputs,
        attempts=2,
        error=error,
        response={"data": [{"url": prompt, "path": "images/src/x-0.png"}]},
        pending=(GeneratedImage(url=f"https://x.test/{prompt}", id=prompt),)
        if status == "generated"
        else (),
    )


def _upload(index: int, text: str) -> UploadRecord | None:
    """What the stages after storage add to an output, tricky text included: none on the
    first output, an upload on the second, a failed one on the third."""
    if index == 1:
        return UploadRecord(project=text, id=text, duplicate=True)
    if index == 2:
        return UploadRecord(project=text, error=ErrorInfo("http_status", 422, text))
    return None


LINES = st.lists(
    st.tuples(
        st.sampled_from(KEYS),
        st.sampled_from(["ok", "ok", "failed", "generated"]),
        TRICKY,
        st.integers(1, 3),
    ),
    max_size=12,
)


def _write(
    path: Path, lines: list[tuple[str, str, str, int]], cache: StateCache | None = None
) -> None:
    """Append `lines` as a run would, keeping `cache` in step when given."""
    with ManifestWriter(path) as writer:
        if cache is not None:
            writer.add_append_hook(cache.add)
            cache.start(cache.load())
        for key, status, prompt, n in lines:
            writer.append(_record(key, status, prompt, n))


def _run(path: Path, lines: list[tuple[str, str, str, int]], *, killed: bool = False) -> None:
    """One run with the state cache (segments of 3 lines); `killed` skips its last flush."""
    cache = StateCache(path, segment_lines=3)
    _write(path, lines, cache)
    if killed:
        cache._lines = 0  # the lines since the last segment die with the process
    cache.close()


def _view(state: ManifestState) -> tuple[dict[str, object], dict[str, object], bool]:
    open_ = {k: (e.status, e.pending, e.error_kind, e.attempts) for k, e in state.open.items()}
    return dict(state.finished), open_, state.staged


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=LINES)
def test_fast_path_reads_what_the_full_parse_reads(
    tmp_path: Path, lines: list[tuple[str, str, str, int]]
) -> None:
    """The quick reading of ok lines gives the same state as parsing every line as JSON,
    whatever the prompts, vars and answers contain."""
    path = tmp_path / f"m-{abs(hash(tuple(lines)))}.jsonl"
    _write(path, lines)
    fast, full = load_state(path), load_state(path, with_hashes=True)
    assert _view(fast) == _view(full)
    last = {key: status for key, status, _p, _n in lines}
    assert {k for k, s in last.items() if s == "ok"} == set(fast.finished)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(runs=st.lists(st.tuples(LINES, st.booleans()), min_size=1, max_size=4))
def test_state_cache_follows_runs_and_kills(
    tmp_path: Path, runs: list[tuple[list[tuple[str, str, str, int]], bool]]
) -> None:
    """Whatever runs appended (some killed before their last cache segment), the cache
    plus the lines after it give the state of the whole manifest."""
    path = tmp_path / f"m-{abs(hash(repr(runs)))}.jsonl"
    for lines, killed in runs:
        _run(path, lines, killed=killed)
        assert _view(load_cached_state(path)) == _view(load_state(path, with_hashes=True))


def test_state_cache_is_used(tmp_path: Path) -> None:
    """After a run, a resume takes its state from the cache's segments."""
    path = tmp_path / "manifest.jsonl"
    _run(path, [(KEYS[0], "ok", "a", 1), (KEYS[1], "failed", "b", 1)] * 2)
    cache = StateCache(path)
    state = cache.load()
    assert _view(state) == _view(load_state(path, with_hashes=True))
    assert state.offset == path.stat().st_size
    assert cache._cached is not None
    assert cache._cached.segments == 3  # the first run's empty start, then 3 + 1 lines


@pytest.mark.parametrize(
    "prompt", ["plain", '"outputs":[{"path":"images/src/x-0.png"}],"attempts":']
)
def test_writer_lines_take_the_fast_path(tmp_path: Path, prompt: str) -> None:
    """The lines the writer makes are the ones the quick reading understands (else the
    speed-up silently vanishes)."""
    path = tmp_path / "manifest.jsonl"
    _write(path, [(KEYS[0], "ok", prompt, 3)])  # with an upload and a failed upload
    paths = tuple(f"images/src/{KEYS[0][:16]}-{i}.png" for i in range(3))
    stats = ((100, MTIME_NS), (101, MTIME_NS + 1), (102, MTIME_NS + 2))
    assert _fast_ok(path.read_bytes()) == (KEYS[0], "src", paths, stats, True)


def test_state_cache_survives_a_copy_that_keeps_mtimes(tmp_path: Path) -> None:
    """OUT restored from a CI cache or rsynced elsewhere resumes from its state cache."""
    path = _cached_run(tmp_path / "a")
    copy = tmp_path / "b" / "manifest.jsonl"
    copy.parent.mkdir()
    shutil.copy2(path, copy)
    shutil.copy2(cache_path(path), cache_path(copy))
    cache = StateCache(copy)
    assert _view(cache.load()) == _view(load_state(path, with_hashes=True))
    assert cache._cached is not None  # from the cache, not the lines


def test_non_canonical_ok_line_is_read_in_full(tmp_path: Path) -> None:
    """An ok line written by hand (keys in another order) is still understood."""
    path = tmp_path / "manifest.jsonl"
    key = KEYS[0]
    line = {
        "status": "ok",
        "outputs": [{"sha256": "x", "path": f"images/s/{key[:16]}-0.png"}],
        "key": key,
        "source": "s",
    }
    path.write_text(json.dumps(line) + "\n")
    assert load_state(path).finished == {key: ("s", (f"images/s/{key[:16]}-0.png",), (None,))}


def _cached_run(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "manifest.jsonl"
    _run(path, [(KEYS[0], "ok", "a", 1), (KEYS[1], "ok", "b", 1), (KEYS[2], "failed", "c", 1)])
    assert cache_path(path).exists()
    return path


def _torn_cache(path: Path) -> None:
    cache = cache_path(path)
    cache.write_bytes(cache.read_bytes()[:-7])


def _drop_last_line(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))


def _rewrite_first_line_same_size(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"status":"ok"', b'"status":"no"', 1))


def _edit_then_append(path: Path) -> None:
    _rewrite_first_line_same_size(path)
    _write(path, [(KEYS[4], "ok", "later", 1)])


def _damage_cache(path: Path) -> None:
    cache = cache_path(path)
    data = bytearray(cache.read_bytes())
    data[-5] ^= 0xFF
    cache.write_bytes(bytes(data))


def _other_python(path: Path) -> None:
    cache = cache_path(path)
    header, _, payload = cache.read_bytes().partition(b"\n")
    fields = json.loads(header)
    fields["python"] = "cpython-2.7"
    cache.write_bytes(json.dumps(fields).encode() + b"\n" + payload)


def _garbage_cache(path: Path) -> None:
    cache_path(path).write_bytes(b"\x00\x01not a cache")


def _replace_manifest(path: Path) -> None:
    path.unlink()
    _write(path, [(KEYS[3], "ok", "z", 2)])


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_drop_last_line, id="line-removed"),
        pytest.param(_rewrite_first_line_same_size, id="edited-in-place"),
        pytest.param(_edit_then_append, id="edited-then-appended"),
        pytest.param(_damage_cache, id="damaged-cache"),
        pytest.param(_other_python, id="other-python"),
        pytest.param(_garbage_cache, id="garbage-cache"),
        pytest.param(_torn_cache, id="torn-last-segment"),
        pytest.param(_replace_manifest, id="new-manifest"),
    ],
)
def test_state_cache_is_ignored_when_it_no_longer_matches(tmp_path: Path, change: object) -> None:
    """An edited, shortened or replaced manifest, or a damaged or foreign cache: the
    state comes from the manifest itself."""
    path = _cached_run(tmp_path)
    change(path)  # type: ignore[operator]
    assert _view(load_cached_state(path)) == _view(load_state(path, with_hashes=True))


def _records_of_every_kind() -> list[ItemRecord]:
    from pipeline.records import ErrorInfo, GeneratedImage, InputImage, OutputFile

    base = {
        "source": "s",
        "vars": {"season": "late fall"},
        "repeat": 1,
        "input": InputImage("file", "/data/a.png", "ab" * 32),
        "prompt": 'a "quoted" prompt',
        "params": {"n": 1},
        "attempts": 2,
        "started_at": "2026-11-30T00:00:00.000Z",
    }
    return [
        ItemRecord(
            key="a" * 64,
            status="ok",
            outputs=(OutputFile("images/s/aaaa-0.png", "cd" * 32, 8, 8, None, None, 120, 10**18),),
            finished_at="2026-11-30T00:00:01.000Z",
            elapsed_s=1.0,
            response={"data": [{"b64_json": "<elided>"}]},
            **base,  # type: ignore[arg-type]
        ),
        ItemRecord(
            key="b" * 64,
            status="failed",
            error=ErrorInfo(kind="http_status", status=400, message="bad"),
            **base,  # type: ignore[arg-type]
        ),
        ItemRecord(
            key="c" * 64,
            status="generated",
            response={"data": [{"url": "http://x/1.png"}]},
            pending=(GeneratedImage(url="http://x/1.png", id="1"),),
            **base,  # type: ignore[arg-type]
        ),
    ]


@pytest.mark.parametrize("record", _records_of_every_kind(), ids=lambda r: r.status)
def test_a_record_reads_back_as_it_was_written(record: ItemRecord, tmp_path: Path) -> None:
    """The one record type: what the writer appends, the views read back unchanged."""
    from pipeline.manifest.log import read_records

    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as writer:
        writer.append(record)
    assert read_records(path) == {record.key: record}


def test_a_hand_edited_line_reads_as_what_is_left(tmp_path: Path) -> None:
    """Wrong types read as absent; a line without key or status is not a record."""
    from pipeline.manifest.log import read_records

    path = tmp_path / "manifest.jsonl"
    path.write_text(
        '{"key": "k", "status": "ok", "vars": 3, "outputs": [1, {"path": 5}], "repeat": "x"}\n'
        '{"status": "ok"}\n'
    )
    (record,) = read_records(path).values()
    assert (record.vars, record.repeat, record.outputs[0].path) == ({}, 0, "5")


@pytest.mark.parametrize("images", [1, 2])
def test_state_says_whether_a_stage_result_was_read(tmp_path: Path, images: int) -> None:
    """`staged` is set by an ok line holding a stage's result (here the upload on a second
    output), read fast, in full or from the cache, and stays set after later plain lines."""
    path = tmp_path / "manifest.jsonl"
    _run(path, [(KEYS[0], "ok", "a", images), (KEYS[1], "ok", "b", 1), (KEYS[2], "ok", "c", 1)])
    _write(path, [(KEYS[3], "ok", "d", 1)])  # after the cache
    expected = images == 2
    assert load_state(path).staged is expected
    assert load_state(path, with_hashes=True).staged is expected
    assert load_cached_state(path).staged is expected
