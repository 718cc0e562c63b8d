"""`ApiClient`: the HTTP side every API client composes (Roboflow, OpenAI, Batch API,
search, upload).

One aiohttp session per client, sized to the run's concurrency. It owns what the
clients share: proxies, timeouts, the key (as Roboflow's ``?api_key=`` or a Bearer
header, built per request so that no shared object holds it), the scrubbing of the key
from every URL and message, the mapping of transport failures and non-2xx answers to
`BackendError` classes (`pipeline.backends.base.classify_http`), and reading answers:
JSON, bytes, an image answer as a `Generation`. No aiohttp
exception escapes: their text holds the request URL and with it the key.

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
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from .._version import __version__
from ..credentials import DIRECT, ProxySettings
from ..errors import BackendError, FatalError, TransientError
from ..records import GeneratedImage, Generation, WorkItem
from .base import (
    classify_http,
    elide_images,
    excerpt,
    parse_images,
    parse_rate_limit,
    redact,
    scrub_strings,
)
from .inline import load_answer

__all__ = [
    "DOWNLOAD_CONNECTIONS",
    "LARGE_ANSWER_BYTES",
    "MIN_BARE_KEY_CHARS",
    "Answer",
    "ApiClient",
    "ApiClientOwner",
    "utc_now",
]

DOWNLOAD_CONNECTIONS = 4
"""Connections kept beyond `concurrency` so downloads never wait behind generations."""
LARGE_ANSWER_BYTES = 64 * 1024
"""Answers above this size (base64 images) are parsed in the client's own thread (one:
the event loop thread then competes for the GIL with one parser, not a pool of them)."""
MIN_BARE_KEY_CHARS = 8
"""A key shorter than this is scrubbed from URLs and ids only as an ``api_key=`` value."""
GIL_PAUSE_S = 0.0001
"""The parse thread's pause between pieces of base64 (a sleep releases the GIL; a shorter
one would take it back before a waiting thread has woken up)."""
GENERATION_PENDING = " (the image may still be generated)"
"""What a timeout's message adds for a request that may go on without us."""

_log = logging.getLogger(__name__)
_INVALID = object()

Answer = tuple[int, list[bytes], Mapping[str, str]]
"""Status, raw body (as it arrived, in pieces) and headers of one answer."""


_Owner = TypeVar("_Owner", bound="ApiClientOwner")


def utc_now() -> datetime:
    """The default clock: an aware UTC datetime (Retry-After dates are compared to it)."""
    return datetime.now(timezone.utc)


