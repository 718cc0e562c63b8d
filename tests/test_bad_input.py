"""Bad input catalogue: broken specs, inputs and command lines, through `synthaug` itself.

Every case must exit 2 with exactly one line on stderr that names what to fix (the spec
file, key path and line where there is one), and send nothing: each spec points at a
live mock API whose request counter must stay at zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from checks import ThreadedMock

from pipeline.cli import main
from pipeline.mockapi.server import MockConfig

KEY = "sk-bad-input-93d2"

# Lines 1-8 of every spec below; case text starts at line 9.
HEAD = """\
version: 1
name: bad
output_dir: out
backend:
  kind: roboflow
  base_url: BASE_URL
  timeout_s: 5
project_url: p
"""
RUN = "run:\n  rate_limit: 1000/s\n"  # lines 9-10
SOURCE = "sources:\n  - name: s\n    prompt: a cat\n"  # lines 11-13 after RUN
GOOD = HEAD + RUN + SOURCE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def source(*lines: str, name: str = "s") -> str:
    """RUN, then one source named `name` (line 12) whose keys are `lines` (from line 13)."""
    body = "".join(f"    {line}\n" for line in lines)
    return HEAD + RUN + f"sources:\n  - name: {name}\n" + body


def sparse_png(path: Path, size: int) -> None:
    """A file of `size` bytes starting with a PNG header, without writing them all."""
    with path.open("wb") as fh:
        fh.write(PNG_SIGNATURE)
        fh.truncate(size)


def symlink_loop(folder: Path) -> None:
    """A folder whose only entries are a file symlink to itself and a link to '.'."""
    folder.mkdir(exist_ok=True)
    (folder / "self.png").symlink_to("self.png")
    (folder / "loop").symlink_to(".", target_is_directory=True)


@dataclass(frozen=True)
class Bad:
    """One broken input: the spec (HEAD-based unless whole), extra files and arguments,
    and what the one line on stderr must say."""

    spec: str | bytes
    fragment: str
    key_path: str = ""
    line: int | None = None
    files: Mapping[str, str | bytes] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    args: tuple[str, ...] = ()
    command: str = "run"
    spec_arg: str = "spec.yaml"
    with_key: bool = True


CASES = [
    # ---- the spec file itself
    pytest.param(Bad("version: 1\nname: [oops\n", "invalid YAML", line=3), id="yaml-syntax-error"),
    pytest.param(Bad(HEAD + "run:\n\tconcurrency: 2\n", "invalid YAML", line=10), id="yaml-tab"),
    pytest.param(Bad("", "the spec is empty"), id="empty-file"),
    pytest.param(Bad("# all\n# commented out\n", "the spec is empty"), id="only-comments"),
    pytest.param(Bad(bytes(range(256)) * 4, "not UTF-8", line=2), id="binary-junk-spec"),
    pytest.param(Bad("\x00\x01\x02\x03 junk\n", "invalid YAML", line=1), id="control-chars"),
    pytest.param(
        Bad(
            (HEAD + RUN + "sources:\n  - name: s\n    prompt: caf\xe9\n").encode("latin-1"),
            "not UTF-8",
            line=13,
        ),
        id="non-utf8-prompt",
    ),
    pytest.param(Bad("- version: 1\n", "top level must be a mapping", line=1), id="top-list"),
    pytest.param(
        Bad(
            HEAD + RUN + SOURCE + "lol0: &a [x, x, x, x, x, x, x, x, x]\n"
            "lol1: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "lol2: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
            "lol3: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
            "unknown key 'lol0'",
            "lol0",
            14,
        ),
        id="yaml-alias-bomb",
    ),
    pytest.param(Bad(GOOD + "name: again\n", "duplicate key", "name", 14), id="duplicate-key"),
    # ---- unknown, misspelled and missing keys
    pytest.param(
        Bad(
            HEAD + RUN + "sourcess:\n  - name: s\n    prompt: a\n",
            "did you mean 'sources'",
            "sourcess",
            11,
        ),
        id="misspelled-top-key",
    ),
    pytest.param(
        Bad(
            HEAD + "run:\n  concurency: 2\n" + SOURCE,
            "did you mean 'concurrency'",
            "run.concurency",
            10,
        ),
        id="misspelled-run-key",
    ),
    pytest.param(
        Bad(source("prompt: a", "promt: b"), "did you mean 'prompt'", "sources[0].promt", 14),
        id="misspelled-source-key",
    ),
    pytest.param(
        Bad(GOOD + "api_key: sk-in-yaml\n", "unknown key 'api_key'", "api_key", 14),
        id="key-in-yaml",
    ),
    pytest.param(
        Bad(GOOD.replace("name: bad\n", ""), "required key is missing", "name", 1),
        id="missing-name",
    ),
    pytest.param(
        Bad(
            GOOD.replace("project_url: p\n", ""), "required for backend roboflow", "project_url", 1
        ),
        id="missing-project-url",
    ),
    pytest.param(Bad(GOOD.replace("version: 1", "version: 2"), "version 2", "version", 1), id="v2"),
    # ---- wrong types and absurd values
    pytest.param(
        Bad(
            HEAD + "run:\n  concurrency: four\n" + SOURCE,
            "expected an integer",
            "run.concurrency",
            10,
        ),
        id="concurrency-not-int",
    ),
    pytest.param(
        Bad(HEAD + "run:\n  concurrency: 0\n" + SOURCE, "at least 1", "run.concurrency", 10),
        id="concurrency-0",
    ),
    pytest.param(
        Bad(HEAD + "run:\n  concurrency: -1\n" + SOURCE, "at least 1", "run.concurrency", 10),
        id="concurrency-negative",
    ),
    pytest.param(
        Bad(HEAD + "run:\n  concurrency: 1000000000\n" + SOURCE, "at most", "run.concurrency", 10),
        id="concurrency-1e9",
    ),
    pytest.param(
        Bad(
            HEAD + "run:\n  rate_limit: fast\n" + SOURCE,
            "expected a rate like",
            "run.rate_limit",
            10,
        ),
        id="rate-fast",
    ),
    pytest.param(
        Bad(HEAD + "run:\n  rate_limit: 0/min\n" + SOURCE, "greater than 0", "run.rate_limit", 10),
        id="rate-zero",
    ),
    pytest.param(
        Bad(HEAD + "run:\n  max_attempts: 1000000\n" + SOURCE, "at most", "run.max_attempts", 10),
        id="max-attempts-1e6",
    ),
    pytest.param(
        Bad(
            HEAD + "run:\n  grace_period_s: .inf\n" + SOURCE,
            "finite number",
            "run.grace_period_s",
            10,
        ),
        id="grace-infinite",
    ),
    pytest.param(
        Bad(
            HEAD + "run:\n  max_cost_usd: .nan\n" + SOURCE, "finite number", "run.max_cost_usd", 10
        ),
        id="cost-nan",
    ),
    pytest.param(
        Bad(
            HEAD + "run:\n  max_images: 2.5\n" + SOURCE, "expected an integer", "run.max_images", 10
        ),
        id="max-images-fraction",
    ),
    pytest.param(
        Bad(
            HEAD.replace("timeout_s: 5", "timeout_s: 0") + RUN + SOURCE,
            "greater than 0",
            "backend.timeout_s",
            7,
        ),
        id="timeout-zero",
    ),
    pytest.param(Bad(GOOD + "params:\n  n: 1000000000\n", "at most", "params.n", 15), id="n-1e9"),
    pytest.param(
        Bad(GOOD + "params:\n  size: huge\n", "WIDTHxHEIGHT like 1024x1024", "params.size", 15),
        id="size-huge",
    ),
    pytest.param(
        Bad(HEAD + RUN + "sources:\n  name: s\n  prompt: a\n", "expected a list", "sources", 11),
        id="sources-mapping",
    ),
    pytest.param(
        Bad(HEAD + RUN + "sources: []\n", "must not be empty", "sources", 11), id="no-sources"
    ),
    pytest.param(
        Bad(
            source("prompt: a {x}", "vars: {x: red}"),
            "expected a list of values",
            "sources[0].vars.x",
            14,
        ),
        id="var-not-list",
    ),
    pytest.param(
        Bad(
            source("prompt: a", "combine: cartesian"),
            "expected 'product', 'zip' or 'sample'",
            "sources[0].combine",
            14,
        ),
        id="combine-unknown",
    ),
    pytest.param(
        Bad(source("prompt: '   '"), "must not be empty", "sources[0].prompt", 13),
        id="blank-prompt",
    ),
    pytest.param(
        Bad(
            HEAD + "run:\n  max_items: 100\n" + "sources:\n  - name: s\n    prompt: a\n"
            "    repeats: 1000\n",
            "more than max_items 100",
            "run.max_items",
            10,
        ),
        id="max-items-exceeded",
    ),
    # ---- names and paths
    pytest.param(
        Bad(source("prompt: a", name="../x"), "not a safe name", "sources[0].name", 12),
        id="source-name-dotdot-slash",
    ),
    pytest.param(
        Bad(source("prompt: a", name="a/b"), "not a safe name", "sources[0].name", 12),
        id="source-name-slash",
    ),
    pytest.param(
        Bad(source("prompt: a", name="'..'"), "not a safe name", "sources[0].name", 12),
        id="source-name-dotdot",
    ),
    pytest.param(
        Bad(GOOD + "  - name: s\n    prompt: b\n", "duplicate source name", "sources[1].name", 14),
        id="duplicate-source-names",
    ),
    pytest.param(
        Bad(
            source("prompt: a", "urls: ['file:///etc/passwd']"),
            "expected an http(s) URL",
            "sources[0].urls[0]",
            14,
        ),
        id="url-file-scheme",
    ),
    # ---- templates
    pytest.param(
        Bad(
            source("prompt: a {colour} cat", "vars: {color: [red]}"),
            "did you mean 'color'",
            "sources[0].prompt",
            13,
        ),
        id="missing-var",
    ),
    pytest.param(
        Bad(
            source("prompt: a cat", "vars: {colour: [red]}"),
            "not used in the prompt",
            "sources[0].vars.colour",
            14,
        ),
        id="unused-var",
    ),
    pytest.param(
        Bad(source("prompt: 'a {0.__class__} cat'"), "has no values", "sources[0].prompt", 13),
        id="format-string-injection",
    ),
    pytest.param(
        Bad(source("prompt: 'a {colour cat'"), "unclosed", "sources[0].prompt", 13),
        id="unclosed-brace",
    ),
    pytest.param(
        Bad(source("prompt: a __colours__ cat"), "does not exist", "sources[0].prompt", 13),
        id="wildcard-file-missing",
    ),
    pytest.param(
        Bad(
            source("prompt: a __colours__ cat"),
            "not UTF-8",
            "sources[0].prompt",
            13,
            files={"wildcards/colours.txt": "rouge\nvermeil\xe9\n".encode("latin-1")},
        ),
        id="wildcard-not-utf8",
    ),
    # ---- input images
    pytest.param(
        Bad(
            source("prompt: a", "images: ['data/*.png']"),
            "no files match",
            "sources[0].images[0]",
            14,
        ),
        id="glob-matches-nothing",
    ),
    pytest.param(
        Bad(
            source("prompt: a", "images: ['data/*.png']"),
            "not an image",
            "sources[0].images[0]",
            14,
            files={"data/junk.png": bytes(range(256)) * 8},
        ),
        id="binary-junk-image",
    ),
    pytest.param(
        Bad(
            source("prompt: a", "folder: data"),
            "not an image",
            "sources[0].folder",
            14,
            files={"data/truncated.png": PNG_SIGNATURE + b"\x00\x00"},
        ),
        id="png-header-only-in-folder",
    ),
    pytest.param(
        Bad(
            source("prompt: a", "images: ['data/big.png']"),
            "200.0 MB; the API takes images up to 25 MB",
            "sources[0].images[0]",
            14,
            setup=lambda tmp: sparse_png(tmp / "data" / "big.png", 200 * 1024 * 1024),
        ),
        id="image-200mb",
    ),
    pytest.param(
        Bad(
            source("prompt: a", "folder: data", "recursive: true"),
            "no images in data",
            "sources[0].folder",
            14,
            setup=lambda tmp: symlink_loop(tmp / "data"),
        ),
        id="symlink-loop-folder",
    ),
    pytest.param(
        Bad(source("prompt: a", "folder: nowhere"), "does not exist", "sources[0].folder", 14),
        id="folder-missing",
    ),
    pytest.param(
        Bad(
            source("prompt: a", "images: [a.png]", "folder: data"),
            "one input kind",
            "sources[0].folder",
            15,
        ),
        id="two-input-kinds",
    ),
    # ---- backend and credentials
    pytest.param(
        Bad(
            HEAD.replace("BASE_URL", "http://api.example.com") + RUN + SOURCE,
            "plain http would send the API key in clear",
            "backend.base_url",
            6,
        ),
        id="http-non-loopback",
    ),
    pytest.param(
        Bad(
            HEAD.replace("BASE_URL", "ftp://127.0.0.1") + RUN + SOURCE,
            "expected an http(s) URL",
            "backend.base_url",
            6,
        ),
        id="base-url-ftp",
    ),
    pytest.param(Bad(GOOD, "ROBOFLOW_API_KEY is not set", with_key=False), id="api-key-unset"),
    pytest.param(
        Bad(
            HEAD.replace("kind: roboflow", "kind: roboflow\n  api_key_env: MY-KEY") + RUN + SOURCE,
            "not an environment variable name",
            "backend.api_key_env",
            6,
        ),
        id="api-key-env-bad-name",
    ),
    # ---- command line
    pytest.param(
        Bad(GOOD, "invalid int value: 'abc'", args=("--concurrency", "abc")),
        id="flag-concurrency-abc",
    ),
    pytest.param(
        Bad(GOOD, "--concurrency: must be a whole number", args=("--concurrency", "0")),
        id="flag-concurrency-0",
    ),
    pytest.param(
        Bad(GOOD, "--rate: a rate must be greater than 0", args=("--rate", "0")), id="flag-rate-0"
    ),
    pytest.param(
        Bad(GOOD, "--rate: expected a rate like", args=("--rate", "fast")), id="flag-rate-fast"
    ),
    pytest.param(
        Bad(GOOD, "--max-attempts: must be a whole number", args=("--max-attempts", "-1")),
        id="flag-max-attempts-negative",
    ),
    pytest.param(
        Bad(GOOD, "--shard 2/2: need 0 <= I < N", args=("--shard", "2/2")),
        id="flag-shard-out-of-range",
    ),
    pytest.param(
        Bad(GOOD, "--shard 'half': expected I/N", args=("--shard", "half")),
        id="flag-shard-not-i-of-n",
    ),
    pytest.param(
        Bad(GOOD, "unrecognized arguments: --concurrenc", args=("--concurrenc", "2")),
        id="flag-abbreviated",
    ),
    pytest.param(
        Bad(GOOD, "invalid choice: 'LOUD'", args=("--log-level", "LOUD")), id="flag-log-level"
    ),
    pytest.param(Bad(GOOD, "no such spec file", spec_arg="missing.yaml"), id="spec-path-missing"),
    pytest.param(Bad(GOOD, "cannot read the spec", spec_arg="."), id="spec-path-is-a-folder"),
    pytest.param(
        Bad(
            HEAD + "run:\n  rate_limit: fast\n" + SOURCE,
            "expected a rate like",
            "run.rate_limit",
            10,
            command="plan",
        ),
        id="plan-bad-spec",
    ),
]


@pytest.fixture(scope="module")
def mock_api() -> Iterator[ThreadedMock]:
    """One live mock API for the whole catalogue: no case may ever reach it."""
    with ThreadedMock(MockConfig()) as mock:
        yield mock


def lay_out(tmp: Path, case: Bad, base_url: str) -> Path:
    for name, content in case.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    (tmp / "data").mkdir(exist_ok=True)
    if case.setup is not None:
        case.setup(tmp)
    spec = case.spec
    raw = spec.encode() if isinstance(spec, str) else spec
    (tmp / "spec.yaml").write_bytes(raw.replace(b"BASE_URL", base_url.encode()))
    return tmp / case.spec_arg


def expected_where(case: Bad) -> str | None:
    """The `file:line key.path:` prefix a SpecError puts first, when the case has one."""
    if case.line is None and not case.key_path:
        return None
    where = "spec.yaml" if case.line is None else f"spec.yaml:{case.line}"
    return f"{where} {case.key_path}: " if case.key_path else f"{where}: "


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_sends_nothing(
    case: Bad,
    tmp_path: Path,
    mock_api: ThreadedMock,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A broken spec, input or flag exits 2 with one line naming the fix; nothing is sent."""
    if case.with_key:
        monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    spec_path = lay_out(tmp_path, case, mock_api.base_url)
    rest = ("--no-progress", "--no-grid") if case.command == "run" else ()
    with pytest.raises(SystemExit) as exit_info:
        main([case.command, str(spec_path), *rest, *case.args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 1, err
    assert case.fragment in err[0]
    where = expected_where(case)
    if where is not None:
        assert where in err[0], err[0]
    assert KEY not in err[0]
    assert mock_api.server.stats.requests == 0
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_catalogue_is_large_enough() -> None:
    """The catalogue holds at least 30 distinct broken inputs (issue 6 asks for 30)."""
    ids = [param.id for param in CASES]
    assert len(set(ids)) == len(ids) >= 30
