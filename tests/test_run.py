"""End-to-end runs of the engine against the embedded mock API on 127.0.0.1."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from checks import assert_outputs_valid, run_spec, write_job_spec

from pipeline.jobspec.load import load_spec
from pipeline.manifest.log import read_latest, read_lines
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.run.job import run_job

KEY = "sk-test-run-7f3a9c1d2e"

SpecWriter = Callable[..., Path]


@pytest.fixture
def write_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpecWriter:
    """Write a roboflow-kind spec pointing at `base_url`, with overrides per section."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)

    def write(base_url: str, **overrides: Any) -> Path:
        overrides.setdefault("values", [f"thing {i}" for i in range(overrides.pop("prompts", 6))])
        return write_job_spec(tmp_path, base_url, size="64x64", **overrides)

    return write


run = run_spec


def ok_lines(out: Path) -> list[dict[str, Any]]:
    return [r for r in read_lines(out / "manifest.jsonl") if r["status"] == "ok"]


async def test_clean_run_stores_every_image_and_exits_0(write_spec: SpecWriter) -> None:
    """A fault-free job ends with one ok line per item, valid files and exit 0."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=5, repeats=2)
        result = await run(path)
    out = path.parent / "out"
    assert result.exit_code == 0
    assert len(ok_lines(out)) == 10
    assert_outputs_valid(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 10
    assert summary["requests"] == 10
    assert server.stats.generations == 10


async def test_resume_sends_nothing_for_done_items(write_spec: SpecWriter) -> None:
    """Running the same spec again costs zero requests when everything is ok."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url)
        await run(path)
        before = server.stats.requests
        result = await run(path)
    assert result.exit_code == 0
    assert server.stats.requests == before
    assert result.summary["skipped_ok"] == 6


