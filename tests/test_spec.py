"""The job spec: defaults, overrides, credentials, and one clear error per mistake."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from pipeline.credentials import read_api_key
from pipeline.errors import CredentialsError, SpecError, UsageError
from pipeline.jobspec.fields import parse_rate
from pipeline.jobspec.load import apply_overrides, load_spec
from pipeline.jobspec.model import BackendSettings

HEAD = """\
version: 1
name: job
backend:
  kind: mock
sources:
"""  # sources start on line 6


def write_png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def spec_text(body: str, head: str = HEAD) -> str:
    return head + textwrap.dedent(body)


def load_error(spec_factory: Callable[..., Path], text: str) -> SpecError:
    spec_factory(text)
    with pytest.raises(SpecError) as info:
        load_spec("spec.yaml")
    return info.value


# (spec text, files to create, key path, line, words in the message)
ERROR_CASES = [
    pytest.param("version: 1\nname: [oops\n", {}, "", 3, "invalid YAML", id="yaml-syntax"),
    pytest.param("", {}, "", None, "the spec is empty", id="empty-file"),
    pytest.param(
        "version: 1\nname: job\nsources: &x [*x]\n",
        {},
        "sources[0]",
        3,
        "expected a mapping, got a list",
        id="recursive-alias",
    ),
    pytest.param("- a\n- b\n", {}, "", 1, "top level must be a mapping", id="top-level-list"),
    pytest.param(
        "version: 1\nname: job\nname: again\n", {}, "name", 3, "duplicate key", id="duplicate-key"
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nrun:\n  concurency: 4\n",
        {},
        "run.concurency",
        9,
        "unknown key 'concurency' (did you mean 'concurrency'?)",
        id="unknown-key-near-miss",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    params:\n      qualty: high\n",
        {},
        "sources[0].params.qualty",
        9,
        "unknown key 'qualty' (did you mean 'quality'?)",
        id="nested-unknown-key",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\ncolour: red\n",
        {},
        "colour",
        8,
        "unknown key 'colour'",
        id="unknown-key",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nrun:\n  concurrency: four\n",
        {},
        "run.concurrency",
        9,
        "expected an integer, got 'four'",
        id="wrong-type-int",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    repeats: [1]\n",
        {},
        "sources[0].repeats",
        8,
        "expected an integer, got a list",
        id="wrong-type-list",
    ),
    pytest.param(
        HEAD + "  - name: a\n    repeats: 2\n",
        {},
        "sources[0].prompt",
        6,
        "required key is missing",
        id="missing-key-uses-parent-line",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    images: ['missing/*.png']\n",
        {},
        "sources[0].images[0]",
        8,
        "no files match missing/*.png",
        id="glob-matches-nothing",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    folder: nowhere\n",
        {},
        "sources[0].folder",
        8,
        "nowhere does not exist",
        id="folder-missing",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    folder: data\n",
        {"data/notes.txt": b"hello"},
        "sources[0].folder",
        8,
        "no images in data (extensions .jpg, .jpeg, .png, .webp)",
        id="folder-empty",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    images: ['data/*.png']\n",
        {"data/fake.png": b"not an image at all"},
        "sources[0].images[0]",
        8,
        "is not an image Pillow can read",
        id="file-not-an-image",
    ),
    pytest.param(
        HEAD
        + "  - name: a\n    prompt: x\n    urls: ['https://a.example/x.jpg', 'ftp://b/y.jpg']\n",
        {},
        "sources[0].urls[1]",
        8,
        "expected an http(s) URL, got 'ftp://b/y.jpg'",
        id="url-not-http",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: 'a {colour} cat'\n    vars: {color: [red]}\n",
        {},
        "sources[0].prompt",
        7,
        "placeholder {colour} has no values in vars (did you mean 'color'?)",
        id="placeholder-without-values",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: 'a cat'\n    vars:\n      colour: [red]\n",
        {},
        "sources[0].vars.colour",
        9,
        "'colour' is not used in the prompt",
        id="var-without-placeholder",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n  - name: a\n    prompt: y\n",
        {},
        "sources[1].name",
        8,
        "duplicate source name 'a'",
        id="duplicate-source-name",
    ),
    pytest.param(
        HEAD + "  - name: ../up\n    prompt: x\n",
        {},
        "sources[0].name",
        6,
        "is not a safe name",
        id="unsafe-source-name",
    ),
    pytest.param(
        HEAD + "  - name: '..'\n    prompt: x\n",
        {},
        "sources[0].name",
        6,
        "is not a safe name",
        id="dotdot-source-name",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nrun:\n  concurrency: 0\n",
        {},
        "run.concurrency",
        9,
        "must be at least 1, got 0",
        id="zero-concurrency",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nrun:\n  max_attempts: -1\n",
        {},
        "run.max_attempts",
        9,
        "must be at least 1, got -1",
        id="negative-max-attempts",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nrun:\n  rate_limit: 0/min\n",
        {},
        "run.rate_limit",
        9,
        "a rate must be greater than 0",
        id="zero-rate",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nrun:\n  image_rate_limit: fast\n",
        {},
        "run.image_rate_limit",
        9,
        "expected a rate like 5/min",
        id="unparsable-rate",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nrun:\n  max_cost_usd: 0\n",
        {},
        "run.max_cost_usd",
        9,
        "must be greater than 0",
        id="zero-cost-budget",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: '{x} {y}'\n    vars: {x: [1, 2], y: [a]}\n"
        "    combine: zip\n",
        {},
        "sources[0].vars",
        8,
        "zip needs lists of equal length (x has 2, y has 1)",
        id="zip-unequal",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: '{x}'\n    vars: {x: [1, 2]}\n"
        "    combine: sample\n    samples: 3\n",
        {},
        "sources[0].samples",
        10,
        "samples: 3 is more than the 2 combinations",
        id="sample-too-many",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    combine: sample\n",
        {},
        "sources[0].samples",
        6,
        "required with combine: sample",
        id="sample-without-samples",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    seed: 3\n",
        {},
        "sources[0].seed",
        8,
        "only applies with combine: sample",
        id="seed-without-sample",
    ),
    pytest.param(
        "version: 2\nname: job\nsources: [{name: a, prompt: x}]\n",
        {},
        "version",
        1,
        "unsupported version 2",
        id="version-2",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    roboflow_ids: [abc]\n    urls: ['https://x/y']\n",
        {},
        "sources[0].urls",
        9,
        "one input kind, found roboflow_ids and urls",
        id="two-input-kinds",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    recursive: true\n",
        {},
        "sources[0].recursive",
        8,
        "only applies to a folder source",
        id="recursive-without-folder",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\n    params: {force_caption_regenerate: true}\n",
        {},
        "sources[0].params.force_caption_regenerate",
        8,
        "only applies to roboflow_ids",
        id="force-caption-without-ids",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: '{x}'\n    vars: {x: []}\n",
        {},
        "sources[0].vars.x",
        8,
        "needs at least one value",
        id="empty-var-list",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: 'a {x'\n",
        {},
        "sources[0].prompt",
        7,
        "unclosed '{'",
        id="unclosed-brace",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: 'a __colours__ cat'\n",
        {},
        "sources[0].prompt",
        7,
        "wildcards/colours.txt does not exist",
        id="wildcard-file-missing",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nparams:\n  size: big\n",
        {},
        "params.size",
        9,
        "expected auto or WIDTHxHEIGHT like 1024x1024, got 'big'",
        id="bad-size",
    ),
    pytest.param(
        HEAD + "  - name: a\n    prompt: x\nparams:\n  n: 0\n",
        {},
        "params.n",
        9,
        "must be at least 1, got 0",
        id="zero-n",
    ),
    pytest.param(
        "version: 1\nname: job\nsources: []\n",
        {},
        "sources",
        3,
        "must not be empty",
        id="no-sources",
    ),
    pytest.param(
        "version: 1\nname: job\nproject_url: p\nbackend:\n  kind: roboflow\n"
        "  base_url: http://api.example.com\nsources: [{name: a, prompt: x}]\n",
        {},
        "backend.base_url",
        6,
        "plain http would send the API key in clear",
        id="insecure-http",
    ),
    pytest.param(
        "version: 1\nname: job\nsources: [{name: a, prompt: x}]\n",
        {},
        "project_url",
        1,
        "required for backend roboflow",
        id="roboflow-needs-project",
    ),
    pytest.param(
        "version: 1\nname: job\nbackend:\n  kind: dalle\nsources: [{name: a, prompt: x}]\n",
        {},
        "backend.kind",
        4,
        "expected 'roboflow', 'openai' or 'mock', got 'dalle'",
        id="bad-literal",
    ),
]


@pytest.mark.parametrize(("text", "files", "key_path", "line", "words"), ERROR_CASES)
def test_spec_error_names_file_key_and_line(
    spec_factory: Callable[..., Path],
    sandbox: Path,
    text: str,
    files: dict[str, bytes],
    key_path: str,
    line: int | None,
    words: str,
) -> None:
    """Each user mistake is one SpecError naming file, key path, line and the problem."""
    for name, data in files.items():
        (sandbox / name).parent.mkdir(parents=True, exist_ok=True)
        (sandbox / name).write_bytes(data)
    error = load_error(spec_factory, text)
    assert (error.file, error.key_path, error.line) == ("spec.yaml", key_path, line)
    assert words in str(error)
    where = "spec.yaml" if line is None else f"spec.yaml:{line}"
    assert str(error).startswith(f"{where} {key_path}: " if key_path else f"{where}: ")


def test_error_message_reads_as_one_line(spec_factory: Callable[..., Path]) -> None:
    """The message is exactly `file:line key.path: reason`, ready for the CLI to print."""
    error = load_error(
        spec_factory, HEAD + "  - name: a\n    prompt: x\nrun:\n  concurrency: four\n"
    )
    assert str(error) == "spec.yaml:9 run.concurrency: expected an integer, got 'four'"


def test_one_error_is_shown_and_the_rest_counted(spec_factory: Callable[..., Path]) -> None:
    """Independent mistakes: the first is reported, the others counted, echoes dropped."""
    text = HEAD + "  - name: a\n    prompt: x\n    params: {qualty: v}\nrun:\n  max_attempts: x\n"
    error = load_error(spec_factory, text)
    assert str(error).endswith("(did you mean 'quality'?) (and 1 more problem)")


def test_oversized_input_is_refused(spec_factory: Callable[..., Path], sandbox: Path) -> None:
    """An input file over 25 MB is a spec error, found without reading the file."""
    with (sandbox / "big.png").open("wb") as fh:
        fh.truncate(26 * 1024 * 1024)  # sparse: no disk, no time
    error = load_error(spec_factory, HEAD + "  - name: a\n    prompt: x\n    images: [big.png]\n")
    assert "26.0 MB; the API takes images up to 25 MB" in str(error)
    assert error.line == 8


def test_non_utf8_spec_names_the_line(sandbox: Path) -> None:
    """A spec that is not UTF-8 fails with the line of the bad byte, not a traceback."""
    (sandbox / "spec.yaml").write_bytes(b"version: 1\nname: caf\xe9\n")
    with pytest.raises(SpecError, match=r"spec\.yaml:2: not UTF-8 text \(byte 0xe9\)"):
        load_spec("spec.yaml")


def test_missing_spec_file_is_a_spec_error() -> None:
    """A spec path that does not exist fails with one line."""
    with pytest.raises(SpecError, match="cannot read the spec: No such file"):
        load_spec("nope.yaml")


@pytest.mark.parametrize(
    "pattern", [pytest.param("data", id="folder"), pytest.param("**", id="glob")]
)
def test_symlink_loops_do_not_hang(
    spec_factory: Callable[..., Path], sandbox: Path, pattern: str
) -> None:
    """Directory symlink loops are not followed by folder walks or ** globs."""
    write_png(sandbox / "data" / "a.png")
    os.symlink(sandbox / "data", sandbox / "data" / "loop")
    os.symlink(sandbox / "data", sandbox / "data" / "loop2")
    source = (
        "    folder: data\n    recursive: true\n"
        if pattern == "data"
        else "    images: ['data/**/*.png']\n"
    )
    spec_factory(HEAD + "  - name: a\n    prompt: x\n" + source)
    spec = load_spec("spec.yaml")
    assert [p.name for p in spec.sources[0].iter_files(spec.spec_dir)] == ["a.png"]


def test_defaults_for_mock_and_real_backends(spec_factory: Callable[..., Path]) -> None:
    """Mock has no rate limit by default; a real backend starts at 5/min and 4 in flight."""
    mock = load_spec(spec_factory())
    real = load_spec(spec_factory(backend={"kind": "roboflow"}, project_url="p"))
    assert (mock.run.concurrency, mock.run.rate_limit) == (4, None)
    assert real.run.concurrency == 4
    assert real.run.rate_limit == pytest.approx(5 / 60)
    assert real.backend.base_url == "https://api.roboflow.com"
    assert real.params.request_params() == {}  # nothing sent the spec did not set


def test_output_dir_is_relative_to_the_spec_folder(
    spec_factory: Callable[..., Path], sandbox: Path
) -> None:
    """output_dir resolves against the spec's folder, not the cwd; default runs/<name>."""
    default = load_spec(spec_factory(filename="jobs/a.yaml"))
    given = load_spec(spec_factory(filename="jobs/b.yaml", output_dir="out/x"))
    assert default.output_dir == sandbox / "jobs" / "runs" / "job"
    assert given.output_dir == sandbox / "jobs" / "out" / "x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("5/min", 5 / 60, id="per-minute"),
        pytest.param("2/s", 2.0, id="per-second"),
        pytest.param("360/h", 0.1, id="per-hour"),
        pytest.param("0.5", 0.5, id="bare-string"),
        pytest.param(3, 3.0, id="bare-number"),
        pytest.param(" 10 / min ", 10 / 60, id="spaces"),
    ],
)
def test_parse_rate(text: str | float, expected: float) -> None:
    """Rates read as N/s, N/min, N/h or a number per second."""
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0", "-1/s", "5/fortnight", "fast", "inf"])
def test_parse_rate_rejects(text: str) -> None:
    """Non-positive or unreadable rates are refused."""
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_overrides_apply_and_revalidate(spec_factory: Callable[..., Path], sandbox: Path) -> None:
    """CLI flags replace spec values; switching backend recomputes the default rate."""
    spec = load_spec(spec_factory(project_url="p"))
    out = apply_overrides(
        spec,
        backend="roboflow",
        concurrency=2,
        max_attempts=3,
        max_images=10,
        output_dir="elsewhere",
        retry_failed=False,
    )
    assert out.backend.kind == "roboflow"
    assert out.run.rate_limit == pytest.approx(5 / 60)
    assert (out.run.concurrency, out.run.max_attempts, out.run.max_images) == (2, 3, 10)
    assert out.output_dir == sandbox / "elsewhere"
    assert out.run.retry_failed is False
    assert apply_overrides(out, rate_limit="1/s").run.rate_limit == 1.0
    assert spec.backend.kind == "mock"  # the original is untouched


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        pytest.param({"concurrency": 0}, "--concurrency", id="zero-concurrency"),
        pytest.param({"rate_limit": "zero"}, "--rate", id="bad-rate"),
        pytest.param({"backend": "dalle"}, "--backend", id="bad-backend"),
        pytest.param({"max_images": -3}, "--max-images", id="negative-max-images"),
    ],
)
def test_bad_override_is_a_usage_error(
    spec_factory: Callable[..., Path], flags: dict[str, object], words: str
) -> None:
    """A bad flag value is a UsageError naming the flag."""
    spec = load_spec(spec_factory())
    with pytest.raises(UsageError, match=words):
        apply_overrides(spec, **flags)  # type: ignore[arg-type]


