"""The Roboflow HTTP client and the answer/error parsing it shares (no network: aioresponses)."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import socket
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aioresponses import aioresponses

from pipeline.backends.base import (
    classify_http,
    elide_images,
    encode_image,
    parse_images,
    parse_rate_limit,
    parse_retry_after,
    redact,
)
from pipeline.backends.roboflow import DOWNLOAD_CONNECTIONS, RoboflowBackend
from pipeline.errors import (
    BackendError,
    FatalError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from pipeline.records import GeneratedImage, InputImage, RateLimitHint, WorkItem, request_body

KEY = "sk-test-UNIQUE-7f3a"
BASE = "https://api.roboflow.test"
ENDPOINT = re.compile(r"^https://api\.roboflow\.test/synthetic-image\?api_key=.*$")
IMAGE_URL = "https://cdn.roboflow.test/gen/abc.png"
NOW = datetime(2026, 10, 21, 7, 28, 0, tzinfo=timezone.utc)
PNG = b"\x89PNG\r\n\x1a\nfake-bytes"
B64 = base64.b64encode(PNG).decode()


def make_item(**overrides: Any) -> WorkItem:
    """A minimal work item; `overrides` replace its fields."""
    fields: dict[str, Any] = {
        "key": "f" * 64,
        "source": "maple",
        "prompt": "A street in late fall",
        "project_url": "fall-leaves",
        "params": {"model": "gpt-image-2", "n": 1},
    }
    fields.update(overrides)
    return WorkItem(**fields)


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[RoboflowBackend]:
    """A real backend against the fake host that `mock_http` intercepts."""
    async with RoboflowBackend(
        BASE + "/", KEY, concurrency=3, timeout_s=5, clock=lambda: NOW
    ) as client:
        yield client


def sent_calls(mock_http: aioresponses, method: str = "POST") -> list[tuple[str, Any]]:
    """(URL, kwargs) of every intercepted request with `method`."""
    return [
        (str(url), call.kwargs)
        for (verb, url), calls in mock_http.requests.items()
        if verb == method
        for call in calls
    ]


# ---- answer shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param([IMAGE_URL], [GeneratedImage(url=IMAGE_URL)], id="array-of-urls"),
        pytest.param(
            {"data": [{"url": IMAGE_URL, "id": "a1"}]},
            [GeneratedImage(url=IMAGE_URL, id="a1")],
            id="data-url-id",
        ),
        pytest.param(
            {"images": [{"image_url": IMAGE_URL, "image_id": 7}]},
            [GeneratedImage(url=IMAGE_URL, id="7")],
            id="images-image_url-image_id",
        ),
        pytest.param(
            {"results": [{"image": IMAGE_URL}, IMAGE_URL]},
            [GeneratedImage(url=IMAGE_URL), GeneratedImage(url=IMAGE_URL)],
            id="results-image-and-string",
        ),
        pytest.param(
            {"data": [{"b64_json": B64, "id": "b"}]},
            [GeneratedImage(data=PNG, id="b")],
            id="b64_json",
        ),
        pytest.param(
            [{"image": "data:image/png;base64," + B64}],
            [GeneratedImage(data=PNG)],
            id="image-data-uri",
        ),
        pytest.param([{"image": B64}], [GeneratedImage(data=PNG)], id="image-bare-base64"),
        pytest.param(
            [{"id": "x", "url": IMAGE_URL, "b64_json": B64}],
            [GeneratedImage(url=IMAGE_URL, id="x")],
            id="url-preferred-over-b64",
        ),
    ],
)
def test_parse_images_accepts_every_documented_shape(payload: Any, expected: list[Any]) -> None:
    """Every answer shape the contract lists yields its images (URLs or decoded bytes)."""
    assert list(parse_images(payload)) == expected


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param([], id="empty-array"),
        pytest.param({"data": []}, id="empty-data"),
        pytest.param({}, id="empty-object"),
        pytest.param({"status": "queued"}, id="no-list"),
        pytest.param({"data": "https://x.test/a.png"}, id="data-not-a-list"),
        pytest.param([42], id="number-element"),
        pytest.param([{"name": "a.png"}], id="object-without-image"),
        pytest.param("https://x.test/a.png", id="bare-string"),
        pytest.param(None, id="null"),
    ],
)
def test_parse_images_rejects_other_shapes_as_bad_response(payload: Any) -> None:
    """An answer of any other shape is a transient bad_response (retried like a 5xx)."""
    with pytest.raises(TransientError) as caught:
        parse_images(payload)
    assert caught.value.kind == "bad_response"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"data": [{"b64_json": "not base64!!"}]}, id="b64_json"),
        pytest.param([{"image": "data:image/png;base64,%%%"}], id="data-uri"),
        pytest.param({"data": [{"b64_json": ""}]}, id="empty"),
    ],
)
def test_invalid_base64_is_bad_image(payload: Any) -> None:
    """Inline image data that does not decode fails as bad_image."""
    with pytest.raises(TransientError) as caught:
        parse_images(payload)
    assert caught.value.kind == "bad_image"


def test_elide_images_replaces_inline_data_with_its_size() -> None:
    """The manifest's copy of an answer keeps URLs but not megabytes of base64."""
    payload: dict[str, Any] = {
        "data": [{"b64_json": B64, "id": "1"}, {"url": IMAGE_URL}],
        "extra": [{"image": "data:image/png;base64," + B64}, {"image": IMAGE_URL}],
        "created": 1,
    }
    elided = elide_images(payload)
    assert elided == {
        "data": [{"b64_json": f"<elided {len(PNG)} bytes>", "id": "1"}, {"url": IMAGE_URL}],
        "extra": [{"image": f"<elided {len(PNG)} bytes>"}, {"image": IMAGE_URL}],
        "created": 1,
    }
    assert payload["data"][0]["b64_json"] == B64


