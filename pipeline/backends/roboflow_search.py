"""The Roboflow image search client: ``POST {root}/{workspace}/{project}/search``.

A ``roboflow_search`` source's inputs are the image ids a search answers. The request is
the one Roboflow documents (and its Python SDK's ``Project.search`` sends): the key as
the ``api_key`` query parameter, a JSON body with the query (``prompt``, ``like_image``,
``tag`` or ``class_name``, and the filters ``in_dataset``, ``batch``, ``batch_id``),
``offset``, ``limit`` (at most 250 a page) and ``fields``. The answer is an object
``{"offset", "total", "results": [{"id", ...}, ...]}``.

Pages are asked for with a growing offset until the source's limit is reached, a page
comes back short, or ``total`` says there is no more. A search has no side effect, so
every transient failure (429, 5xx, timeout, connection, a garbled answer) is retried a
few times; what no retry can fix (401/403: the key; 404: workspace or project; another
4xx: the query) is a `FatalError` that says what to check. No aiohttp exception escapes:
their text holds the keyed URL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from .._version import __version__
from ..credentials import DIRECT, ProxySettings
from ..errors import BackendError, FatalError, RateLimitedError, TransientError
from ..spec.model import SearchSettings
from .base import classify_http, excerpt, redact

__all__ = [
    "PAGE_LIMIT",
    "SEARCH_ATTEMPTS",
    "SEARCH_FIELDS",
    "RoboflowSearch",
    "SearchResult",
    "parse_search_page",
]

PAGE_LIMIT = 250
"""Most results the search API returns per request (its documented maximum)."""
SEARCH_ATTEMPTS = 4
"""Tries per page before a transient failure aborts the run (it has not started yet)."""
SEARCH_FIELDS = ("id",)
"""The result fields asked for: only the id is used (the default adds names, labels...)."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """What one search found: image ids in the API's order, and its reported match count."""

    ids: tuple[str, ...]
    total: int | None
    requests: int


class RoboflowSearch:
    """Runs searches against the Roboflow API at `root` (or the embedded mock's URL).

    `sleep` waits between attempts (tests pass a fake); waits grow from `backoff_s`
    with full jitter, or follow a 429's Retry-After, never beyond `backoff_max_s`.
    """

    def __init__(
        self,
        root: str,
        api_key: str,
        *,
        timeout_s: float,
        proxies: ProxySettings = DIRECT,
        attempts: int = SEARCH_ATTEMPTS,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._root = root.rstrip("/")
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._proxies = proxies
        self._attempts = max(attempts, 1)
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RoboflowSearch:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            trust_env=False,  # proxies come from `proxies`; never ~/.netrc passwords
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": f"synthaug/{__version__}"},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
            url = URL(endpoint)
        except ValueError:
            url = None
        if url is None or not url.is_absolute() or url.scheme not in ("http", "https"):
            raise FatalError(
                f"invalid API URL {redact(endpoint)} for {what}: check backend.base_url",
                kind="connection",
            )
        return url.extend_query(api_key=self._api_key) if self._api_key else url

    async def _page(
        self, url: URL, endpoint: str, body: Mapping[str, Any], what: str
    ) -> tuple[list[str], int | None]:
        """One page's ids and total, with retries; `FatalError` when they run out."""
        last: BackendError | None = None
        for attempt in range(1, self._attempts + 1):
            _log.debug("POST %s offset %s limit %s", endpoint, body["offset"], body["limit"])
            try:
                return await self._ask(url, endpoint, body, what)
            except TransientError as error:
                last = error
            if attempt < self._attempts:
                wait = self._wait(last, attempt)
                _log.info("%s: %s; retrying in %.1f s", what, last.message, wait)
                await self._sleep(wait)
        assert last is not None
        raise FatalError(
            f"{what} failed {self._attempts} times (last: {last.message}): check the "
            "API's status and run the same command again",
            kind=last.kind,
            status=last.status,
        )

    def _wait(self, error: BackendError, attempt: int) -> float:
        """Seconds before the next attempt: the 429's Retry-After, or jittered backoff."""
        cap = min(self._backoff_max_s, self._backoff_s * 2 ** (attempt - 1))
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            return min(error.retry_after, self._backoff_max_s)
        return random.uniform(0, cap)  # full jitter, as the item retries wait

    async def _ask(
        self, url: URL, endpoint: str, body: Mapping[str, Any], what: str
    ) -> tuple[list[str], int | None]:
        status, raw, headers = await self._post(url, endpoint, body)
        _log.debug("%s answered HTTP %d (%d bytes)", endpoint, status, len(raw))
        text = self._scrub(raw.decode("utf-8", errors="replace"))
        if not 200 <= status < 300:
            raise _search_error(
                classify_http(status, text, headers, now=datetime.now(timezone.utc)), what
            )
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
        failure.message = self._scrub(failure.message)  # an answer may echo the key
        failure.args = (failure.message,)
        raise failure

    async def _post(
        self, url: URL, endpoint: str, body: Mapping[str, Any]
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """Status, body and headers of the answer; transport failures as `TransientError`,
        raised outside the ``except`` blocks so that no aiohttp exception is chained."""
        if self._session is None:
            raise RuntimeError("RoboflowSearch is used outside its `async with`")
        proxy = self._proxies.proxy_for(url.scheme, url.host or "")
        failure: BackendError
        try:
            async with self._session.post(url, json=body, proxy=proxy) as response:
                return response.status, await response.read(), response.headers
        except asyncio.TimeoutError:
            failure = TransientError(f"no answer from {endpoint} in time", kind="timeout")
        except aiohttp.ClientConnectorError as exc:
            failure = TransientError(
                f"cannot connect to {endpoint}: {type(exc).__name__}", kind="connection"
            )
        except aiohttp.ClientError as exc:
            failure = TransientError(
                f"connection to {endpoint} failed: {type(exc).__name__}", kind="connection"
            )
        raise failure

    def _scrub(self, text: str) -> str:
        text = redact(text)
        return text.replace(self._api_key, "***") if self._api_key else text


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
