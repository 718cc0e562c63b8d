"""The Roboflow ``POST /synthetic-image`` client (also what talks to the embedded mock).

One aiohttp session per run, sized to the engine's concurrency. Every failure leaves as
a `BackendError` whose class says what to do with it; no aiohttp exception escapes,
because their text holds the request URL and with it the API key.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from pipeline import __version__
from pipeline.backends.base import (
    classify_http,
    elide_images,
    excerpt,
    parse_images,
    parse_rate_limit,
    redact,
)
from pipeline.errors import BackendError, FatalError, TransientError
from pipeline.records import GeneratedImage, Generation, WorkItem, request_body

__all__ = ["DOWNLOAD_CONNECTIONS", "RoboflowBackend", "utc_now"]

DOWNLOAD_CONNECTIONS = 4
"""Connections kept beyond `concurrency` so downloads never wait behind generations."""

_log = logging.getLogger(__name__)
_INVALID = object()


def utc_now() -> datetime:
    """The default clock: an aware UTC datetime (Retry-After dates are compared to it)."""
    return datetime.now(timezone.utc)


class RoboflowBackend:
    """Sends work items to ``{base_url}/synthetic-image`` and downloads the answers."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int,
        timeout_s: float,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._endpoint = base_url.rstrip("/") + "/synthetic-image"
        self._api_key = api_key
        self._keyed_url: URL | None = None  # built on first use: a bad base_url fails there
        self._encoder = json.JSONEncoder(separators=(",", ":"))
        self._limit = max(concurrency, 1) + DOWNLOAD_CONNECTIONS
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RoboflowBackend({self._endpoint!r})"

    async def __aenter__(self) -> RoboflowBackend:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session and its connections."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        """POST the request for `item`; raises a `BackendError` subclass on any failure."""
        body = request_body(item, image)
        _log.debug("POST %s for item %s", self._endpoint, item.key[:16])
        try:
            status, raw, headers = await self._post(body)
            return self._generation(status, raw, headers)
        except BackendError as error:
            error.item_key = item.key
            error.message = self._scrub(error.message)
            error.args = (error.message,)
            raise

    async def download(self, image: GeneratedImage) -> bytes:
        """The bytes of `image`: inline data as is, or a GET of its URL."""
        if image.data is not None:
            return image.data
        if image.url is None:
            raise TransientError("an answer's image has neither URL nor data", kind="bad_response")
        shown = self._scrub(image.url)
        session = self._ensure_session()
        failure: BackendError
        try:
            async with session.get(image.url) as response:
                if response.status == 200:
                    return await response.read()
                failure = TransientError(
                    f"download of {shown} failed: HTTP {response.status}",
                    kind="download",
                    status=response.status,
                )
        except asyncio.TimeoutError:
            failure = TransientError(f"download of {shown} timed out", kind="download")
        except aiohttp.ClientError as exc:
            failure = TransientError(
                f"download of {shown} failed: {type(exc).__name__}", kind="download"
            )
        raise failure

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("RoboflowBackend is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=self._timeout,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # a keyed JSON API: no cookies to keep
                json_serialize=self._encoder.encode,  # one encoder, not one per request
                headers={"User-Agent": f"synthaug/{__version__}"},
            )
        return self._session

    async def _post(self, body: Mapping[str, Any]) -> tuple[int, bytes, Mapping[str, str]]:
        """Status, raw body and headers of the answer; transport failures as errors.

        The error is raised outside the ``except`` blocks so that no aiohttp exception
        (whose text holds the keyed URL) is chained to it as ``__context__``.
        """
        session = self._ensure_session()
        failure: BackendError
        try:
            # The keyed URL is parsed once per backend: `params=` would redo it every time.
            async with session.post(self._post_url(), json=body) as response:
                return response.status, await response.read(), response.headers
        except aiohttp.ConnectionTimeoutError:
            failure = TransientError(
                f"timed out connecting to {self._endpoint}", kind="timeout", ambiguous=False
            )
        except asyncio.TimeoutError:
            failure = TransientError(
                f"no answer from {self._endpoint} in time (the image may still be generated)",
                kind="timeout",
                ambiguous=True,
            )
        except aiohttp.ClientConnectorError as exc:
            failure = TransientError(
                f"cannot connect to {self._endpoint}: {type(exc).__name__}",
                kind="connection",
                ambiguous=False,
            )
        except aiohttp.InvalidURL:
            failure = FatalError(
                f"invalid API URL {self._endpoint}: check backend.base_url", kind="connection"
            )
        except aiohttp.ClientError as exc:
            failure = TransientError(
                f"connection to {self._endpoint} lost after sending: {type(exc).__name__}",
                kind="connection",
                ambiguous=True,
            )
        raise failure

    def _post_url(self) -> URL:
        """The endpoint with the key as query parameter (raises `aiohttp.InvalidURL`)."""
        if self._keyed_url is None:
            try:
                url = URL(self._endpoint)
            except ValueError as exc:
                raise aiohttp.InvalidURL(self._endpoint) from exc
            if not url.is_absolute():
                raise aiohttp.InvalidURL(self._endpoint)
            self._keyed_url = url.extend_query(api_key=self._api_key)
        return self._keyed_url

    def _generation(self, status: int, raw: bytes, headers: Mapping[str, str]) -> Generation:
        text = self._scrub(raw.decode("utf-8", errors="replace"))
        _log.debug("%s answered HTTP %d (%d bytes)", self._endpoint, status, len(raw))
        if not 200 <= status < 300:
            raise classify_http(status, text, headers, now=self._clock())
        payload = _load_json(text)  # scrubbed: the manifest keeps this answer
        if payload is _INVALID:
            raise TransientError(
                f"HTTP {status} with invalid JSON: {excerpt(text)}",
                kind="bad_response",
                status=status,
            )
        try:
            images = parse_images(payload)
        except BackendError as error:
            error.status = status
            raise
        return Generation(
            images=images,
            response=elide_images(payload),
            status=status,
            rate_limit=parse_rate_limit(headers),
        )

    def _scrub(self, text: str) -> str:
        """`text` without the key, even where an answer echoes it outside a query string."""
        text = redact(text)
        return text.replace(self._api_key, "***") if self._api_key else text


def _load_json(text: str) -> Any:
    """The parsed answer, or `_INVALID` (returned, not raised, to keep no exception context)."""
    try:
        return json.loads(text)
    except ValueError:
        return _INVALID