def test_encode_image_is_base64_of_the_bytes() -> None:
    """A local file is sent as the plain base64 of its bytes."""
    assert base64.b64decode(encode_image(PNG)) == PNG


# ---- generate over HTTP ------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param([IMAGE_URL], id="array"),
        pytest.param({"data": [{"url": IMAGE_URL, "id": "a1"}]}, id="data"),
        pytest.param({"images": [{"image_url": IMAGE_URL}]}, id="images"),
        pytest.param({"results": [{"image": IMAGE_URL}]}, id="results"),
    ],
)
async def test_generate_posts_the_body_and_parses_the_answer(
    backend: RoboflowBackend, mock_http: aioresponses, payload: Any
) -> None:
    """generate POSTs request_body() with the key as query parameter and returns the images."""
    mock_http.post(ENDPOINT, payload=payload)
    item = make_item(input=InputImage("id", "62MYRuqqWCRZ02q52vsY"))
    generation = await backend.generate(item, "62MYRuqqWCRZ02q52vsY")
    assert [image.url for image in generation.images] == [IMAGE_URL]
    assert generation.status == 200
    assert generation.response == payload
    [(url, kwargs)] = sent_calls(mock_http)
    assert url == f"{BASE}/synthetic-image?api_key={KEY}"
    assert kwargs["json"] == request_body(item, "62MYRuqqWCRZ02q52vsY")


async def test_generate_with_b64_answer_elides_response(
    backend: RoboflowBackend, mock_http: aioresponses
) -> None:
    """A b64_json answer gives the bytes, and the recorded response holds only their size."""
    mock_http.post(ENDPOINT, payload={"data": [{"b64_json": B64}]})
    generation = await backend.generate(make_item(), None)
    assert generation.images == (GeneratedImage(data=PNG),)
    assert generation.response == {"data": [{"b64_json": f"<elided {len(PNG)} bytes>"}]}
    assert await backend.download(generation.images[0]) == PNG


async def test_generate_reports_rate_limit_headers(
    backend: RoboflowBackend, mock_http: aioresponses
) -> None:
    """x-ratelimit-* headers of a success reach the engine as a RateLimitHint."""
    headers = {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "6m0s"}
    mock_http.post(ENDPOINT, payload=[IMAGE_URL], headers=headers)
    generation = await backend.generate(make_item(), None)
    assert generation.rate_limit == RateLimitHint(remaining=3, reset_s=360.0)


