"""The Roboflow ``POST /synthetic-image`` client (also what talks to the embedded mock).

One aiohttp session per run, sized to the engine's concurrency. Every failure leaves as
a `BackendError` whose class says what to do with it; no aiohttp exception escapes,
because their text holds the request URL and with it the API key.

Proxies come in as `ProxySettings` (read from HTTPS_PROXY / HTTP_PROXY / NO_PROXY by
`pipeline.credentials`) and are passed per request: the session keeps ``trust_env=False``,
which would also send ``~/.netrc`` passwords to any host it names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from .._version import __version__
from ..credentials import DIRECT, ProxySettings
from ..errors import BackendError, FatalError, TransientError
from ..records import GeneratedImage, Generation, WorkItem, request_body
from ..registry import backend_kind
from .base import (
    classify_http,
    elide_images,
    excerpt,
    load_answer,
    parse_images,
    parse_rate_limit,
    redact,
    scrub_strings,
)

__all__ = ["DOWNLOAD_CONNECTIONS", "LARGE_ANSWER_BYTES", "RoboflowBackend", "utc_now"]

DOWNLOAD_CONNECTIONS = 4
"""Connections kept beyond `concurrency` so downloads never wait behind generations."""
LARGE_ANSWER_BYTES = 64 * 1024
"""Answers above this size (base64 images) are parsed in the backend's own thread (one:
the event loop thread then competes for the GIL with one parser, not a pool of them)."""
GIL_PAUSE_S = 0.0001
"""The parse thread's pause between pieces of base64 (a sleep releases the GIL; a shorter
one would take it back before a waiting thread has woken up)."""
MIN_BARE_KEY_CHARS = 8
"""A key shorter than this is scrubbed from URLs and ids only as an ``api_key=`` value."""

_log = logging.getLogger(__name__)
_INVALID = object()


def utc_now() -> datetime:
    """The default clock: an aware UTC datetime (Retry-After dates are compared to it)."""
    return datetime.now(timezone.utc)


class RoboflowBackend:
    """Sends work items to ``{base_url}/synthetic-image`` and downloads the answers."""

    ENDPOINT_PATH = "/synthetic-image"
    KIND = "roboflow"  # the registry's kind whose API this class speaks (for its advice)

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int,
        timeout_s: float,
        clock: Callable[[], datetime] = utc_now,
        proxies: ProxySettings = DIRECT,
    ) -> None:
        self._root = base_url.rstrip("/")
        self._endpoint = self._root + self.ENDPOINT_PATH
        self._api_key = api_key
        self._keyed_url: URL | None = None  # built on first use: a bad base_url fails there
        self._encoder = json.JSONEncoder(separators=(",", ":"))
        self._limit = max(concurrency, 1) + DOWNLOAD_CONNECTIONS
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._parser = ThreadPoolExecutor(1, thread_name_prefix="synthaug-parse")  # lazy thread
        self._closed = False
        self._proxies = proxies
        self._routes: dict[tuple[str, str | None, int | None], URL | None] = {}

    def __repr__(self) -> str:
        return f"RoboflowBackend({self._endpoint!r})"

    @property
    def api_root(self) -> str:
        """The API root this client sends to (the embedded mock's URL for kind mock)."""
        return self._root

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
        """Close the session and its connections, and end the parsing thread."""
        self._closed = True
        await asyncio.to_thread(self._parser.shutdown)  # its thread ends with the backend
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        """POST the request for `item`; raises a `BackendError` subclass on any failure."""
        body = request_body(item, image)
        # the key has the mask's hash; this endpoint takes no mask (a spec error for kind
        # roboflow): the embedded mock's online rehearsal sends the edit without it
        body.pop("mask", None)
        _log.debug("POST %s for item %s", self._endpoint, item.key[:16])
        return await self._answer(item, self._post(body))

    async def _answer(
        self, item: WorkItem, sending: Awaitable[tuple[int, list[bytes], Mapping[str, str]]]
    ) -> Generation:
        """The `Generation` of the request `sending` makes; errors carry the item's key."""
        try:
            status, chunks, headers = await sending
            # an error naming no model (model_not_found) is told which one was asked for
            parse = partial(
                self._generation_of, status, chunks, headers, model=item.params.get("model")
            )
            if sum(map(len, chunks)) > LARGE_ANSWER_BYTES:  # parsing would hold the loop
                return await asyncio.get_running_loop().run_in_executor(self._parser, parse)
            return parse()
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
            url = URL(image.url)
            async with session.get(url, proxy=self._proxy_for(url)) as response:
                if response.status == 200:
                    chunks = await _read_chunks(response)
                    if sum(map(len, chunks)) <= LARGE_ANSWER_BYTES:
                        return b"".join(chunks)
                    loop = asyncio.get_running_loop()
                    return await loop.run_in_executor(self._parser, b"".join, chunks)
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
        except ValueError:  # yarl could not parse the URL
            failure = TransientError(f"download of {shown} failed: invalid URL", kind="download")
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

    async def _post(self, body: Mapping[str, Any]) -> tuple[int, list[bytes], Mapping[str, str]]:
        """`_send` of `body` as JSON to the keyed endpoint."""
        return await self._send(self._post_url, self._endpoint, json=body)

    async def _send(
        self, url_of: Callable[[], URL], endpoint: str, *, method: str = "POST", **request: Any
    ) -> tuple[int, list[bytes], Mapping[str, str]]:
        """Status, raw body (as it arrived, in pieces) and headers of the answer to a
        `method` request (POST unless told) to ``url_of()`` with `request` (aiohttp's
        arguments); transport failures as errors.
        `endpoint` is the URL as messages show it (without a key).

        The pieces are joined by whoever parses them: for a 1.5 MB answer that copy takes
        about a millisecond, which the event loop need not spend.

        The error is raised outside the ``except`` blocks so that no aiohttp exception
        (whose text holds the keyed URL) is chained to it as ``__context__``.
        """
        session = self._ensure_session()
        failure: BackendError
        proxy: URL | None = None
        try:
            # The keyed URL is parsed once per backend: `params=` would redo it every time.
            url = url_of()
            proxy = self._proxy_for(url)
            async with session.request(method, url, proxy=proxy, **request) as response:
                if response.status == 407 and proxy is not None:
                    raise _proxy_refused(proxy)
                return response.status, await _read_chunks(response), response.headers
        except aiohttp.ClientHttpProxyError as exc:
            failure = (
                _proxy_refused(proxy)
                if exc.status == 407 and proxy is not None
                else TransientError(
                    f"the proxy {_shown(proxy)} refused to connect to {endpoint}: "
                    f"HTTP {exc.status}",
                    kind="connection",
                    ambiguous=False,
                )
            )
        except aiohttp.ClientProxyConnectionError:
            failure = TransientError(
                f"cannot connect to the proxy {_shown(proxy)} for {endpoint}: "
                "check HTTPS_PROXY / HTTP_PROXY (or exempt the host in NO_PROXY)",
                kind="connection",
                ambiguous=False,
            )
        except aiohttp.ConnectionTimeoutError:
            failure = TransientError(
                f"timed out connecting to {endpoint}", kind="timeout", ambiguous=False
            )
        except asyncio.TimeoutError:
            failure = TransientError(
                f"no answer from {endpoint} in time (the image may still be generated)",
                kind="timeout",
                ambiguous=True,
            )
        except aiohttp.ClientConnectorError as exc:
            failure = TransientError(
                f"cannot connect to {endpoint}: {type(exc).__name__}",
                kind="connection",
                ambiguous=False,
            )
        except aiohttp.InvalidURL:
            failure = FatalError(
                f"invalid API URL {endpoint}: check backend.base_url", kind="connection"
            )
        except aiohttp.ClientError as exc:
            failure = TransientError(
                f"connection to {endpoint} lost after sending: {type(exc).__name__}",
                kind="connection",
                ambiguous=True,
            )
        raise failure

    def _proxy_for(self, url: URL) -> URL | None:
        """The proxy for `url`'s origin (credentials included), or None to go direct.

        Decided once per origin: NO_PROXY is not matched again for every request.
        """
        origin = (url.scheme, url.host, url.port)
        if origin not in self._routes:
            proxy = self._proxies.proxy_for(url.scheme, url.host or "")
            self._routes[origin] = URL(proxy) if proxy is not None else None
            _log.debug(
                "requests to %s go %s",
                url.origin(),
                f"through the proxy {_shown(self._routes[origin])}" if proxy else "direct",
            )
        return self._routes[origin]

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

    def _generation_of(
        self, status: int, chunks: list[bytes], headers: Mapping[str, str], *, model: object = None
    ) -> Generation:
        """`_generation` of the answer whose body came in as `chunks`."""
        return self._generation(status, b"".join(chunks), headers, model=model)

    def _generation(
        self, status: int, raw: bytes, headers: Mapping[str, str], *, model: object = None
    ) -> Generation:
        """The answer as a `Generation`, parsed from the raw bytes.

        Only text that is shown or kept is scrubbed of the key: error messages (here and
        in `generate`), image URLs and ids, and the answer the manifest keeps, after its
        image data is elided. Scrubbing the raw body instead would also replace the key
        wherever its characters happen to occur in base64 image data (every image, for a
        one-character key), and costs milliseconds per megabyte.
        """
        _log.debug("%s answered HTTP %d (%d bytes)", self._endpoint, status, len(raw))
        if not 200 <= status < 300:
            text = self._scrub(raw.decode("utf-8", errors="replace"))
            raise self._http_error(status, text, headers, model=model)
        payload = _load_json(raw, in_thread=len(raw) > LARGE_ANSWER_BYTES)
        if payload is _INVALID:
            text = self._scrub(raw.decode("utf-8", errors="replace"))
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
            images=tuple(self._scrub_reference(image) for image in images),
            response=scrub_strings(elide_images(payload), self._scrub),
            status=status,
            rate_limit=parse_rate_limit(headers),
        )

    def _http_error(
        self, status: int, text: str, headers: Mapping[str, str], *, model: object = None
    ) -> BackendError:
        """`classify_http` of a non-2xx answer, its advice naming only this kind's keys
        (an OpenAI spec has no project_url to check)."""
        kind = backend_kind(self.KIND)
        return classify_http(
            status,
            text,
            headers,
            now=self._clock(),
            projects=kind.needs_project or kind.project_in_body,
            model=model,
        )

    def _scrub(self, text: str) -> str:
        """`text` without the key, even where an answer echoes it outside a query string."""
        text = redact(text)
        return text.replace(self._api_key, "***") if self._api_key else text

    def _scrub_reference(self, image: GeneratedImage) -> GeneratedImage:
        """`image` with its URL and id scrubbed: both are recorded, and the URL fetched.

        ``api_key=`` parameters are always replaced; the key's bare text only when it is
        long enough to be found by more than chance (a key ``1`` occurs in 127.0.0.1).
        """
        scrub = redact if len(self._api_key) < MIN_BARE_KEY_CHARS else self._scrub
        url = scrub(image.url) if image.url is not None else None
        image_id = scrub(image.id) if image.id is not None else None
        if (url, image_id) == (image.url, image.id):
            return image
        return replace(image, url=url, id=image_id)


