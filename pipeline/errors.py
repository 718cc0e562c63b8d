"""The exception tree of synthaug.

Every error a user can cause or meet derives from `PipelineError`; the CLI turns one
into a single line and an exit code (`.exit_code`). A traceback is shown only with
``--log-level DEBUG``.

    PipelineError
    ├── UsageError                 bad command line                      exit 2
    ├── SpecError                  bad job spec (file, key path, line)   exit 2
    ├── CredentialsError           API key variable unset or empty       exit 2
    ├── OutputError                OUT not writable, locked by another run,
    │                              keyed by another scheme               exit 2
    │                              (a disk that fills mid-run stops the run: exit 3)
    ├── BackendError               one request failed (carries kind, status, item_key)
    │   ├── TransientError         retried with backoff (408/425/429/5xx, timeouts, ...)
    │   │   └── RateLimitedError   a 429: all starts pause for `retry_after`
    │   ├── PermanentError         recorded as failed at once (other 4xx, refusals)
    │   └── FatalError             aborts the run, in any stage: 401, 403, unknown
    │                              project or model, quota or billing exhausted,
    │                              uploads failing in a row              exit 3
    └── Deferred                   an item waits in a submitted batch (run --no-wait)

How a run ended (too many consecutive failures: exit 3; a budget reached: exit 4;
stopped: 130/143) is not an exception: it is the run's result.

Messages never contain an API key: backends build them from redacted URLs.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "BackendError",
    "CredentialsError",
    "Deferred",
    "ErrorKind",
    "FatalError",
    "OutputError",
    "PermanentError",
    "PipelineError",
    "RateLimitedError",
    "SpecError",
    "TransientError",
    "UsageError",
]

ErrorKind = Literal[
    "http_status", "timeout", "connection", "bad_response", "bad_image", "download", "refused"
]

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_BUDGET = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class PipelineError(Exception):
    """Base of every error synthaug raises on purpose."""

    exit_code: int = EXIT_USAGE


class UsageError(PipelineError):
    """The command line is wrong (missing file, bad flag value)."""


class SpecError(PipelineError):
    """The job spec is invalid; the message names the file, key path and line."""

    def __init__(
        self,
        message: str,
        *,
        file: str,
        key_path: str = "",
        line: int | None = None,
        value: object = None,
    ) -> None:
        self.file = file
        self.key_path = key_path
        self.line = line
        self.value = value
        self.reason = message
        where = file if line is None else f"{file}:{line}"
        prefix = f"{where} {key_path}: " if key_path else f"{where}: "
        super().__init__(prefix + message)


class CredentialsError(PipelineError):
    """The API key's environment variable is unset or empty."""


class OutputError(PipelineError):
    """The output directory cannot be used (not writable, locked by another run)."""


class BackendError(PipelineError):
    """One request to the image API failed.

    `kind` is an `ErrorKind`; `status` the HTTP status when there was one;
    `ambiguous` is true when the request may have reached the server and been paid for
    (a timeout or a connection dropped after sending), so a retry may pay twice.
    """

    exit_code = EXIT_SOME_FAILED

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind,
        status: int | None = None,
        item_key: str | None = None,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind: ErrorKind = kind
        self.status = status
        self.item_key = item_key
        self.ambiguous = ambiguous


class TransientError(BackendError):
    """A failure worth retrying with backoff."""


class RateLimitedError(TransientError):
    """The API answered 429; `retry_after` is in seconds, None when it gave none."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        item_key: str | None = None,
    ) -> None:
        super().__init__(message, kind="http_status", status=429, item_key=item_key)
        self.retry_after = retry_after


class PermanentError(BackendError):
    """A failure that retrying cannot fix: recorded as failed at once."""


class FatalError(BackendError):
    """An answer that dooms every request (bad key, unknown project): abort the run."""

    exit_code = EXIT_FATAL


class Deferred(PipelineError):
    """An item waits in a Batch API batch that is not done: a later run collects it.

    Not a failure: ``run --no-wait`` submits and leaves, and the manifest's ``submitted``
    line says where the item waits.
    """

    exit_code = EXIT_OK

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"waits in batch {batch_id}")
        self.batch_id = batch_id