# ---- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "error_class", "kind"),
    [
        pytest.param(401, "Unauthorized", {}, FatalError, "http_status", id="401"),
        pytest.param(403, "Forbidden", {}, FatalError, "http_status", id="403"),
        pytest.param(404, "Not found", {}, FatalError, "http_status", id="404"),
        pytest.param(408, "", {}, TransientError, "http_status", id="408"),
        pytest.param(425, "", {}, TransientError, "http_status", id="425"),
        pytest.param(500, "oops", {}, TransientError, "http_status", id="500"),
        pytest.param(503, "busy", {}, TransientError, "http_status", id="503"),
        pytest.param(400, '{"error": "bad size"}', {}, PermanentError, "http_status", id="400"),
        pytest.param(422, "unprocessable", {}, PermanentError, "http_status", id="422"),
        pytest.param(
            400,
            '{"error": {"code": "content_policy_violation"}}',
            {},
            PermanentError,
            "refused",
            id="refusal-code",
        ),
        pytest.param(
            400,
            "Your request was rejected as a result of our safety system.",
            {},
            PermanentError,
            "refused",
            id="refusal-safety-system",
        ),
        pytest.param(
            429, "slow down", {"Retry-After": "7"}, RateLimitedError, "http_status", id="429"
        ),
    ],
)
async def test_http_statuses_map_to_error_classes(
    backend: RoboflowBackend,
    mock_http: aioresponses,
    status: int,
    body: str,
    headers: dict[str, str],
    error_class: type[BackendError],
    kind: str,
) -> None:
    """Each HTTP status becomes the error class that tells the engine what to do."""
    mock_http.post(ENDPOINT, status=status, body=body, headers=headers)
    with pytest.raises(BackendError) as caught:
        await backend.generate(make_item(), None)
    error = caught.value
    assert type(error) is error_class
    assert (error.kind, error.status, error.item_key) == (kind, status, "f" * 64)
    assert f"HTTP {status}" in str(error)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"Retry-After": "12"}, 12.0, id="seconds"),
        pytest.param({"retry-after": "Wed, 21 Oct 2026 07:28:30 GMT"}, 30.0, id="http-date"),
        pytest.param({}, None, id="absent"),
        pytest.param({"Retry-After": "soon"}, None, id="garbage"),
    ],
)
async def test_429_carries_retry_after(
    backend: RoboflowBackend,
    mock_http: aioresponses,
    headers: dict[str, str],
    expected: float | None,
) -> None:
    """A 429's Retry-After (seconds or HTTP date, against the injected clock) is kept."""
    mock_http.post(ENDPOINT, status=429, body="rate limited", headers=headers)
    with pytest.raises(RateLimitedError) as caught:
        await backend.generate(make_item(), None)
    assert caught.value.retry_after == expected


def test_fatal_messages_name_the_fix() -> None:
    """401/403 point at the key variable, 404 at project_url and base_url."""
    for status in (401, 403):
        message = str(classify_http(status, "no", {}, now=NOW))
        assert "api_key_env" in message
    message = str(classify_http(404, "no", {}, now=NOW))
    assert "project_url" in message
    assert "base_url" in message


def test_error_messages_keep_a_short_excerpt() -> None:
    """A huge error body is cut to a short excerpt in the message."""
    error = classify_http(500, "x" * 5000, {}, now=NOW)
    assert "HTTP 500" in str(error)
    assert 190 <= str(error).count("x") <= 200


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param('{"data": [', "application/json", id="invalid-json"),
        pytest.param("<html>gateway</html>", "text/html", id="html"),
        pytest.param('{"status": "queued"}', "application/json", id="wrong-shape"),
    ],
)
async def test_unusable_200_is_bad_response(
    backend: RoboflowBackend, mock_http: aioresponses, body: str, content_type: str
) -> None:
    """A 200 whose body is not JSON, or JSON of the wrong shape, is a retried bad_response."""
    mock_http.post(ENDPOINT, status=200, body=body, content_type=content_type)
    with pytest.raises(TransientError) as caught:
        await backend.generate(make_item(), None)
    assert caught.value.kind == "bad_response"
    assert caught.value.item_key == "f" * 64


