"""Roboflow's project endpoint: ``GET {base_url}/{workspace}/{project}``, for its class
counts.

The answer is ``{"workspace": {...}, "project": {"id", "type", "images", "splits",
"classes": {name: count, ...}, "versions": [...]}}``; a balance source plans from
``project.classes``. The read is retried under the run's policy (`RetriedCalls`: 429s
honour Retry-After; it has no side effect, so an ambiguous failure is retried too);
401/403 (the key) and 404 (workspace or project) are fatal, with advice naming the
``roboflow_balance:`` keys to check. Session, proxies, key and transport errors are its
`ApiClient`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from ..credentials import DIRECT, ProxySettings
from ..errors import BackendError, FatalError, TransientError
from ..retry import RetryPolicy
from .base import excerpt
from .http import ApiClient, ApiClientOwner
from .retried import RetriedCalls

__all__ = ["RoboflowProject", "parse_class_counts"]

_log = logging.getLogger(__name__)


class RoboflowProject(ApiClientOwner):
    """Reads projects' class counts from the Roboflow API at `root` (or the mock's)."""

    def __init__(
        self,
        root: str,
        api_key: str,
        *,
        timeout_s: float,
        policy: RetryPolicy,
        proxies: ProxySettings = DIRECT,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._root = root.rstrip("/")
        self._http = ApiClient(api_key, timeout_s=timeout_s, proxies=proxies, pending_note="")
        self._attempts = policy.max_attempts
        self._calls = RetriedCalls(replace(policy, retry_ambiguous=True), sleep=sleep)

    async def class_counts(self, workspace: str, project: str) -> dict[str, int]:
        """``project.classes`` of the project: annotated instances per class."""
        endpoint = f"{self._root}/{workspace}/{project}"
        what = f"the class counts of {workspace}/{project}"
        try:
            return await self._calls.call(lambda: self._ask(endpoint, what))
        except TransientError as last:
            failure = FatalError(
                f"{what} could not be read {self._attempts} times (last: {last.message}): "
                "check the API's status and run the same command again",
                kind=last.kind,
                status=last.status,
            )
        raise failure

    async def _ask(self, endpoint: str, what: str) -> dict[str, int]:
        try:
            status, chunks, headers = await self._http.send(
                lambda: self._http.keyed_url(endpoint, []), endpoint, method="GET"
            )
            if not 200 <= status < 300:
                text = b"".join(chunks).decode("utf-8", errors="replace")
                raise _project_error(self._http.http_error(status, text, headers), what)
            payload = self._http.json_of(endpoint, status, b"".join(chunks), headers)
            return parse_class_counts(payload, what)
        except BackendError as error:
            raise self._http.scrub_error(error) from None


def parse_class_counts(payload: Any, what: str = "the project") -> dict[str, int]:
    """``project.classes`` of an answer as ``{name: count}``; a ``bad_response`` for any
    other shape (retried: a garbled answer is usually transient)."""
    project = payload.get("project") if isinstance(payload, Mapping) else None
    classes = project.get("classes") if isinstance(project, Mapping) else None
    if not isinstance(classes, Mapping):
        raise TransientError(
            f"{what}: the answer has no project.classes: {excerpt(repr(payload))}",
            kind="bad_response",
        )
    counts: dict[str, int] = {}
    for name, count in classes.items():
        if not isinstance(name, str) or not name.strip():
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise TransientError(
                f"{what}: class {name!r} has no count: {excerpt(repr(count))}",
                kind="bad_response",
            )
        counts[name] = count
    return counts


def _project_error(error: BackendError, what: str) -> BackendError:
    """`classify_http`'s error, worded for this read: what the user should check."""
    if isinstance(error, TransientError):
        return error
    detail = error.message.split(" — ", 1)[0]
    if error.status in (401, 403):
        advice = (
            "Roboflow refused the key: check roboflow_balance.api_key_env and that the key "
            "can read the workspace"
        )
    elif error.status == 404:
        advice = "unknown workspace or project: check roboflow_balance.workspace and .project"
    else:
        advice = "check the source's roboflow_balance block"
    return FatalError(f"{what}: {detail} — {advice}", kind="http_status", status=error.status)
