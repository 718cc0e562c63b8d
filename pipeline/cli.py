"""The `synthaug` command: argument parsing, progress, logging and exit codes.

Wiring only: every behaviour lives in the module named after it. A `PipelineError`
becomes one line on stderr and its exit code; a traceback appears only with
``--log-level DEBUG``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ._version import __version__
from .errors import EXIT_OK, EXIT_USAGE, PipelineError, UsageError
from .records import BATCH_LOGGER, PLAN_LOGGER
from .registry import BACKENDS
from .shard import parse_shard
from .store.lock import check_platform
from .views.export import EXPORT_FORMATS

if TYPE_CHECKING:
    from .jobspec.model import Spec

__all__ = ["build_parser", "main"]

log = logging.getLogger("pipeline")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Above this many items a run's end would spend minutes drawing thousands of sheet pages
# and thumbnails nobody looks at; `synthaug grid OUT` still draws them on request.
AUTO_VIEWS_MAX_ITEMS = 5000


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 2 with one line naming the fix.

    Abbreviated flags are refused: in a cron line a typo must not silently match.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _out_dir(text: str) -> Path | str:
    """An OUT on the command line: a folder, or object storage (``s3://bucket/prefix``)."""
    from .store.layout import is_object_url

    return text.strip().rstrip("/") if is_object_url(text) else Path(text)


def _local_out_dir(out: Path | str) -> Path:
    """An OUT whose images a command reads: a bucket's is copied down first (manifests,
    and the images its ok lines name, beside the URL's staging folder)."""
    if isinstance(out, Path):
        return out
    from .run.mirror import local_copy

    folder, fetched = local_copy(out)
    print(f"synthaug: {out} copied to {folder} ({fetched} images fetched)", file=sys.stderr)
    return folder


def build_parser() -> argparse.ArgumentParser:
    """The full command line; README's CLI reference is generated from its --help."""
    parser = _Parser(
        prog="synthaug",
        description=(
            "Grow image datasets with generated images: expand a YAML job spec into "
            "requests to Roboflow's synthetic-image API, rate-limited, retried, verified "
            "and checkpointed so an interrupted run resumes without paying twice."
        ),
        epilog="Exit codes: 0 all ok, 1 some items failed, 2 bad spec or usage, "
        "3 aborted (fatal API answer, too many failures), 4 budget reached, "
        "130/143 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"synthaug {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run = sub.add_parser(
        "run",
        help="run (or resume) a job",
        description=(
            "Run the job in SPEC. If its output dir already has a manifest, resume: items "
            "already ok are skipped, failed ones retried (unless --no-retry-failed)."
        ),
    )
    run.add_argument("spec", type=Path, metavar="SPEC.yaml")
    run.add_argument("--backend", choices=list(BACKENDS), help="override backend.kind")
    run.add_argument("--concurrency", type=int, metavar="N", help="requests in flight at most")
    run.add_argument("--rate", metavar="R", help="request starts: N/s, N/min, N/h or per second")
    run.add_argument("--max-attempts", type=int, metavar="N", help="tries per item")
    run.add_argument("--max-images", type=int, metavar="N", help="image budget for this run")
    run.add_argument(
        "--out", metavar="DIR", help="output dir, or s3://bucket/prefix (default from spec)"
    )
    run.add_argument(
        "--no-retry-failed",
        action="store_true",
        help="on resume, leave items whose last attempt failed",
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="on resume, re-hash every stored image (default: check that the files exist)",
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="backend.mode batch: submit the batches and exit; a later run collects them",
    )
    run.add_argument(
        "--shard",
        metavar="I/N",
        help="run only shard I of N (0 <= I < N): the items whose key is I modulo N, in "
        "their own manifest and lock; the other shards of N may run at the same time",
    )
    run.add_argument(
        "--top-up",
        action="store_true",
        help="roboflow_balance: add to the recorded plan what each class is still short of "
        "(target - count - usable images), then run",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--no-grid",
        action="store_true",
        help="skip drawing contact sheets and index.html at the end",
    )
    _add_log_level(run)

    plan = sub.add_parser(
        "plan",
        help="expand and validate a spec: no network, no spend",
        description="Show per source how many requests and images the "
        "job makes, how many are done, its cost and ETA. Sends nothing "
        "(with --resolve, only the searches of roboflow_search sources and the class "
        "counts of a roboflow_balance source).",
    )
    plan.add_argument("spec", type=Path, metavar="SPEC.yaml")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument(
        "--resolve",
        action="store_true",
        help="run roboflow_search sources' searches and read a roboflow_balance source's "
        "class counts, to count their items (the only requests plan sends; what they "
        "find is recorded in the output dir)",
    )
    plan.add_argument(
        "--shard", metavar="I/N", help="count only shard I of N (the items `run --shard I/N` runs)"
    )
    plan.add_argument(
        "--top-up",
        action="store_true",
        help="roboflow_balance: plan what `run --top-up` would add to each class (nothing "
        "is recorded)",
    )
    _add_log_level(plan)

    merge = sub.add_parser(
        "merge",
        help="fold the shards' manifests into manifest.jsonl (refused while a run is on)",
        description="Fold every shard's manifest (run --shard I/N) into OUT/manifest.jsonl, "
        "last line per key (an ok one first), then remove the shards' files. Written to a "
        "temporary file and renamed: a kill at any moment loses nothing.",
    )
    merge.add_argument("out", type=_out_dir, metavar="OUT_DIR")
    _add_log_level(merge)

    status = sub.add_parser("status", help="what a run's manifest says: ok / failed / pending")
    status.add_argument("out", type=_out_dir, metavar="OUT_DIR")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--shard", metavar="I/N", help="count only shard I of N's items")
    _add_log_level(status)

    grid = sub.add_parser("grid", help="(re)draw contact sheets and index.html from a manifest")
    grid.add_argument("out", type=_out_dir, metavar="OUT_DIR")
    grid.add_argument("--cell", type=int, default=256, metavar="PX", help="cell size in pixels")
    _add_log_level(grid)

    export = sub.add_parser(
        "export",
        help="write labelled, unflagged outputs as a YOLO, COCO or Pascal VOC dataset",
        description="Write the outputs of OUT_DIR that are ok, labelled (by a label: block) "
        "and not flagged into DIR as a dataset a trainer reads: yolo (data.yaml, images/, "
        "labels/), coco (images/, annotations.json) or voc (images/, annotations/). Images "
        "are copied unchanged; an image without predictions is exported without boxes. "
        "DIR must be new or empty and appears whole at the end. Needs the export extra: "
        "pip install 'synthaug[export]'.",
    )
    export.add_argument("out", type=_out_dir, metavar="OUT_DIR")
    export.add_argument(
        "--format", required=True, choices=EXPORT_FORMATS, help="the dataset's format"
    )
    export.add_argument(
        "--to", required=True, type=Path, metavar="DIR", help="a new or empty folder to write"
    )
    export.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_log_level(export)

    mock = sub.add_parser("mock-server", help="serve the embedded mock API (no key, no spend)")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8377)
    mock.add_argument(
        "--latency", type=float, default=0.0, metavar="S", help="seconds before each answer"
    )
    mock.add_argument(
        "--error-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of requests answered with an injected fault (0..1)",
    )
    mock.add_argument(
        "--rate-limit",
        default=None,
        metavar="R",
        help="enforce this request rate with 429s (N/s, N/min, ...)",
    )
    mock.add_argument("--seed", type=int, default=0, help="seed of the fault sequence")
    mock.add_argument(
        "--batch-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="how long a Batch API batch takes, validating to completed (the API: up to 24 h)",
    )
    mock.add_argument(
        "--shutdown",
        action="append",
        default=[],
        metavar="MODEL=YYYY-MM-DD",
        help="mark MODEL shut down on that date (repeatable): /v1/models says so, and "
        "requests for it answer 404 model_not_found from then on",
    )
    mock.add_argument(
        "--detect-classes",
        default=None,
        metavar="A,B,C",
        help="the classes drawn into images whose prompt names them, and found by "
        "POST /{project}/{version} (default: 20 everyday nouns: person, car, tree, leaf, ...)",
    )
    mock.add_argument(
        "--drop-annotation-boxes",
        action="store_true",
        help="answer annotation uploads with success but keep no boxes (only a read-back "
        "tells), as Roboflow has been seen to do",
    )
    mock.add_argument(
        "--project-classes",
        default=None,
        metavar="A=N,B=N",
        help="the class counts GET /{workspace}/{project} reports of every project "
        "(default: person=12,car=8,tree=5,leaf=2,dog=0, the vocabulary's first classes)",
    )
    _add_log_level(mock)

    models = sub.add_parser(
        "models",
        help="known image models: status, shutdown, replacement, prices",
        description="Show the image models synthaug knows (packaged data, judged on "
        "today's date): status, shutdown date, replacement, list prices. With SPEC, also "
        "ask the API (GET /models/{id}, with the spec's key) about each model the spec "
        "uses, as a run does before it spends: exit 2 if one is shut down, 3 if the key "
        "cannot use it.",
    )
    models.add_argument("spec", type=Path, nargs="?", metavar="SPEC.yaml")
    models.add_argument(
        "--date",
        type=_iso_date,
        metavar="YYYY-MM-DD",
        help="judge the models on this date instead of today (what will be shut down by then)",
    )
    models.add_argument("--json", action="store_true", help="print one JSON object")
    _add_log_level(models)

    schema = sub.add_parser("schema", help="print the job spec's JSON Schema")
    _add_log_level(schema)
    return parser


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=LOG_LEVELS,
        help="log detail on stderr (default WARNING); DEBUG adds tracebacks",
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the console script and `python -m pipeline`."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    handler = _COMMANDS[args.command]
    try:
        check_platform()  # Windows gets one line pointing to WSL, not an ImportError
        code = handler(args)
    except PipelineError as exc:
        if args.log_level == "DEBUG":
            log.exception("details")
        print(f"synthaug: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("synthaug: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # `synthaug status OUT --json | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


def _setup_logging(level: str) -> None:
    """Terse lines by default; timestamps and module names when asking for detail."""
    detailed = level in ("DEBUG", "INFO")
    fmt = (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
        if detailed
        else "synthaug: %(levelname)s: %(message)s"
    )
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt)
    if logging.getLevelName(level) > logging.INFO and logging.getLevelName(level) < logging.ERROR:
        # a batch's status changes, and what a run plans beyond the spec (counts read, a
        # top-up), are what a nightly log is read for: shown by default
        logging.getLogger(BATCH_LOGGER).setLevel(logging.INFO)
        logging.getLogger(PLAN_LOGGER).setLevel(logging.INFO)


# ---------------------------------------------------------------------- commands


def _load(path: Path, today: dt.date | None = None) -> Spec:
    from .jobspec.load import load_spec

    if not path.exists():
        raise UsageError(f"{path}: no such spec file")
    return load_spec(path, today=today)


def _cmd_plan(args: argparse.Namespace) -> int:
    from .api import plan as plan_job
    from .manifest.log import gc_paused
    from .plan import format_plan

    # the max_items guard and key-scheme check included; the CLI owns its process: the
    # GC pauses while the manifest loads (the library leaves it alone)
    with gc_paused():
        plan = plan_job(
            _load(args.spec),
            resolve=args.resolve,
            top_up=args.top_up,
            shard=None if args.shard is None else parse_shard(args.shard),
        )
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from .api import run_async
    from .jobspec.load import apply_overrides

    spec = apply_overrides(
        _load(args.spec),
        backend=args.backend,
        concurrency=args.concurrency,
        rate_limit=args.rate,
        max_attempts=args.max_attempts,
        max_images=args.max_images,
        output_dir=args.out,
        retry_failed=False if args.no_retry_failed else None,
    )
    show = not args.no_progress and sys.stderr.isatty()
    with _Progress(enabled=show) as progress:
        result = asyncio.run(
            run_async(
                spec,
                on_progress=progress.update if show else None,
                verify=args.verify,
                wait=not args.no_wait,
                top_up=args.top_up,
                shard=None if args.shard is None else parse_shard(args.shard),
                process_owner=True,  # the CLI owns its process: signals and the GC
            )
        )
    s = result.summary
    cost = "cost unknown" if s["cost_usd"] is None else f"${s['cost_usd']:.2f} est."
    print(
        f"{spec.name}: {s['ok']} ok, {s['failed']} failed, {s['skipped_ok']} already done, "
        f"{s['requests']} requests, {s['images']} images, {cost} "
        f"in {s['elapsed_s']:.1f}s -> {spec.output_url or spec.output_dir}",
        file=sys.stderr,
    )
    if result.message:
        print(f"synthaug: {result.message}", file=sys.stderr)
    if not args.no_grid and result.stop_reason not in ("sigint", "sigterm"):
        if spec.output_url is not None:
            print(
                "synthaug: contact sheets and index.html are drawn from a local OUT: "
                f"copy {spec.output_url} down and run `synthaug grid DIR`",
                file=sys.stderr,
            )
        elif s["items_seen"] > AUTO_VIEWS_MAX_ITEMS:
            print(
                f"synthaug: {s['items_seen']} items: contact sheets and index.html are not drawn "
                f"automatically above {AUTO_VIEWS_MAX_ITEMS}; run `synthaug grid "
                f"{spec.output_dir}` to draw them",
                file=sys.stderr,
            )
        elif views := _draw_views(spec.output_dir, cell_px=256):
            print(f"look at: {views[-1]}", file=sys.stderr)
    return result.exit_code


def _draw_views(out: Path, *, cell_px: int) -> list[Path]:
    """Contact sheets and index.html; a failure here never changes the run's outcome."""
    from .views.gallery import write_gallery
    from .views.grid import draw_grids

    try:
        sheets = draw_grids(out, cell_px=cell_px)
        page = write_gallery(out)
    except Exception:
        log.exception(
            "could not draw contact sheets / index.html; "
            "the run itself is fine: try `synthaug grid %s`",
            out,
        )
        return []
    return [*sheets, page]


def _cmd_merge(args: argparse.Namespace) -> int:
    from .api import merge

    files, items = merge(args.out)
    target = (
        f"{args.out}/manifest.jsonl" if isinstance(args.out, str) else args.out / "manifest.jsonl"
    )
    print(f"merged {files} manifest{'s' if files != 1 else ''} ({items} items) into {target}")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from .manifest.log import gc_paused
    from .views.report import format_status, status_report

    shard = None if args.shard is None else parse_shard(args.shard)
    with gc_paused():  # the CLI owns its process (the library leaves the GC alone)
        if isinstance(args.out, str):
            from .api import remote_status_report  # the whole API: only for a bucket

            report = remote_status_report(args.out, shard)
        else:
            report = status_report(args.out, shard)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def _cmd_grid(args: argparse.Namespace) -> int:
    from .store.layout import MANIFEST_NAME, manifest_files

    out = _local_out_dir(args.out)
    if not manifest_files(out):  # manifest.jsonl, or the shards' own
        raise UsageError(f"{out}: no {MANIFEST_NAME} here: run `synthaug run SPEC` first")
    for path in _draw_views(out, cell_px=args.cell):
        print(path)
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from .views.export import export_dataset, format_export

    summary = export_dataset(_local_out_dir(args.out), args.format, args.to)
    print(json.dumps(summary.to_json(), indent=2) if args.json else format_export(summary))
    return EXIT_OK


def _cmd_mock_server(args: argparse.Namespace) -> int:
    from .jobspec.fields import parse_rate
    from .mockapi.config import parse_project_classes
    from .mockapi.server import MockConfig, run_mock_server

    if not 0.0 <= args.error_rate <= 1.0:
        raise UsageError(f"--error-rate must be between 0 and 1, got {args.error_rate}")
    rate = parse_rate(args.rate_limit) if args.rate_limit else None
    if not 0.0 <= args.batch_seconds < float("inf"):
        raise UsageError(f"--batch-seconds must be >= 0, got {args.batch_seconds}")
    config = MockConfig(
        latency_s=args.latency,
        error_rate=args.error_rate,
        rate_limit=rate,
        seed=args.seed,
        batch_s=args.batch_seconds,
        shutdowns=_parse_shutdowns(args.shutdown),
        drop_annotation_boxes=args.drop_annotation_boxes,
    )
    if args.detect_classes is not None:
        names = tuple(name.strip().lower() for name in args.detect_classes.split(","))
        try:
            config = dataclasses.replace(config, detect_classes=names)
        except ValueError as problem:
            raise UsageError(f"--detect-classes: {problem}") from None
    if args.project_classes is not None:
        try:
            counts = parse_project_classes(args.project_classes)
        except ValueError as problem:
            raise UsageError(f"--project-classes: {problem}") from None
        config = dataclasses.replace(config, project_classes=counts)
    run_mock_server(config, args.host, args.port)
    return EXIT_OK


def _iso_date(value: str) -> dt.date:
    """An argparse type: a ``YYYY-MM-DD`` date."""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {value!r}") from None


def _parse_shutdowns(values: Sequence[str]) -> dict[str, dt.date]:
    """``--shutdown MODEL=YYYY-MM-DD`` flags as a mapping; UsageError for a bad one."""
    shutdowns: dict[str, dt.date] = {}
    for value in values:
        model, sep, day = value.partition("=")
        try:
            if not sep or not model.strip():
                raise ValueError(value)
            shutdowns[model.strip()] = dt.date.fromisoformat(day.strip())
        except ValueError:
            raise UsageError(f"--shutdown takes MODEL=YYYY-MM-DD, got {value!r}") from None
    return shutdowns


def _cmd_models(args: argparse.Namespace) -> int:
    from .jobspec.catalog import default_catalog
    from .model_check import ask_spec_api, raise_or_warn
    from .views.model_table import format_models, models_report

    if args.spec is None:
        report = models_report(default_catalog(), args.date or dt.date.today())
        print(json.dumps(report, indent=2) if args.json else format_models(report))
        return EXIT_OK
    spec = _load(args.spec, today=args.date)
    import asyncio

    answers = asyncio.run(ask_spec_api(spec))
    report = models_report(
        default_catalog(),
        spec.today,
        spec_file=str(args.spec),
        kind=spec.backend.kind,
        api=answers,
    )
    print(json.dumps(report, indent=2) if args.json else format_models(report), flush=True)
    raise_or_warn(spec, answers or ())  # the run's own verdict: exit 2 or 3, or warnings
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from .jobspec.load import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "plan": _cmd_plan,
    "status": _cmd_status,
    "merge": _cmd_merge,
    "grid": _cmd_grid,
    "export": _cmd_export,
    "mock-server": _cmd_mock_server,
    "models": _cmd_models,
    "schema": _cmd_schema,
}


class _Progress:
    """tqdm on stderr, refreshed at most 10 times a second; a no-op when disabled."""

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: Any = None
        self._redirect: Any = None
        self._last = 0.0

    def __enter__(self) -> _Progress:
        if self._enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=None, unit="item", file=sys.stderr, dynamic_ncols=True)
            # log lines go above the bar instead of through it
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()
        return self

    def update(self, stats: Any) -> None:
        if self._bar is None:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and stats.in_flight:
            return
        self._last = now
        elapsed = stats.elapsed_s
        self._bar.total = stats.expected or None
        self._bar.n = stats.done
        rate = {"req_s": f"{stats.requests / elapsed:.2f}" if elapsed else "-"}
        self._bar.set_postfix(
            ok=stats.ok,
            failed=stats.failed,
            retrying=stats.retries,
            **({"batches": stats.batches} if stats.batches else rate),
            refresh=False,
        )
        self._bar.refresh()

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()
