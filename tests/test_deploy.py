"""The deployment recipes in examples/deploy/ stay runnable: every synthaug command line in
them parses with the real CLI parser, names the shipped spec (or a word-for-word copy of
it), and shards the way its scheduler counts; exit codes 2 and 3 are never retried; no
recipe holds a key. No network, nothing run."""

from __future__ import annotations

import argparse
import configparser
import functools
import re
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from pipeline.api import load_spec
from pipeline.cli import build_parser
from pipeline.jobspec.load import apply_overrides
from pipeline.shard import Shard, parse_shard

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "examples" / "deploy"
SPEC = DEPLOY / "nightly.yaml"
SPEC_ARG = "examples/deploy/nightly.yaml"  # as the recipes name it, from the checkout
K8S_SPEC_ARG = "/config/nightly.yaml"  # the ConfigMap's copy, mounted at /config
YAML_FILES = sorted(p.name for p in DEPLOY.iterdir() if p.suffix in (".yaml", ".yml"))
RECIPES = [
    "crontab",
    "synthaug.service",
    "github-actions.yml",
    "kubernetes-cronjob.yaml",
    "kubernetes-indexed-job.yaml",
    "slurm-array.sh",
]

# What each scheduler puts in place of its variables, as a sample.
SAMPLE_VARS = {
    "${{ matrix.shard }}": "1",
    "$(JOB_COMPLETION_INDEX)": "2",
    "${SLURM_ARRAY_TASK_ID}": "3",
    "$SLURM_ARRAY_TASK_ID": "3",
    "${SLURM_ARRAY_TASK_COUNT}": "10",
    "$SLURM_ARRAY_TASK_COUNT": "10",
}
_SHELL_OPERATOR = re.compile(r"^[;&|<>()]+$")
_SECRET = re.compile(r"\bsk-\w")  # the shape of an OpenAI key


def substitute(text: str) -> str:
    """`text` with every scheduler variable replaced by its sample value."""
    for name, value in SAMPLE_VARS.items():
        text = text.replace(name, value)
    return text


def is_synthaug(word: str) -> bool:
    """Whether a word names the synthaug program (bare or by path)."""
    return PurePosixPath(word).name == "synthaug"


@functools.cache
def subcommands() -> frozenset[str]:
    """The CLI's commands (run, plan, merge, ...), from the parser itself."""
    return frozenset(
        name
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    )