def test_override_that_breaks_the_spec_is_a_spec_error(spec_factory: Callable[..., Path]) -> None:
    """--backend roboflow on a spec without project_url fails like the YAML would."""
    spec = load_spec(spec_factory())
    with pytest.raises(SpecError, match="project_url: required for backend roboflow"):
        apply_overrides(spec, backend="roboflow")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:8377", id="ipv4-loopback"),
        pytest.param("http://localhost:8377", id="localhost"),
        pytest.param("http://[::1]:8377", id="ipv6-loopback"),
    ],
)
def test_plain_http_to_loopback_is_allowed(spec_factory: Callable[..., Path], url: str) -> None:
    """A local server may be plain http: the key never leaves the machine."""
    spec = load_spec(spec_factory(backend={"kind": "roboflow", "base_url": url}, project_url="p"))
    assert spec.backend.base_url == url


def test_insecure_http_can_be_allowed(spec_factory: Callable[..., Path]) -> None:
    """allow_insecure_http: true lets a plain http base_url through."""
    backend = {"kind": "roboflow", "base_url": "http://gw.internal", "allow_insecure_http": True}
    assert load_spec(spec_factory(backend=backend, project_url="p")).backend.allow_insecure_http


def test_spec_is_frozen(spec_factory: Callable[..., Path]) -> None:
    """Settings cannot be changed after loading (overrides make a new spec)."""
    spec = load_spec(spec_factory())
    with pytest.raises(ValueError, match="frozen"):
        spec.run.concurrency = 9


def test_api_key_is_read_from_the_named_variable() -> None:
    """The key comes from backend.api_key_env; mock needs none."""
    backend = BackendSettings(kind="roboflow", api_key_env="MY_KEY")
    assert read_api_key(backend, {"MY_KEY": "secret"}) == "secret"
    assert read_api_key(BackendSettings(kind="mock"), {}) == ""


@pytest.mark.parametrize(
    ("environ", "state"),
    [
        pytest.param({}, "is not set", id="unset"),
        pytest.param({"ROBOFLOW_API_KEY": " "}, "is empty", id="blank"),
    ],
)
def test_missing_api_key_names_the_fix(environ: dict[str, str], state: str) -> None:
    """A missing key fails with the exact export command to fix it."""
    with pytest.raises(CredentialsError) as info:
        read_api_key(BackendSettings(kind="roboflow"), environ)
    assert f"ROBOFLOW_API_KEY {state}" in str(info.value)
    assert "export ROBOFLOW_API_KEY=..." in str(info.value)