@pytest.mark.parametrize(
    ("exception", "kind", "ambiguous"),
    [
        pytest.param(asyncio.TimeoutError(), "timeout", True, id="read-timeout"),
        pytest.param(aiohttp.SocketTimeoutError(), "timeout", True, id="socket-timeout"),
        pytest.param(aiohttp.ConnectionTimeoutError(), "timeout", False, id="connect-timeout"),
        pytest.param(aiohttp.ServerDisconnectedError(), "connection", True, id="disconnect"),
        pytest.param(aiohttp.ClientPayloadError("cut"), "connection", True, id="payload"),
        pytest.param(
            aiohttp.ClientOSError(104, "Connection reset by peer"),
            "connection",
            True,
            id="reset",
        ),
    ],
)
async def test_transport_failures_are_transient(
    backend: RoboflowBackend,
    mock_http: aioresponses,
    exception: Exception,
    kind: str,
    ambiguous: bool,
) -> None:
    """Timeouts and dropped connections are retried; ambiguous when the server may have paid."""
    mock_http.post(ENDPOINT, exception=exception)
    with pytest.raises(TransientError) as caught:
        await backend.generate(make_item(), None)
    assert (caught.value.kind, caught.value.ambiguous) == (kind, ambiguous)
    assert caught.value.item_key == "f" * 64


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_connection_refused_is_unambiguous() -> None:
    """A refused connection never reached the server: transient, and safe to retry."""
    url = f"http://127.0.0.1:{closed_port()}"
    async with RoboflowBackend(url, KEY, concurrency=1, timeout_s=5) as client:
        with pytest.raises(TransientError) as caught:
            await client.generate(make_item(), None)
    assert (caught.value.kind, caught.value.ambiguous) == ("connection", False)


# ---- downloads -------------------------------------------------------------------------


async def test_download_gets_the_url(backend: RoboflowBackend, mock_http: aioresponses) -> None:
    """download GETs the image URL (without the API key) and returns its bytes."""
    mock_http.get(IMAGE_URL, body=PNG, content_type="image/png")
    assert await backend.download(GeneratedImage(url=IMAGE_URL)) == PNG
    [(url, _)] = sent_calls(mock_http, "GET")
    assert url == IMAGE_URL


@pytest.mark.parametrize(
    ("response", "status"),
    [
        pytest.param({"status": 404}, 404, id="404-expired"),
        pytest.param({"status": 500}, 500, id="500"),
        pytest.param({"status": 403}, 403, id="403"),
        pytest.param({"exception": asyncio.TimeoutError()}, None, id="timeout"),
        pytest.param({"exception": aiohttp.ServerDisconnectedError()}, None, id="disconnect"),
        pytest.param({"exception": aiohttp.ClientPayloadError("cut")}, None, id="payload"),
    ],
)
async def test_download_failures_are_download_errors(
    backend: RoboflowBackend,
    mock_http: aioresponses,
    response: dict[str, Any],
    status: int | None,
) -> None:
    """Any failed download is a transient download error carrying the status."""
    mock_http.get(IMAGE_URL, **response)
    with pytest.raises(TransientError) as caught:
        await backend.download(GeneratedImage(url=IMAGE_URL))
    assert (caught.value.kind, caught.value.status) == ("download", status)


async def test_download_of_inline_data_sends_nothing(
    backend: RoboflowBackend, mock_http: aioresponses
) -> None:
    """A b64 answer's image is returned as is, without any request."""
    assert await backend.download(GeneratedImage(data=PNG)) == PNG
    assert mock_http.requests == {}


# ---- the key never leaks -------------------------------------------------------------------

LEAKS: list[Any] = [
    pytest.param({"status": 401, "body": f"bad key api_key={KEY}"}, id="401-echo-query"),
    pytest.param({"status": 400, "body": f'{{"api_key": "{KEY}"}}'}, id="400-echo-json"),
    pytest.param({"status": 500, "body": f"key {KEY} broke us"}, id="500-echo-raw"),
    pytest.param({"status": 429, "body": f"{BASE}/x?api_key={KEY}"}, id="429-echo-url"),
    pytest.param({"status": 200, "body": f"not json {KEY}"}, id="invalid-json-echo"),
    pytest.param({"payload": {"oops": KEY}}, id="wrong-shape-echo"),
    pytest.param(
        {"exception": aiohttp.ClientPayloadError(f"{BASE}/synthetic-image?api_key={KEY}")},
        id="payload-error-with-url",
    ),
    pytest.param(
        {"exception": aiohttp.InvalidURL(f"{BASE}/synthetic-image?api_key={KEY}")},
        id="invalid-url",
    ),
    pytest.param({"exception": asyncio.TimeoutError(KEY)}, id="timeout"),
    pytest.param({"exception": aiohttp.ServerDisconnectedError(KEY)}, id="disconnect"),
]