class ApiClient:
    """The session, key, proxies and error mapping of one API client.

    `projects` says whether the kind's requests name a Roboflow project (the advice of a
    404 or a refused key names only what the user can fix); `pending_note` is what a
    timeout's message adds (a request with side effects may go on without us).
    """

    def __init__(
        self,
        api_key: str,
        *,
        timeout_s: float,
        concurrency: int = 1,
        proxies: ProxySettings = DIRECT,
        clock: Callable[[], datetime] = utc_now,
        projects: bool = True,
        pending_note: str = GENERATION_PENDING,
    ) -> None:
        self._api_key = api_key
        self._encoder = json.JSONEncoder(separators=(",", ":"))
        self._limit = max(concurrency, 1) + DOWNLOAD_CONNECTIONS
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.clock = clock
        self._projects = projects
        self._pending_note = pending_note
        self._session: aiohttp.ClientSession | None = None
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="synthaug-parse")  # lazy thread
        self._closed = False
        self._proxies = proxies
        self._routes: dict[tuple[str, str | None, int | None], URL | None] = {}
        self._parsed: dict[str, URL] = {}

    def __repr__(self) -> str:
        return "ApiClient()"  # never the key

    async def aclose(self) -> None:
        """Close the session and its connections, and end the parsing thread."""
        self._closed = True
        await asyncio.to_thread(self.parser.shutdown)  # its thread ends with the client
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        """The client's session, opened on first use; RuntimeError once closed."""
        if self._closed:
            raise RuntimeError("the API client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=self.timeout,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # a keyed JSON API: no cookies to keep
                json_serialize=self._encoder.encode,  # one encoder, not one per request
                headers={"User-Agent": f"synthaug/{__version__}"},
            )
        return self._session

    # ------------------------------------------------------------------ the key

    def url(self, endpoint: str) -> URL:
        """`endpoint` parsed once (raises `aiohttp.InvalidURL` for a bad base_url)."""
        if endpoint not in self._parsed:
            try:
                url = URL(endpoint)
            except ValueError as exc:
                raise aiohttp.InvalidURL(endpoint) from exc
            if not url.is_absolute():
                raise aiohttp.InvalidURL(endpoint)
            self._parsed[endpoint] = url
        return self._parsed[endpoint]

    def keyed_url(self, endpoint: str, query: list[tuple[str, str]] | None = None) -> URL:
        """`endpoint` with the key as Roboflow's ``api_key`` query parameter (none for the
        keyless mock), then `query` (raises `aiohttp.InvalidURL` for a bad base_url)."""
        keyed = [("api_key", self._api_key)] if self._api_key else []
        if query is None:
            cache = f"\x00keyed:{endpoint}"  # one parse per endpoint: `params=` redoes it
            if cache not in self._parsed:
                self._parsed[cache] = self.url(endpoint).with_query(keyed)
            return self._parsed[cache]
        return self.url(endpoint).with_query([*keyed, *query])

    def auth(self) -> dict[str, str]:
        """The key as an ``Authorization: Bearer`` header, built per request."""
        return {"Authorization": f"Bearer {self._api_key}"}

    def scrub(self, text: str) -> str:
        """`text` without the key, even where an answer echoes it outside a query string."""
        text = redact(text)
        return text.replace(self._api_key, "***") if self._api_key else text

    def scrub_recorded(self, text: str) -> str:
        """`scrub` for a URL or id that is recorded: ``api_key=`` parameters always, the
        key's bare text only when it is long enough to be found by more than chance (a
        key ``1`` occurs in 127.0.0.1)."""
        return redact(text) if len(self._api_key) < MIN_BARE_KEY_CHARS else self.scrub(text)

    def scrub_reference(self, image: GeneratedImage) -> GeneratedImage:
        """`image` with its URL and id scrubbed: both are recorded, and the URL fetched."""
        url = self.scrub_recorded(image.url) if image.url is not None else None
        image_id = self.scrub_recorded(image.id) if image.id is not None else None
        if (url, image_id) == (image.url, image.id):
            return image
        return replace(image, url=url, id=image_id)

    def scrub_error(self, error: BackendError) -> BackendError:
        """`error` with the key scrubbed from its message (an answer may echo it)."""
        error.message = self.scrub(error.message)
        error.args = (error.message,)
        return error

    # ----------------------------------------------------------------- answers

    def http_error(
        self, status: int, text: str, headers: Mapping[str, str], *, model: object = None
    ) -> BackendError:
        """`classify_http` of a non-2xx answer whose body is `text` (scrubbed here)."""
        return classify_http(
            status,
            self.scrub(text),
            headers,
            now=self.clock(),
            projects=self._projects,
            model=model,
        )

    async def request(
        self, method: str, url: str, *, keyed: bool = False, **request: Any
    ) -> Answer:
        """`send` to `url` with the key (Bearer, or as a query parameter if `keyed`)."""
        if keyed:
            return await self.send(lambda: self.keyed_url(url), url, method=method, **request)
        headers = {**request.pop("headers", {}), **self.auth()}
        return await self.send(
            lambda: self.url(url), url, method=method, headers=headers, **request
        )

    async def json(self, method: str, url: str, **request: Any) -> Any:
        """The parsed JSON answer of a Bearer-keyed request; errors as for a generation."""
        status, chunks, headers = await self.request(method, url, **request)
        return self.json_of(url, status, b"".join(chunks), headers)

    def json_of(self, url: str, status: int, raw: bytes, headers: Mapping[str, str]) -> Any:
        """The parsed JSON of a 2xx answer; `http_error` of another, a ``bad_response``
        `TransientError` for a body that is not JSON."""
        if not 200 <= status < 300:
            raise self.http_error(status, raw.decode("utf-8", errors="replace"), headers)
        try:
            return json.loads(raw)
        except ValueError:
            text = self.scrub(raw.decode("utf-8", "replace"))
            raise TransientError(
                f"{url} answered invalid JSON: {excerpt(text)}",
                kind="bad_response",
                status=status,
            ) from None

    async def generation(
        self, item: WorkItem, sending: Awaitable[Answer], *, what: str
    ) -> Generation:
        """The `Generation` of the image request `sending` makes (parsed in the parse
        thread when large); errors carry the item's key. `what` names the endpoint in
        the debug log."""
        try:
            status, chunks, headers = await sending
            _log.debug("%s answered HTTP %d (%d bytes)", what, status, sum(map(len, chunks)))
            # an error naming no model (model_not_found) is told which one was asked for
            model = item.params.get("model")
            if sum(map(len, chunks)) > LARGE_ANSWER_BYTES:  # parsing would hold the loop
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    self.parser, self._generation, status, chunks, headers, model
                )
            return self._generation(status, chunks, headers, model)
        except BackendError as error:
            error.item_key = item.key
            self.scrub_error(error)
            raise

    def _generation(
        self, status: int, chunks: list[bytes], headers: Mapping[str, str], model: object
    ) -> Generation:
        """The answer as a `Generation`, parsed from the raw bytes.

        Only text that is shown or kept is scrubbed of the key: error messages, image
        URLs and ids, and the answer the manifest keeps, after its image data is elided.
        Scrubbing the raw body instead would also replace the key wherever its characters
        happen to occur in base64 image data (every image, for a one-character key), and
        costs milliseconds per megabyte.
        """
        raw = b"".join(chunks)
        if not 200 <= status < 300:
            text = raw.decode("utf-8", errors="replace")
            raise self.http_error(status, text, headers, model=model)
        payload = _load_json(raw, in_thread=len(raw) > LARGE_ANSWER_BYTES)
        if payload is _INVALID:
            text = self.scrub(raw.decode("utf-8", errors="replace"))
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
            images=tuple(self.scrub_reference(image) for image in images),
            response=scrub_strings(elide_images(payload), self.scrub),
            status=status,
            rate_limit=parse_rate_limit(headers),
        )

    def scrubbed_json(self, chunks: list[bytes]) -> Any:
        """The JSON of a body, scrubbed of the key; None when it is not JSON."""
        try:
            payload = json.loads(b"".join(chunks))
        except ValueError:
            payload = None
        return scrub_strings(payload, self.scrub)

    async def image_bytes(self, image: GeneratedImage) -> bytes:
        """The bytes of an answer's `image`: inline data as is, or a GET of its URL."""
        if image.data is not None:
            return image.data
        if image.url is None:
            raise TransientError("an answer's image has neither URL nor data", kind="bad_response")
        return await self.fetch(image.url)

    async def fetch(self, url_text: str) -> bytes:
        """The bytes of a GET of `url_text` (an image): a `TransientError` ``download``
        for any failure, naming the URL without the key."""
        shown = self.scrub(url_text)
        session = self.session()
        failure: BackendError
        try:
            url = URL(url_text)
            async with session.get(url, proxy=self.proxy_for(url)) as response:
                if response.status == 200:
                    chunks = await _read_chunks(response)
                    if sum(map(len, chunks)) <= LARGE_ANSWER_BYTES:
                        return b"".join(chunks)
                    loop = asyncio.get_running_loop()
                    return await loop.run_in_executor(self.parser, b"".join, chunks)
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

    # --------------------------------------------------------------- transport

    async def send(
        self, url_of: Callable[[], URL], endpoint: str, *, method: str = "POST", **request: Any
    ) -> Answer:
        """Status, raw body (as it arrived, in pieces) and headers of the answer to a
        `method` request (POST unless told) to ``url_of()`` with `request` (aiohttp's
        arguments); transport failures as errors.
        `endpoint` is the URL as messages show it (without a key).

        The pieces are joined by whoever parses them: for a 1.5 MB answer that copy takes
        about a millisecond, which the event loop need not spend.

        The error is raised outside the ``except`` blocks so that no aiohttp exception
        (whose text holds the keyed URL) is chained to it as ``__context__``.
        """
        session = self.session()
        failure: BackendError
        proxy: URL | None = None
        try:
            url = url_of()
            proxy = self.proxy_for(url)
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
                f"no answer from {endpoint} in time{self._pending_note}",
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

    def proxy_for(self, url: URL) -> URL | None:
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


class ApiClientOwner:
    """What a client that composes an `ApiClient` (as ``_http``) is as an async context
    manager: entering opens the session, leaving (or `aclose`) closes it."""

    _http: ApiClient

    async def __aenter__(self: _Owner) -> _Owner:
        self._http.session()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session and its connections, and end the parsing thread."""
        await self._http.aclose()


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


def _load_json(raw: bytes, *, in_thread: bool) -> Any:
    """The parsed answer (inline images decoded: `load_answer`), or `_INVALID` (returned,
    not raised, to keep no exception context). `in_thread`: this runs in the parse
    thread, which gives the GIL away between pieces of base64 (never on the loop)."""
    try:
        return load_answer(raw, between_pieces=_give_way if in_thread else _keep_on)
    except ValueError:
        return _INVALID


async def _read_chunks(response: aiohttp.ClientResponse) -> list[bytes]:
    """The whole body of `response`, as the pieces in which it arrived (not joined)."""
    chunks: list[bytes] = []
    while chunk := await response.content.readany():
        chunks.append(chunk)
    return chunks
