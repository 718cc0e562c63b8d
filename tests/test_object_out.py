"""OUT on object storage: ``output_dir: s3://bucket/prefix`` end to end, against a real S3
API served on 127.0.0.1 by moto in server mode.

Each run stages its files in a folder of its own (``SYNTHAUG_STAGING``): a new folder is a
new machine (a pod) that has only the bucket. Runs are subprocesses of the CLI against a
mock-server subprocess, so SIGKILL is real and the mock's counters say what was paid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from checks import S3_TEST_ENV, mock_server_process, moto_s3_server, stats, wait_until

from pipeline.jobspec.fields import STAGING_ENV

BUCKET = "synthaug-test"
SECRET = "moto-secret-UNIQUE-91f3"
CONCURRENCY = 4


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """moto's S3 on 127.0.0.1 and the standard variables that point a client at it."""
    with moto_s3_server() as endpoint:
        yield {**S3_TEST_ENV, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint}


@pytest.fixture
def bucket(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the test process's own S3 clients see the server too."""
    import boto3

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    name = f"{BUCKET}-{time.monotonic_ns()}"
    client.create_bucket(Bucket=name)
    return name


def keys_in(bucket: str, prefix: str = "") -> dict[str, int]:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = item["Size"]
    return found


def write_spec(folder: Path, base: str, url: str, prompts: int) -> Path:
    spec = {
        "version": 1,
        "name": "objects",
        "output_dir": url,
        "backend": {"kind": "roboflow", "base_url": base, "timeout_s": 5.0},
        "project_url": "objects",
        "params": {"size": "32x32"},
        "run": {
            "concurrency": CONCURRENCY,
            "rate_limit": "50/s",
            "backoff_base_s": 0.05,
            "backoff_max_s": 0.2,
        },
        "sources": [
            {
                "name": "grid",
                "prompt": "object {i}",
                "vars": {"i": [str(i) for i in range(prompts)]},
            }
        ],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def cli(args: list[str], staging: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    full = {
        **os.environ,
        **env,
        STAGING_ENV: str(staging),
        "ROBOFLOW_API_KEY": "rf-objects-key",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def ok_lines(bucket: str, prefix: str) -> Counter[str]:
    """How many ok lines each key has over every manifest segment in the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    counts: Counter[str] = Counter()
    latest: dict[str, dict[str, Any]] = {}
    for key in sorted(keys_in(bucket, f"{prefix}/segments/")):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for raw in body.splitlines():
            line = json.loads(raw)
            latest[line["key"]] = line
            if line["status"] == "ok":
                counts[line["key"]] += 1
    return counts


def test_a_run_on_s3_resumes_on_a_new_machine_and_status_reads_it_there(
    tmp_path: Path, bucket: str, s3_env: dict[str, str]
) -> None:
    url = f"s3://{bucket}/nightly"
    with mock_server_process(tmp_path) as base:
        spec = write_spec(tmp_path, base, url, 12)
        code, _, err = finish(cli(["run", str(spec), "--no-progress"], tmp_path / "pod-a", s3_env))
        assert code == 0, err
        assert "contact sheets" in err  # drawn from a local copy, and it says how
        images = keys_in(bucket, "nightly/images/")
        assert len(images) == 12
        assert all(size > 0 for size in images.values())
        paid = stats(base)["generations"]
        code, out, err = finish(cli(["plan", str(spec), "--json"], tmp_path / "pod-x", s3_env))
        assert code == 0, err
        assert json.loads(out)["total"]["done"] == 12  # read from the bucket
        # a new pod: nothing local, the bucket is the OUT
        args = ["run", str(spec), "--no-progress", "--log-level", "DEBUG"]
        code, _, err = finish(cli(args, tmp_path / "pod-b", s3_env))
        assert code == 0, err
        assert stats(base)["generations"] == paid  # nothing paid again
        assert SECRET not in err  # the storage secret: never in a log, even at DEBUG
        staged = [p for p in (tmp_path / "pod-b").rglob("*") if p.is_file()]
        assert not [p for p in staged if SECRET.encode() in p.read_bytes()]
        code, _, err = finish(cli(["run", str(spec), "--verify"], tmp_path / "pod-b", s3_env))
        assert code == 2, err  # it would re-read every image: refused, nothing sent
        assert "--verify" in err
        assert stats(base)["requests"] == paid
        code, out, err = finish(cli(["status", url, "--json"], tmp_path / "pod-c", s3_env))
    assert code == 0, err
    status = json.loads(out)
    assert (status["ok"], status["failed"], status["images"]) == (12, 0, 12)
    assert SECRET not in err + out


def kill_and_resume(
    spec: Path, base: str, pods: list[tuple[str, int]], last: Path, env: dict[str, str]
) -> int:
    """SIGKILL a run on each pod (a staging folder) once the mock made that many
    generations, then resume on `last`; the kills that landed."""
    kills = 0
    for pod, after in pods:
        proc = cli(["run", str(spec), "--no-progress", "--no-grid"], spec.parent / pod, env)
        wait_until(
            lambda n=after, p=proc: stats(base)["generations"] >= n or p.poll() is not None,
            what=f"{after} generations",
        )
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
    code, _, err = finish(cli(["run", str(spec), "--no-progress", "--no-grid"], last, env))
    assert code == 0, err
    return kills


def assert_each_item_once(bucket: str, prefix: str, items: int) -> None:
    counts = ok_lines(bucket, prefix)
    assert len(counts) == items
    assert set(counts.values()) == {1}
    assert len(keys_in(bucket, f"{prefix}/images/")) == items


def test_three_sigkills_on_one_machine_pay_at_most_what_was_in_flight(
    tmp_path: Path, bucket: str, s3_env: dict[str, str]
) -> None:
    """Killed three times mid-run, resumed on the same machine each time: every item ok
    exactly once in the bucket with its image, and the mock paid again at most what was
    in flight at each kill, as on a local OUT (the unsent tail is found and sent)."""
    prompts = 60
    with mock_server_process(tmp_path, "--latency", "0.05") as base:
        spec = write_spec(tmp_path, base, f"s3://{bucket}/killed", prompts)
        pods = [("pod-a", 8), ("pod-a", 24), ("pod-a", 40)]
        kills = kill_and_resume(spec, base, pods, tmp_path / "pod-a", s3_env)
        duplicates = stats(base)["duplicates"]
    assert kills == 3
    assert_each_item_once(bucket, "killed", prompts)
    assert duplicates <= kills * CONCURRENCY


def test_a_sigkill_then_resume_on_a_new_machine_loses_at_most_one_push(
    tmp_path: Path, bucket: str, s3_env: dict[str, str]
) -> None:
    """Killed, then resumed on a machine that has only the bucket (a new pod): every item
    ok once; paid again: what was in flight, plus what the last second (one push
    interval) made, at this job's pace of at most 50/s."""
    prompts = 60
    with mock_server_process(tmp_path, "--latency", "0.05") as base:
        spec = write_spec(tmp_path, base, f"s3://{bucket}/moved", prompts)
        kills = kill_and_resume(spec, base, [("pod-a", 30)], tmp_path / "pod-b", s3_env)
        duplicates = stats(base)["duplicates"]
    assert kills == 1
    assert_each_item_once(bucket, "moved", prompts)
    assert duplicates <= CONCURRENCY + 50


def test_two_shards_at_once_on_s3_then_merge(
    tmp_path: Path, bucket: str, s3_env: dict[str, str]
) -> None:
    url = f"s3://{bucket}/sharded"
    with mock_server_process(tmp_path) as base:
        spec = write_spec(tmp_path, base, url, 24)
        procs = [
            cli(
                ["run", str(spec), "--shard", f"{i}/2", "--no-progress", "--no-grid"],
                tmp_path / f"machine-{i}",
                s3_env,
            )
            for i in range(2)
        ]
        for proc in procs:
            code, _, err = finish(proc)
            assert code == 0, err
        assert stats(base)["generations"] == 24
        assert stats(base)["duplicates"] == 0
        # the contact sheet of the shards' OUT, drawn from a copy of the bucket
        code, out, err = finish(cli(["grid", url], tmp_path / "viewer", s3_env))
        assert code == 0, err
        assert "24 images fetched" in err
        sheet = Path(out.splitlines()[0])
        assert sheet.name == "grid.png"
        assert sheet.is_file()
        code, out, err = finish(cli(["merge", url], tmp_path / "merger", s3_env))
        assert code == 0, err
        assert "24 items" in out
        segments = keys_in(bucket, "sharded/segments/")
        assert {key.split("/")[2] for key in segments} == {"manifest.jsonl"}
        code, out, err = finish(cli(["status", url, "--json"], tmp_path / "merger", s3_env))
        assert code == 0, err
        assert json.loads(out)["ok"] == 24
        # and nothing is sent again on one machine after the merge
        code, _, err = finish(
            cli(["run", str(spec), "--no-progress", "--no-grid"], tmp_path / "pod", s3_env)
        )
        assert code == 0, err
        assert stats(base)["generations"] == 24


def test_a_second_run_of_the_same_shard_refuses_while_the_first_holds_the_lock(
    tmp_path: Path, bucket: str, s3_env: dict[str, str]
) -> None:
    url = f"s3://{bucket}/locked"
    with mock_server_process(tmp_path, "--latency", "2") as base:
        spec = write_spec(tmp_path, base, url, 40)
        first = cli(["run", str(spec), "--no-progress", "--no-grid"], tmp_path / "a", s3_env)
        try:
            wait_until(lambda: stats(base)["requests"] > 0, what="the first run to start")
            code, _, err = finish(cli(["run", str(spec), "--no-progress"], tmp_path / "b", s3_env))
            assert code == 2, err
            assert "lock" in err.lower()
            code, _, err = finish(cli(["merge", url], tmp_path / "c", s3_env))
            assert code == 2, err
        finally:
            first.send_signal(signal.SIGINT)
            first.communicate(timeout=60)


def test_a_run_whose_lock_was_taken_over_stops(
    tmp_path: Path, bucket: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose heartbeat went stale and whose lock another run took over stops at its
    next beat (exit 3, saying so): two runs of one shard would pay twice."""
    import boto3

    from pipeline.jobspec.load import load_spec
    from pipeline.run.mirror import Mirror, open_object_out
    from pipeline.run.pool import RunStop

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "stage"))
    spec = load_spec(write_spec(tmp_path, "http://127.0.0.1:9", f"s3://{bucket}/taken", 2))
    assert spec.output_url is not None
    mirror = Mirror(open_object_out(spec.output_url), spec.output_dir, None)
    mirror.pull()
    stop = RunStop()
    mirror.heartbeat(stop)
    assert stop.reason is None  # still ours
    taker = {"holder": "other-host:7", "host": "other-host", "pid": 7, "token": "t"}
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=bucket, Key="taken/locks/synthaug.lock", Body=json.dumps(taker).encode()
    )
    mirror.heartbeat(stop)
    assert stop.reason == "disk"  # a clean stop, exit 3
    assert "lost the lock" in str(stop.output_error)
    assert "other-host:7" in str(stop.output_error)
    mirror.finish()  # releases nothing it no longer holds
    assert "taken/locks/synthaug.lock" in keys_in(bucket, "taken/locks/")
