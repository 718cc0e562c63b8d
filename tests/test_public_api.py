"""The Python API (`import synthaug`): load, plan, run from any thread, stop, status."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from checks import ThreadedMock, mock_spec, write_job_spec

import pipeline
import synthaug
from pipeline import api as pipeline_api
from pipeline.mockapi.server import MockConfig

REPO = Path(__file__).resolve().parent.parent
KEY = "public-api-test-key"



def test_both_import_names_give_the_same_api() -> None:
    """`import synthaug` and `pipeline.api` are one API, with the error tree exported."""
    assert synthaug.run is pipeline_api.run
    assert synthaug.load_spec is pipeline_api.load_spec
    assert issubclass(synthaug.SpecError, synthaug.PipelineError)
    assert synthaug.__version__ == pipeline.__version__


def run_in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` on a worker thread (as a scheduler does) and return what it returned."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed back to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_mock_job_runs_from_a_worker_thread(sandbox: Path) -> None:
    """A scheduler thread runs a whole job: typed result, no signal handlers, GC untouched."""
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    spec = synthaug.load_spec(mock_spec())
    result = run_in_thread(synthaug.run, spec)
    assert isinstance(result, synthaug.RunResult)
    assert (result.exit_code, result.ok, result.failed, result.images) == (0, 4, 0, 4)
    assert result.all_ok
    assert result.stop_reason is None
    assert result.output_dir == sandbox / "out"
    assert result.summary["ok"] == 4
    assert json.loads((sandbox / "out" / "summary.json").read_text())["ok"] == 4
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert gc.get_freeze_count() == 0
    again = run_in_thread(synthaug.run, spec)
    assert (again.requests, again.skipped_ok) == (0, 4)


def test_plan_and_status_are_typed(sandbox: Path) -> None:
    """plan() and status() return objects with the CLI's figures as attributes."""
    spec = synthaug.load_spec(mock_spec())
    before = synthaug.plan(spec)
    assert (before.total("items"), before.total("done"), before.cost_usd) == (4, 0, 0.0)
    synthaug.run(spec)
    after = synthaug.plan(spec)
    assert after.total("done") == 4
    status = synthaug.status(sandbox / "out")
    assert (status.ok, status.failed, status.images, status.pending) == (4, 0, 4, 0)
    assert status.by_source["grid"].ok == 4
    assert status.report["ok"] == 4


def test_load_spec_from_a_path_or_a_dict(sandbox: Path) -> None:
    """A dict resolves relative paths against base_dir; a path against its folder."""
    (sandbox / "jobs").mkdir()
    (sandbox / "jobs" / "job.yaml").write_text(yaml.safe_dump(mock_spec()))
    from_file = synthaug.load_spec(sandbox / "jobs" / "job.yaml")
    from_dict = synthaug.load_spec(mock_spec(), base_dir=sandbox / "jobs")
    assert from_file.output_dir == from_dict.output_dir == sandbox / "jobs" / "out"
    assert synthaug.load_spec(mock_spec()).output_dir == sandbox / "out"


def test_a_bad_dict_raises_spec_error_naming_the_key() -> None:
    """Validation errors from a dict name the key path, like a file's do."""
    with pytest.raises(synthaug.SpecError, match=r"<dict> run\.concurrency: "):
        synthaug.load_spec(mock_spec(run={"concurrency": 0}))
    with pytest.raises(synthaug.SpecError, match="a spec is a mapping"):
        synthaug.load_spec([1, 2])  # type: ignore[arg-type]


def test_the_max_items_guard_holds_for_library_callers(sandbox: Path) -> None:
    """run() refuses a spec past run.max_items before anything is sent or written."""
    spec = synthaug.load_spec(mock_spec(run={"max_items": 3}))
    with pytest.raises(synthaug.SpecError, match="expands to 4 items, more than max_items 3"):
        synthaug.run(spec)
    assert not (sandbox / "out").exists()


def test_budgets_hold_for_library_callers() -> None:
    """max_images stops a library run with exit code 4, as on the command line."""
    result = synthaug.run(synthaug.load_spec(mock_spec(run={"max_images": 2})))
    assert (result.exit_code, result.ok, result.stop_reason) == (4, 2, "budget")


def test_run_inside_an_event_loop_points_to_run_async() -> None:
    """Calling the blocking run() from async code says what to use instead."""
    spec = synthaug.load_spec(mock_spec())

    async def call() -> None:
        synthaug.run(spec)

    with pytest.raises(RuntimeError, match=r"await synthaug\.run_async\(\)"):
        asyncio.run(call())


async def test_run_async_runs_in_the_callers_loop(sandbox: Path) -> None:
    """await run_async() runs the job in the running loop."""
    result = await synthaug.run_async(synthaug.load_spec(mock_spec()))
    assert (result.exit_code, result.ok) == (0, 4)


def test_a_caller_stops_a_run_gracefully_and_it_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RunControl.stop() from another thread: exit 130, consistent manifest, no double pay."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    with ThreadedMock(MockConfig(latency_s=0.05)) as mock:
        path = write_job_spec(tmp_path, mock.base_url, prompts=20, concurrency=2)
        spec = synthaug.load_spec(path)
        control = synthaug.RunControl()
        two_done = threading.Event()
        stopper = threading.Thread(target=lambda: (two_done.wait(60), control.stop()))
        stopper.start()

        def progress(stats: synthaug.Progress) -> None:
            if stats.ok >= 2:
                two_done.set()

        first = run_in_thread(synthaug.run, spec, control=control, on_progress=progress)
        stopper.join()
        assert (first.exit_code, first.stop_reason) == (130, "stopped")
        assert "run again to resume" in (first.message or "")
        assert 2 <= first.ok < 20
        second = run_in_thread(synthaug.run, spec)
        assert second.exit_code == 0
        assert first.ok + second.ok == 20
        assert mock.server.stats.duplicates == 0


def test_a_stop_asked_before_the_run_starts_sends_nothing(sandbox: Path) -> None:
    """A control stopped before run() makes the run end at once, still consistent."""
    control = synthaug.RunControl()
    control.stop()
    result = synthaug.run(synthaug.load_spec(mock_spec()), control=control)
    assert (result.exit_code, result.requests) == (130, 0)


@pytest.mark.slow
def test_a_users_pipeline_module_cannot_shadow_synthaug(tmp_path: Path) -> None:
    """With a DAG folder's own pipeline.py first on sys.path, `import synthaug` still runs."""
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "pipeline.py").write_text("USERS_OWN = True\n")
    script = textwrap.dedent(
        """
        import pipeline
        assert pipeline.USERS_OWN
        import synthaug
        spec = synthaug.load_spec({
            "version": 1, "name": "dag", "backend": {"kind": "mock"}, "output_dir": "out",
            "sources": [{"name": "s", "prompt": "a {red|blue} cat"}],
        })
        result = synthaug.run(spec)
        assert pipeline.USERS_OWN  # still the user's module
        print(result.exit_code, result.ok)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=dags,
        env={"PYTHONPATH": str(dags), "PATH": "/usr/bin:/bin", "NO_PROXY": "*"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "2"]


def test_the_readme_example_uses_only_the_public_api() -> None:
    """The README's scheduler example compiles and names only what synthaug exports."""
    import ast

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    used = {
        node.attr
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "synthaug"
    }
    assert used
    assert used <= set(synthaug.__all__), used - set(synthaug.__all__)