async def test_missing_file_of_ok_item_runs_again(write_spec: SpecWriter) -> None:
    """An ok key whose file was deleted is pending again on resume; the rest are not."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url)
        await run(path)
        out = path.parent / "out"
        victim = ok_lines(out)[0]
        (out / victim["outputs"][0]["path"]).unlink()
        result = await run(path)
    assert result.summary["requests"] == 1
    assert result.summary["ok"] == 1
    assert_outputs_valid(out)


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param({"500": 1, "502": 1, "503": 1, "504": 1}, id="5xx"),
        pytest.param({"malformed": 1, "wrong_shape": 1}, id="bad-bodies"),
        pytest.param({"corrupt_image": 1, "truncated_image": 1}, id="bad-images"),
        pytest.param({"429": 1}, id="429"),
        pytest.param({"image_404_once": 1}, id="404-image-once"),
    ],
)
async def test_injected_faults_end_all_ok_without_paying_twice(
    write_spec: SpecWriter, faults: dict[str, float]
) -> None:
    """Transient faults are retried until every item is ok; no body generated twice
    except where an image could not be downloaded (the only way to get it is to ask again)."""
    config = MockConfig(error_rate=0.4, faults=faults, seed=3, retry_after_s=0.05)
    async with MockServer(config) as server:
        path = write_spec(server.base_url, prompts=12, max_attempts=12)
        result = await run(path)
    out = path.parent / "out"
    assert result.exit_code == 0, result.summary
    assert len(ok_lines(out)) == 12
    assert_outputs_valid(out)
    image_faults = sum(server.stats.faults.get(k, 0) for k in ("corrupt_image", "truncated_image"))
    assert server.stats.duplicates <= image_faults
    assert server.stats.starts_during_pause == 0


async def test_dropped_connections_are_the_only_paid_duplicates(write_spec: SpecWriter) -> None:
    """A connection dropped after sending may have been paid: retried, and counted
    as an ambiguous retry; duplicates never exceed the drops."""
    config = MockConfig(error_rate=0.3, faults={"drop": 1}, seed=5)
    async with MockServer(config) as server:
        path = write_spec(server.base_url, prompts=12, max_attempts=12)
        result = await run(path)
    assert result.exit_code == 0
    drops = server.stats.faults.get("drop", 0)
    assert drops > 0
    assert result.summary["ambiguous_retries"] == drops
    assert server.stats.duplicates <= drops


async def test_retry_ambiguous_false_records_failure_instead_of_paying_twice(
    write_spec: SpecWriter,
) -> None:
    """With retry_ambiguous: false a dropped connection fails the item (connection)."""
    config = MockConfig(error_rate=1.0, faults={"drop": 1})
    async with MockServer(config) as server:
        path = write_spec(server.base_url, prompts=2, retry_ambiguous=False)
        result = await run(path)
    assert result.exit_code == 1
    assert server.stats.requests == 2
    assert server.stats.duplicates == 0
    errors = [r["error"]["kind"] for r in read_latest(path.parent / "out/manifest.jsonl").values()]
    assert errors == ["connection", "connection"]


async def test_429_storm_is_obeyed(write_spec: SpecWriter) -> None:
    """A server enforcing a low rate answers 429s: no request arrives during a
    Retry-After pause it announced, and every item still ends ok."""
    config = MockConfig(rate_limit=40.0, retry_after_s=0.2)
    async with MockServer(config) as server:
        path = write_spec(server.base_url, prompts=16, concurrency=8, max_attempts=20)
        result = await run(path)
    assert result.exit_code == 0
    assert server.stats.rate_limited > 0
    assert server.stats.starts_during_pause == 0
    assert result.summary["rate_limited_429"] == server.stats.rate_limited


async def test_auth_failure_aborts_with_exit_3_after_few_requests(
    write_spec: SpecWriter,
) -> None:
    """A 401 aborts the run (exit 3) after at most `concurrency` requests."""
    async with MockServer(MockConfig(api_key="the-right-key")) as server:
        path = write_spec(server.base_url, prompts=30, concurrency=4)
        result = await run(path)
    assert result.exit_code == 3
    assert server.stats.requests <= 4
    assert result.message is not None
    assert "API key" in result.message or "api key" in result.message.lower()


async def test_unknown_project_aborts_with_exit_3(write_spec: SpecWriter) -> None:
    """A 404 for the project aborts the run: every other request would fail the same way."""
    async with MockServer(MockConfig(projects=frozenset({"other"}))) as server:
        path = write_spec(server.base_url, prompts=10, concurrency=2)
        result = await run(path)
    assert result.exit_code == 3
    assert server.stats.requests <= 2


async def test_refusal_fails_item_once_without_retry(write_spec: SpecWriter) -> None:
    """A content-policy refusal is recorded as `refused` after exactly one request."""
    async with MockServer(MockConfig(refuse_word="thing 1")) as server:
        path = write_spec(server.base_url, prompts=3)
        result = await run(path)
    assert result.exit_code == 1
    latest = read_latest(path.parent / "out/manifest.jsonl").values()
    kinds = Counter(r["error"]["kind"] for r in latest if r["status"] == "failed")
    assert kinds == {"refused": 1}
    assert server.stats.requests == 3


async def test_max_images_budget_stops_with_exit_4_and_resumes(write_spec: SpecWriter) -> None:
    """max_images stops the run (exit 4) without overshooting; running again goes on."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=10, max_images=4, n=2)
        first = await run(path)
        assert first.exit_code == 4
        assert server.stats.images <= 4
        for _ in range(4):
            result = await run(path)
            if result.exit_code == 0:
                break
    assert result.exit_code == 0
    assert len(ok_lines(path.parent / "out")) == 10
    assert server.stats.duplicates == 0


async def test_generated_line_resumes_by_downloading(write_spec: SpecWriter) -> None:
    """A run killed between the answer and the download resumes from the recorded URL
    without generating again."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=3)
        await run(path)
        out = path.parent / "out"
        manifest = out / "manifest.jsonl"
        lines = list(read_lines(manifest))
        generated = [r for r in lines if r["status"] == "generated"]
        assert len(generated) == 3
        # Simulate the kill: keep only the generated lines and drop the files.
        manifest.write_text("".join(json.dumps(r) + "\n" for r in generated))
        for record in lines:
            for output in record.get("outputs") or []:
                (out / output["path"]).unlink()
        before = server.stats.generations
        result = await run(path)
    assert result.exit_code == 0
    assert server.stats.generations == before
    assert result.summary["resumed_downloads"] == 3
    assert_outputs_valid(out)


async def test_torn_manifest_line_is_ignored_and_run_completes(write_spec: SpecWriter) -> None:
    """A manifest ending in half a line (kill mid-write) resumes cleanly."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=4)
        await run(path)
        manifest = path.parent / "out/manifest.jsonl"
        with manifest.open("ab") as fh:
            fh.write(b'{"key": "abc", "status": "o')
        result = await run(path)
    assert result.exit_code == 0
    assert result.summary["requests"] == 0
    for line in manifest.read_bytes().splitlines()[:-1]:
        if line.startswith(b'{"key": "abc"'):
            continue
        json.loads(line)


