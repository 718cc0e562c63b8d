"""The Roboflow image search client: ``POST {root}/{workspace}/{project}/search``.

A ``roboflow_search`` source's inputs are the image ids a search answers. The request is
the one Roboflow documents (and its Python SDK's ``Project.search`` sends): the key as
the ``api_key`` query parameter, a JSON body with the query (``prompt``, ``like_image``,
``tag`` or ``class_name``, and the filters ``in_dataset``, ``batch``, ``batch_id``),
``offset``, ``limit`` (at most 250 a page) and ``fields``. The answer is an object
``{"offset", "total", "results": [{"id", ...}, ...]}``.

Pages are asked for with a growing offset until the source's limit is reached, a page
comes back short, or ``total`` says there is no more. A search has no side effect, so
every transient failure (429, 5xx, timeout, connection, a garbled answer) is retried
under the run's retry policy (`RetriedCalls`); what no retry can fix (401/403: the key;
404: workspace or project; another 4xx: the query) is a `FatalError` that says what to
check. The session, proxies, key and transport errors are its `ApiClient`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from yarl import URL

from ..credentials import DIRECT, ProxySettings
from ..errors import BackendError, FatalError, TransientError
from ..jobspec.model import SearchSettings
from ..retry import RetryPolicy
from .base import excerpt, redact
from .http import ApiClient, ApiClientOwner
from .retried import RetriedCalls

__all__ = [
    "PAGE_LIMIT",
    "SEARCH_FIELDS",
    "RoboflowSearch",
    "SearchResult",
    "parse_search_page",
]

PAGE_LIMIT = 250
"""Most results the search API returns per request (its documented maximum)."""
SEARCH_FIELDS = ("id",)
"""The result fields asked for: only the id is used (the default adds names, labels...)."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """What one search found: image ids in the API's order, and its reported match count."""

    ids: tuple[str, ...]
    total: int | None
    requests: int


class RoboflowSearch(ApiClientOwner):
    """Runs searches against the Roboflow API at `root` (or the embedded mock's URL).

    Each page is tried under `policy` (the run's: ``run.max_attempts`` and its backoff;
    an ambiguous failure is retried too, a search has no side effect), a 429 pausing the
    next try for its Retry-After (`RetriedCalls`). `sleep` and `clock` are its time
    (tests pass fakes).
    """

    def __init__(
        self,
        root: str,
        api_key: str,
        *,
        timeout_s: float,
        policy: RetryPolicy,
        proxies: ProxySettings = DIRECT,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._root = root.rstrip("/")
        self._http = ApiClient(api_key, timeout_s=timeout_s, proxies=proxies, pending_note="")
        self._attempts = policy.max_attempts
        self._calls = RetriedCalls(
            replace(policy, retry_ambiguous=True),
            sleep=sleep,
            clock=clock,
            on_retry=_log_retry,
        )

    async def search(self, query: SearchSettings) -> SearchResult:
        """The ids `query` finds, at most ``query.limit``, without repeats."""
        endpoint = f"{self._root}/{query.workspace}/{query.project}/search"
        what = f"the search of {query.workspace}/{query.project}"
        url = self._keyed(endpoint, what)
        found: dict[str, None] = {}
        offset, requests, total = 0, 0, None
        while len(found) < query.limit:
            size = min(PAGE_LIMIT, query.limit - len(found))
            body = {
                **query.filters(),
                "offset": offset,
                "limit": size,
                "fields": list(SEARCH_FIELDS),
            }
            ids, total = await self._page(url, endpoint, body, what)
            requests += 1
            for image_id in ids[: query.limit - len(found)]:
                found.setdefault(image_id)
            offset += len(ids)
            if len(ids) < size or (total is not None and offset >= total):
                break
        return SearchResult(ids=tuple(found), total=total, requests=requests)

    def _keyed(self, endpoint: str, what: str) -> URL:
        """The endpoint with the key as query parameter (none for the keyless mock)."""
        try:
            url = self._http.keyed_url(endpoint)
        except aiohttp.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https"):
            raise FatalError(
                f"invalid API URL {redact(endpoint)} for {what}: check backend.base_url",
                kind="connection",
            )
        return url

    async def _page(
        self, url: URL, endpoint: str, body: Mapping[str, Any], what: str
    ) -> tuple[list[str], int | None]:
        """One page's ids and total, with retries; `FatalError` when they run out."""
        try:
            return await self._calls.call(lambda: self._ask(url, endpoint, body, what))
        except TransientError as last:
            failure = FatalError(
                f"{what} failed {self._attempts} times (last: {last.message}): check the "
                "API's status and run the same command again",
                kind=last.kind,
                status=last.status,
            )
        raise failure

    async def _ask(
        self, url: URL, endpoint: str, body: Mapping[str, Any], what: str
    ) -> tuple[list[str], int | None]:
        _log.debug("POST %s offset %s limit %s", endpoint, body["offset"], body["limit"])
        status, chunks, headers = await self._http.send(lambda: url, endpoint, json=body)
        raw = b"".join(chunks)
        _log.debug("%s answered HTTP %d (%d bytes)", endpoint, status, len(raw))
        text = self._http.scrub(raw.decode("utf-8", errors="replace"))
        if not 200 <= status < 300:
            raise _search_error(self._http.http_error(status, text, headers), what)
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = _INVALID
        if payload is _INVALID:
            raise TransientError(
                f"HTTP {status} with invalid JSON from {what}: {excerpt(text)}",
                kind="bad_response",
                status=status,
            )
        try:
            return parse_search_page(payload)
        except TransientError as error:
            failure = error
        failure.status = status
        raise self._http.scrub_error(failure)  # an answer may echo the key


def _log_retry(error: BackendError, attempt: int, wait_s: float) -> None:
    _log.info("search attempt %d: %s; retrying in %.1f s", attempt, error.message, wait_s)


_INVALID = object()


def _search_error(error: BackendError, what: str) -> BackendError:
    """`classify_http`'s error, worded for a search: what the user should check."""
    status = error.status
    if isinstance(error, TransientError):
        return error
    detail = error.message.split(" — ", 1)[0]
    if status in (401, 403):
        advice = (
            "Roboflow refused the key: check the API key variable (backend.api_key_env) "
            "and that the key can read the workspace"
        )
    elif status == 404:
        advice = "unknown workspace or project: check roboflow_search.workspace and .project"
    elif isinstance(error, FatalError):
        return FatalError(f"{what}: {error.message}", kind=error.kind, status=status)
    else:
        advice = "the API refused the query: check the source's roboflow_search"
    return FatalError(f"{what}: {detail} — {advice}", kind="http_status", status=status)


def parse_search_page(payload: Any) -> tuple[list[str], int | None]:
    """The image ids of one search answer and its ``total`` (None when absent).

    The documented answer is ``{"offset", "total", "results": [{"id", ...}]}``; anything
    else is a ``bad_response`` (retried: a garbled answer is usually transient).
    """
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        raise TransientError(
            f"the search answered without a results list: {excerpt(repr(payload))}",
            kind="bad_response",
        )
    ids: list[str] = []
    for element in results:
        image_id = element.get("id") if isinstance(element, dict) else None
        if not isinstance(image_id, str) or not image_id.strip():
            raise TransientError(
                f"a search result without an image id: {excerpt(repr(element))}",
                kind="bad_response",
            )
        ids.append(image_id)
    total = payload.get("total")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        total = None
    return ids, total