def _shown(proxy: URL | None) -> str:
    """A proxy as it may be printed: host and port, never its credentials."""
    return f"{proxy.host}:{proxy.port}" if proxy is not None else "(none)"


def _proxy_refused(proxy: URL) -> FatalError:
    """A 407: every request would get it, so the run stops rather than retries."""
    return FatalError(
        f"the proxy {_shown(proxy)} answered 407 Proxy Authentication Required: set or fix "
        "its credentials in HTTPS_PROXY / HTTP_PROXY as http://user:password@host:port",
        kind="connection",
        status=407,
    )


def _give_way() -> None:
    """Release the GIL for long enough that a waiting event loop thread takes it."""
    time.sleep(GIL_PAUSE_S)


def _keep_on() -> None:
    """On the event loop: no pause between pieces."""


async def _read_chunks(response: aiohttp.ClientResponse) -> list[bytes]:
    """The whole body of `response`, as the pieces in which it arrived (not joined)."""
    chunks: list[bytes] = []
    while chunk := await response.content.readany():
        chunks.append(chunk)
    return chunks


def _load_json(raw: bytes, *, in_thread: bool) -> Any:
    """The parsed answer (inline images decoded: `load_answer`), or `_INVALID` (returned,
    not raised, to keep no exception context). `in_thread`: this runs in the parse
    thread, which gives the GIL away between pieces of base64 (never on the loop)."""
    try:
        return load_answer(raw, between_pieces=_give_way if in_thread else _keep_on)
    except ValueError:
        return _INVALID