async def test_consecutive_failures_abort_with_exit_3(write_spec: SpecWriter) -> None:
    """An API failing every request aborts after `max_consecutive_failures` items
    instead of burning through the whole job."""
    config = MockConfig(error_rate=1.0, faults={"500": 1})
    async with MockServer(config) as server:
        path = write_spec(
            server.base_url, prompts=40, concurrency=2, max_attempts=2, max_consecutive_failures=3
        )
        result = await run(path)
    assert result.exit_code == 3
    assert result.summary["stop_reason"] == "aborted"
    # 3 failed items, plus at most one more item in flight, each tried max_attempts times
    assert server.stats.requests <= (3 + 1) * 2
    assert result.message is not None
    assert "consecutive" in result.message


async def test_max_cost_budget_stops_with_exit_4(write_spec: SpecWriter) -> None:
    """max_cost_usd with a known price stops the run before it spends more."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=10, price_per_image=0.04, max_cost_usd=0.2)
        result = await run(path)
    assert result.exit_code == 4
    assert server.stats.images == 5
    assert result.summary["cost_usd"] == pytest.approx(0.2)


async def test_max_cost_with_unknown_price_is_refused_before_sending(
    write_spec: SpecWriter,
) -> None:
    """A cost budget that cannot be computed (unknown model price) is a spec error."""
    from pipeline.errors import SpecError

    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=3, max_cost_usd=1.0)
        with pytest.raises(SpecError, match=r"run\.max_cost_usd.*price_per_image"):
            await run(path)
    assert server.stats.requests == 0


async def test_resume_trusts_existing_files_and_verify_rehashes(write_spec: SpecWriter) -> None:
    """Resume trusts a stored image whose size and mtime are the recorded ones (no re-read
    of the whole dataset each night); --verify re-hashes and redoes one changed in place."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=3)
        await run(path)
        out = path.parent / "out"
        victim = out / ok_lines(out)[0]["outputs"][0]["path"]
        before = victim.stat()
        data = bytearray(victim.read_bytes())
        data[-20] ^= 0xFF  # same size, different bytes, and the old mtime put back
        victim.write_bytes(bytes(data))
        os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
        quick = await run(path)
        assert quick.summary["requests"] == 0
        verified = await run_job(
            load_spec(path), spec_path=path, install_signals=False, verify=True
        )
    assert verified.summary["requests"] == 1
    assert_outputs_valid(out)


async def test_resume_with_the_state_cache_still_sees_deleted_files_and_edited_manifest(
    write_spec: SpecWriter,
) -> None:
    """The state cache a run leaves never hides a change: a deleted image, or an ok line
    removed from the manifest by hand, makes that item run again (and only that one)."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=4)
        await run(path)
        await run(path)  # the first resume leaves the cache
        out = path.parent / "out"
        assert (out / ".manifest.jsonl.state").is_file()
        lines = ok_lines(out)
        (out / lines[0]["outputs"][0]["path"]).unlink()
        deleted = await run(path)
        manifest = out / "manifest.jsonl"
        forget = lines[-1]["key"].encode()  # every line of one item, as if never run
        kept = [ln for ln in manifest.read_bytes().splitlines(keepends=True) if forget not in ln]
        manifest.write_bytes(b"".join(kept))
        edited = await run(path)
        again = await run(path)
    assert deleted.summary["requests"] == 1
    assert edited.summary["requests"] == 1
    assert again.summary["requests"] == 0
    assert again.summary["skipped_ok"] == 4
    assert_outputs_valid(out)


async def test_a_state_cache_that_cannot_be_written_never_fails_a_run(
    write_spec: SpecWriter,
) -> None:
    """Something in the way of the state cache (here a folder of that name): the run and
    its resume still work, reading the manifest instead."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=3)
        out = path.parent / "out"
        (out / ".manifest.jsonl.state").mkdir(parents=True)
        first = await run(path)
        second = await run(path)
    assert (first.exit_code, first.summary["ok"]) == (0, 3)
    assert (second.exit_code, second.summary["requests"], second.summary["skipped_ok"]) == (0, 0, 3)
