"""synthaug's Python API under the distribution's own name.

``import synthaug`` gives the same API as ``pipeline.api`` (the package's folder keeps
its historical name). A scheduler's DAG folder often holds a ``pipeline.py`` of its own,
which would shadow ``import pipeline``; this name cannot be shadowed that way: when
``pipeline`` resolves to somebody else's module, the package's modules are loaded under
``synthaug`` instead (they import one another relatively, so either name works).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

_PACKAGE_DIR = Path(__file__).resolve().parent.parent / "pipeline"


def _pipeline_is_ours() -> bool:
    """True when ``import pipeline`` would give this distribution's package."""
    try:
        found = importlib.util.find_spec("pipeline")
    except (ImportError, ValueError):
        return False
    origin = found.origin if found is not None else None
    return origin is not None and Path(origin).resolve().parent == _PACKAGE_DIR


if TYPE_CHECKING or _pipeline_is_ours():
    from pipeline import _version, api, errors
else:  # shadowed: serve the package's modules as synthaug.*
    __path__ = [str(_PACKAGE_DIR)]
    from . import _version, api, errors

__version__ = _version.__version__
Plan = api.Plan
Progress = api.Progress
RunControl = api.RunControl
RunResult = api.RunResult
RunStats = api.RunStats
Shard = api.Shard
SourceStatus = api.SourceStatus
Spec = api.Spec
Status = api.Status
load_spec = api.load_spec
merge = api.merge
parse_shard = api.parse_shard
plan = api.plan
plan_async = api.plan_async
run = api.run
run_async = api.run_async
status = api.status
EXIT_BUDGET = errors.EXIT_BUDGET
EXIT_FATAL = errors.EXIT_FATAL
EXIT_OK = errors.EXIT_OK
EXIT_SIGINT = errors.EXIT_SIGINT
EXIT_SIGTERM = errors.EXIT_SIGTERM
EXIT_SOME_FAILED = errors.EXIT_SOME_FAILED
EXIT_USAGE = errors.EXIT_USAGE
BackendError = errors.BackendError
CredentialsError = errors.CredentialsError
FatalError = errors.FatalError
OutputError = errors.OutputError
PermanentError = errors.PermanentError
PipelineError = errors.PipelineError
RateLimitedError = errors.RateLimitedError
SpecError = errors.SpecError
TransientError = errors.TransientError
UsageError = errors.UsageError

__all__ = [
    "EXIT_BUDGET",
    "EXIT_FATAL",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "BackendError",
    "CredentialsError",
    "FatalError",
    "OutputError",
    "PermanentError",
    "PipelineError",
    "Plan",
    "Progress",
    "RateLimitedError",
    "RunControl",
    "RunResult",
    "RunStats",
    "Shard",
    "SourceStatus",
    "Spec",
    "SpecError",
    "Status",
    "TransientError",
    "UsageError",
    "__version__",
    "load_spec",
    "merge",
    "parse_shard",
    "plan",
    "plan_async",
    "run",
    "run_async",
    "status",
]