def assert_no_key(error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    """The key is in no form of the error, nothing chained to it, and no log record."""
    texts = [str(error), repr(error), repr(error.args), getattr(error, "message", "")]
    assert not any(KEY in text for text in texts)
    assert error.__cause__ is None
    assert error.__context__ is None
    assert KEY not in caplog.text


@pytest.mark.parametrize("response", LEAKS)
async def test_api_key_never_appears_in_errors_or_logs(
    backend: RoboflowBackend,
    mock_http: aioresponses,
    caplog: pytest.LogCaptureFixture,
    response: dict[str, Any],
) -> None:
    """Whatever fails and whatever the server echoes, the key stays out of errors and logs."""
    caplog.set_level(logging.DEBUG)
    mock_http.post(ENDPOINT, **response)
    with pytest.raises(BackendError) as caught:
        await backend.generate(make_item(), None)
    assert_no_key(caught.value, caplog)


async def test_unmatched_request_error_hides_key(
    backend: RoboflowBackend, mock_http: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    """Even aiohttp's own 'connection refused <url>' text does not carry the key out."""
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TransientError) as caught:
        await backend.generate(make_item(), None)
    assert_no_key(caught.value, caplog)


def test_backend_repr_hides_key() -> None:
    """Printing the backend (e.g. in a debugger or log) does not show the key."""
    client = RoboflowBackend(BASE, KEY, concurrency=1, timeout_s=1)
    assert KEY not in repr(client)
    assert KEY not in str(vars(client).get("_endpoint"))


# ---- session -------------------------------------------------------------------------------


async def test_session_is_sized_to_concurrency_and_ignores_env_proxies() -> None:
    """One session per run: its pool fits the concurrency plus downloads; no env proxies."""
    async with RoboflowBackend(BASE, KEY, concurrency=5, timeout_s=1) as client:
        session = client._http.session()
        assert session.connector is not None
        assert session.connector.limit == 5 + DOWNLOAD_CONNECTIONS
        assert session.trust_env is False
    assert session.closed
    with pytest.raises(RuntimeError):
        await client.generate(make_item(), None)


# ---- header parsing helpers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("5", 5.0, id="int"),
        pytest.param(" 1.5 ", 1.5, id="float"),
        pytest.param("-3", 0.0, id="negative-clamped"),
        pytest.param("Wed, 21 Oct 2026 07:28:30 GMT", 30.0, id="date"),
        pytest.param("Wed, 21 Oct 2026 07:00:00 GMT", 0.0, id="date-past"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("nan", None, id="nan"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="none"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After in seconds or HTTP-date form; garbage is ignored rather than trusted."""
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_with_naive_clock() -> None:
    """A naive clock is taken as UTC."""
    naive = NOW.replace(tzinfo=None) - timedelta(seconds=10)
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:30 GMT", naive) == 40.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"},
            RateLimitHint(0, 1.0),
            id="openai-1s",
        ),
        pytest.param(
            {"X-RateLimit-Remaining-Requests": "4", "X-RateLimit-Reset-Requests": "20ms"},
            RateLimitHint(4, 0.02),
            id="openai-ms-mixed-case",
        ),
        pytest.param(
            {"x-ratelimit-remaining-requests": "9", "x-ratelimit-reset-requests": "1m30.5s"},
            RateLimitHint(9, 90.5),
            id="openai-m-s",
        ),
        pytest.param(
            {"x-ratelimit-remaining": "2", "x-ratelimit-reset": "12"},
            RateLimitHint(2, 12.0),
            id="generic-seconds",
        ),
        pytest.param(
            {"x-ratelimit-reset-requests": "1h"}, RateLimitHint(None, 3600.0), id="reset-only"
        ),
        pytest.param(
            {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "soon"},
            RateLimitHint(3, None),
            id="garbage-reset",
        ),
        pytest.param({"content-type": "application/json"}, None, id="absent"),
        pytest.param({"x-ratelimit-remaining": "lots"}, None, id="garbage-only"),
    ],
)
def test_parse_rate_limit(headers: dict[str, str], expected: RateLimitHint | None) -> None:
    """x-ratelimit-* headers, OpenAI style or generic, become a RateLimitHint."""
    assert parse_rate_limit(headers) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            f"POST {BASE}/synthetic-image?api_key={KEY}",
            f"POST {BASE}/synthetic-image?api_key=***",
            id="query-end",
        ),
        pytest.param(
            f"{BASE}/x?a=1&api_key={KEY}&b=2",
            f"{BASE}/x?a=1&api_key=***&b=2",
            id="query-middle",
        ),
        pytest.param(f"'{BASE}?api_key={KEY}'", f"'{BASE}?api_key=***'", id="quoted"),
        pytest.param(f'{{"api_key": "{KEY}"}}', '{"api_key": "***"}', id="json-field"),
        pytest.param("nothing secret here", "nothing secret here", id="untouched"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    """redact() hides the key in URLs and JSON echoes and changes nothing else."""
    assert redact(text) == expected


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"error": {"code": "content_policy_violation"}}', id="code"),
        pytest.param("rejected by our safety system", id="safety-system"),
        pytest.param("This violates our Content Policy.", id="content-policy"),
    ],
)
def test_only_400_refusals_are_refused(body: str) -> None:
    """A refusal is recognised only on a 400; a 500 mentioning it is still transient."""
    assert classify_http(400, body, {}, now=NOW).kind == "refused"
    assert isinstance(classify_http(500, body, {}, now=NOW), TransientError)


async def test_recorded_response_never_holds_the_key(
    backend: RoboflowBackend, mock_http: aioresponses
) -> None:
    """An answer that echoes the key is recorded (for the manifest) without it."""
    payload = {"data": [{"url": IMAGE_URL}], "request": {"api_key": KEY, "echo": KEY}}
    mock_http.post(ENDPOINT, payload=payload)
    generation = await backend.generate(make_item(), None)
    assert KEY not in repr(generation)
    assert generation.images == (GeneratedImage(url=IMAGE_URL),)


# ------------------------------------------------ an exhausted quota; the server's own clock


def _http_date(when: datetime) -> str:
    return when.strftime("%a, %d %b %Y %H:%M:%S GMT")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(
            429,
            '{"error": {"message": "You exceeded your current quota, please check your plan '
            'and billing details.", "type": "insufficient_quota", "code": "insufficient_quota"}}',
            id="openai-429-insufficient-quota",
        ),
        pytest.param(
            400,
            '{"error": {"code": "billing_hard_limit_reached", "message": "Billing hard limit '
            'has been reached"}}',
            id="400-billing-hard-limit",
        ),
        pytest.param(403, '{"error": "insufficient credits"}', id="403-no-credits"),
    ],
)
def test_exhausted_quota_is_fatal_and_says_what_to_do(status: int, body: str) -> None:
    """No credit left ends the run (exit 3) with the fix, instead of being paced or retried."""
    error = classify_http(status, body, {"Retry-After": "1"}, now=NOW)
    assert isinstance(error, FatalError)
    assert error.exit_code == 3
    assert "add credit or raise the billing limit" in error.message


def test_per_minute_quota_wording_is_still_a_rate_limit() -> None:
    """A 429 about a per-minute quota (Google's wording) is paced, not fatal."""
    body = "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute'"
    assert isinstance(classify_http(429, body, {}, now=NOW), RateLimitedError)


@pytest.mark.parametrize(
    ("server_ahead_s", "expected"),
    [
        pytest.param(20.0, 5.0, id="server-20s-ahead"),
        pytest.param(-30.0, 5.0, id="server-30s-behind"),
        pytest.param(0.0, 5.0, id="clocks-agree"),
    ],
)
def test_retry_after_date_is_measured_on_the_servers_clock(
    server_ahead_s: float, expected: float
) -> None:
    """A Retry-After date 5 s after the answer's Date waits 5 s, whatever our clock says."""
    server_now = NOW + timedelta(seconds=server_ahead_s)
    headers = {
        "Retry-After": _http_date(server_now + timedelta(seconds=5)),
        "Date": _http_date(server_now),
    }
    error = classify_http(429, "slow down", headers, now=NOW)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == pytest.approx(expected)


def test_retry_after_date_uses_the_finer_local_clock_when_clocks_agree() -> None:
    """A Date within its one-second resolution of our clock leaves the local clock in charge."""
    now = NOW + timedelta(milliseconds=700)  # the server's Date says :00, we are at :00.7
    value = _http_date(NOW + timedelta(seconds=2))
    assert parse_retry_after(value, now, server_date=_http_date(NOW)) == pytest.approx(1.3)