def commands_in_text(text: str) -> list[list[str]]:
    """Every synthaug command in shell-like text (a crontab, a script, ExecStart, a
    workflow's `run:`): its arguments after `synthaug`, up to the next shell operator,
    with the scheduler variables substituted."""
    found = []
    commands = subcommands()
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(substitute(line), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        words = list(lexer)
        for start, word in enumerate(words):
            # `synthaug COMMAND`: not a path that merely ends in synthaug (cd /srv/synthaug)
            following = words[start + 1 : start + 2]
            if not is_synthaug(word) or not following or following[0] not in commands:
                continue
            args = []
            for arg in words[start + 1 :]:
                if _SHELL_OPERATOR.match(arg):
                    break
                args.append(arg)
            found.append(args)
    return found


def parsed(args: list[str]) -> Any:
    """`args` through the real CLI parser (exits 2 on a bad flag: the test fails)."""
    assert not any("$" in arg for arg in args), f"an unsubstituted variable in {args}"
    return build_parser().parse_args(args)


def yaml_docs(name: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def walk(node: Any) -> Iterator[Any]:
    """Every mapping and list in a YAML tree, depth first."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def run_shard(args: list[str], spec_arg: str) -> Shard | None:
    """Checks a `synthaug run` command line; its shard (None for a run of every item)."""
    ns = parsed(args)
    assert ns.command == "run", args
    assert str(ns.spec) == spec_arg, args
    assert ns.no_progress, f"a scheduled run draws no progress bar: {args}"
    return None if ns.shard is None else parse_shard(ns.shard)


# --- every file -------------------------------------------------------------------------


def test_the_folder_holds_the_recipes() -> None:
    names = {p.name for p in DEPLOY.iterdir()}
    assert names >= {"nightly.yaml", "synthaug.timer", *RECIPES}


@pytest.mark.parametrize("name", YAML_FILES)
def test_yaml_files_parse(name: str) -> None:
    assert yaml_docs(name), f"{name} holds no YAML document"


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.iterdir()))
def test_no_recipe_holds_a_key(name: str) -> None:
    """Keys come from the environment or a secret store, never from a file here."""
    text = (DEPLOY / name).read_text()
    assert not _SECRET.search(text), f"{name} holds what looks like an API key"
    for line in text.splitlines():  # OPENAI_API_KEY=<value> only as a placeholder
        match = re.search(r"OPENAI_API_KEY=([^\s\"']+)", line)
        if match:
            assert match[1] in ("...", '"$OPENAI_API_KEY"') or match[1].startswith("$"), line


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_synthaug(name: str) -> None:
    """Each recipe yields at least one `synthaug run` of the shipped spec, and every
    synthaug command line in it parses."""
    runs = recipe_runs(name)
    assert runs, f"{name}: no `synthaug run` command found"
    for args in runs:
        assert str(parsed(args).spec) in (SPEC_ARG, K8S_SPEC_ARG), args


def recipe_runs(name: str) -> list[list[str]]:
    """The `synthaug run` argument lists of a recipe; its other synthaug commands parse."""
    if name.startswith("kubernetes-"):
        commands = k8s_commands(name)
    elif name == "github-actions.yml":
        commands = [c for step in workflow_steps() for c in commands_in_text(step.get("run", ""))]
    elif name == "synthaug.service":
        commands = commands_in_text(systemd("synthaug.service")["Service"]["ExecStart"])
    else:
        commands = commands_in_text((DEPLOY / name).read_text())
    for args in commands:
        parsed(args)
    return [args for args in commands if args[:1] == ["run"]]


# --- the spec -----------------------------------------------------------------------------


def test_the_spec_loads_with_a_current_model_and_a_budget() -> None:
    spec = load_spec(SPEC)
    assert spec.backend.kind == "openai"
    assert spec.backend.api_key_env == "OPENAI_API_KEY"
    assert spec.params.model == "gpt-image-2"
    assert spec.run.max_cost_usd is not None or spec.run.max_images is not None
    assert spec.run.rate_limit is not None
    assert spec.run.concurrency >= 1
    assert any(source.vars for source in spec.sources)
    assert spec.output_dir == Path("/var/lib/synthaug/nightly")


# --- cron and systemd ---------------------------------------------------------------------


def systemd(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / name).read_text())
    return parser


def test_crontab_runs_nightly_at_two_from_the_checkout() -> None:
    lines = [
        line
        for line in (DEPLOY / "crontab").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "synthaug run" in line
    ]
    assert len(lines) == 1
    line = lines[0]
    assert line.split()[:5] == ["0", "2", "*", "*", "*"]
    assert "%" not in line  # cron turns % into a newline
    assert re.search(r"\bcd \S+ && ", line)
    assert re.search(r"\. /\S+", line), "the env file is sourced"
    assert ">> " in line, "the log is appended to"
    assert [run_shard(args, SPEC_ARG) for args in recipe_runs("crontab")] == [None]


def test_systemd_units() -> None:
    service, timer = systemd("synthaug.service"), systemd("synthaug.timer")
    unit = service["Service"]
    assert unit["Type"] == "oneshot"
    assert unit["EnvironmentFile"].startswith("/")
    assert unit["ExecStart"].startswith("/"), "ExecStart names synthaug by its full path"
    assert [run_shard(args, SPEC_ARG) for args in recipe_runs("synthaug.service")] == [None]
    assert {"2", "3"} <= set(unit["RestartPreventExitStatus"].split())
    assert "4" in unit["SuccessExitStatus"].split()
    assert unit["KillSignal"] == "SIGTERM"
    grace = load_spec(SPEC).run.grace_period_s
    assert int(unit["TimeoutStopSec"]) > grace
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:00:00"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "synthaug.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


# --- GitHub Actions -----------------------------------------------------------------------


def workflow() -> dict[Any, Any]:
    (doc,) = yaml_docs("github-actions.yml")
    assert isinstance(doc, dict)
    return doc


def workflow_steps() -> list[dict[str, Any]]:
    return [step for job in workflow()["jobs"].values() for step in job["steps"]]


def test_github_actions_workflow() -> None:
    doc = workflow()
    triggers = doc["on"] if "on" in doc else doc[True]  # YAML 1.1 reads a bare `on` as true
    assert set(triggers) == {"schedule", "workflow_dispatch"}
    generate = doc["jobs"]["generate"]
    strategy = generate["strategy"]
    assert strategy["fail-fast"] is False
    assert strategy["max-parallel"] >= 1
    shards = strategy["matrix"]["shard"]
    assert generate["env"]["OPENAI_API_KEY"] == "${{ secrets.OPENAI_API_KEY }}"

    run_steps = [s for s in generate["steps"] if "synthaug run" in s.get("run", "")]
    (run_args,) = [a for s in run_steps for a in commands_in_text(s["run"])]
    shard = run_shard(run_args, SPEC_ARG)
    assert shard is not None
    assert shard.index == 1  # the sample value of ${{ matrix.shard }}
    assert sorted(shards) == list(range(shard.count)), "the matrix covers shards 0..N-1"
    out = str(parsed(run_args).out)

    # each shard's OUT is restored before the run and saved after it, keyed by shard
    caches = [s for s in generate["steps"] if s.get("uses", "").startswith("actions/cache/")]
    assert {s["uses"].split("@")[0] for s in caches} == {
        "actions/cache/restore",
        "actions/cache/save",
    }
    for step in caches:
        assert step["with"]["path"] == out
        assert "${{ matrix.shard }}" in step["with"]["key"]
    save = next(s for s in caches if "save" in s["uses"])
    assert save["if"] == "always()"

    merge_steps = doc["jobs"]["merge"]["steps"]
    commands = [a for s in merge_steps for a in commands_in_text(s.get("run", ""))]
    assert ["merge", out] in commands
    download = next(s for s in merge_steps if "download-artifact" in s.get("uses", ""))
    assert download["with"]["path"] == out


# --- Kubernetes ---------------------------------------------------------------------------


def k8s_workload(name: str) -> dict[str, Any]:
    (workload,) = [d for d in yaml_docs(name) if d["kind"] in ("Job", "CronJob")]
    return dict(workload)


def job_spec(name: str) -> dict[str, Any]:
    workload = k8s_workload(name)
    if workload["kind"] == "CronJob":
        return dict(workload["spec"]["jobTemplate"]["spec"])
    return dict(workload["spec"])


def k8s_container(name: str) -> dict[str, Any]:
    (container,) = job_spec(name)["template"]["spec"]["containers"]
    return dict(container)


def k8s_commands(name: str) -> list[list[str]]:
    commands = []
    for node in walk(yaml_docs(name)):
        if isinstance(node, dict) and "image" in node:
            argv = [*node.get("command", []), *node.get("args", [])]
            if argv and is_synthaug(argv[0]):
                commands.append([substitute(str(arg)) for arg in argv[1:]])
    return commands


@pytest.mark.parametrize("name", ["kubernetes-cronjob.yaml", "kubernetes-indexed-job.yaml"])
def test_kubernetes_spec_volume_and_key(name: str) -> None:
    docs = yaml_docs(name)
    by_kind = {doc["kind"]: doc for doc in docs}
    pod = job_spec(name)["template"]["spec"]
    container = k8s_container(name)
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] > load_spec(SPEC).run.grace_period_s

    # the spec: a ConfigMap holding nightly.yaml word for word, mounted where args say
    config_map = by_kind["ConfigMap"]
    assert config_map["data"]["nightly.yaml"] == SPEC.read_text()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    spec_volume = volumes[mounts[str(PurePosixPath(K8S_SPEC_ARG).parent)]]
    assert spec_volume["configMap"]["name"] == config_map["metadata"]["name"]

    env = {e["name"]: e for e in container["env"]}
    (args,) = recipe_runs(name)
    out = parsed(args).out
    if out is None:
        # OUT: a ReadWriteMany claim mounted at (a parent of) the spec's output_dir
        claim = by_kind["PersistentVolumeClaim"]
        assert "ReadWriteMany" in claim["spec"]["accessModes"]
        output_dir = PurePosixPath(load_spec(SPEC).output_dir)
        out_mounts = [p for p in mounts if output_dir.is_relative_to(p)]
        assert len(out_mounts) == 1
        out_volume = volumes[mounts[out_mounts[0]]]
        assert out_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    else:
        # OUT in a bucket: its credentials from a Secret, the staging folder on a volume
        assert str(out).startswith("s3://")
        assert apply_overrides(load_spec(SPEC), output_dir=out).output_url == str(out)
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[variable]
            assert env[variable]["valueFrom"]["secretKeyRef"]["key"] == variable
        staging = env["SYNTHAUG_STAGING"]["value"]
        assert "emptyDir" in volumes[mounts[staging]]

    # the key: from a Secret, never a value
    key = env["OPENAI_API_KEY"]
    assert "value" not in key
    assert key["valueFrom"]["secretKeyRef"]["key"] == "OPENAI_API_KEY"


def failure_rules(name: str, action: str) -> set[int]:
    """The exit codes a podFailurePolicy rule with `action` covers."""
    codes: set[int] = set()
    for rule in job_spec(name)["podFailurePolicy"]["rules"]:
        on_exit = rule.get("onExitCodes")
        if rule["action"] == action and on_exit and on_exit["operator"] == "In":
            codes.update(on_exit["values"])
    return codes


def test_kubernetes_cronjob() -> None:
    workload = k8s_workload("kubernetes-cronjob.yaml")
    assert workload["spec"]["concurrencyPolicy"] == "Forbid"
    assert workload["spec"]["schedule"] == "0 2 * * *"
    assert {2, 3} <= failure_rules("kubernetes-cronjob.yaml", "FailJob")
    runs = recipe_runs("kubernetes-cronjob.yaml")
    assert [run_shard(args, K8S_SPEC_ARG) for args in runs] == [None]


def test_kubernetes_indexed_job() -> None:
    name = "kubernetes-indexed-job.yaml"
    spec = job_spec(name)
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 0
    assert {2, 3} <= failure_rules(name, "FailIndex")
    disruption = [
        r
        for r in spec["podFailurePolicy"]["rules"]
        if {"type": "DisruptionTarget"} in r.get("onPodConditions", [])
    ]
    assert [r["action"] for r in disruption] == ["Ignore"]  # an evicted shard resumes

    (args,) = recipe_runs(name)
    shard = run_shard(args, K8S_SPEC_ARG)
    assert shard is not None
    assert shard.index == 2  # the sample value of $(JOB_COMPLETION_INDEX)
    assert shard.count == spec["completions"]
    for index in range(spec["completions"]):  # every index a pod gets is a valid shard
        assert parse_shard(args[args.index("--shard") + 1].replace("2/", f"{index}/", 1))
    # $(VAR) in args is expanded from the container's env: the index must be there
    env = {e["name"] for e in k8s_container(name)["env"]}
    assert "JOB_COMPLETION_INDEX" in env


# --- Slurm --------------------------------------------------------------------------------


def test_slurm_array_shards_match_the_array() -> None:
    text = (DEPLOY / "slurm-array.sh").read_text()
    assert text.startswith("#!/bin/bash\n")
    match = re.search(r"^#SBATCH --array=(\d+)-(\d+)(?:%(\d+))?$", text, re.M)
    assert match, "an #SBATCH --array=FIRST-LAST%MAX line"
    first, last = int(match[1]), int(match[2])
    assert match[3] is not None, "a limit on the tasks running at once (%M)"
    assert re.search(r"^#SBATCH --signal=B:TERM@\d+$", text, re.M)

    (args,) = recipe_runs("slurm-array.sh")
    assert re.search(r"^exec synthaug run ", text, re.M), "exec: SIGTERM reaches synthaug"
    shard = run_shard(args, SPEC_ARG)
    assert shard is not None
    assert shard.index == 3  # the sample value of $SLURM_ARRAY_TASK_ID
    assert first == 0
    assert last < shard.count
    assert last - first + 1 == shard.count, "the array runs every shard of N"
    assert parsed(args).out is not None, "OUT on the shared filesystem, by --out"


def test_doc_page_names_every_recipe() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for name in [*RECIPES, "synthaug.timer", "nightly.yaml"]:
        assert f"(../examples/deploy/{name})" in text, f"docs/deploy.md does not link {name}"
    assert "s3://" in text  # the bucket-backed recipe is described
