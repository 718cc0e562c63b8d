"""The embedded mock API, exercised over real loopback HTTP by the real Roboflow client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from PIL import Image

from pipeline.backends.roboflow import RoboflowBackend
from pipeline.errors import (
    BackendError,
    FatalError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from pipeline.mockapi.image import draw_image, mock_color, paint
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.records import GeneratedImage, Generation, InputImage, RateLimitHint, WorkItem

KEY = "mock-key"
PROMPT = "A street in late fall with maple trees"


def make_item(prompt: str = PROMPT, **params: Any) -> WorkItem:
    """A prompt-only item for project ``fall``; `params` override n/size."""
    return WorkItem(
        key=hashlib.sha256(prompt.encode()).hexdigest(),
        source="maple",
        prompt=prompt,
        project_url="fall",
        params={"n": 1, "size": "1024x1024", **params},
    )


@asynccontextmanager
async def serve(
    config: MockConfig | None = None, *, key: str = KEY, timeout_s: float = 10.0
) -> AsyncIterator[tuple[MockServer, RoboflowBackend]]:
    """A running mock server and a real backend pointed at it."""
    async with (
        MockServer(config or MockConfig()) as server,
        RoboflowBackend(server.base_url, key, concurrency=4, timeout_s=timeout_s) as backend,
    ):
        yield server, backend


def decode(data: bytes) -> Image.Image:
    """A fully decoded image (raises on corrupt or truncated data)."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        rgb: Image.Image = opened.convert("RGB")
    return rgb


def centre(image: Image.Image) -> tuple[int, int, int]:
    """The centre pixel: pure `mock_color` by the mock's contract."""
    pixel = image.getpixel((image.width // 2, image.height // 2))
    assert isinstance(pixel, tuple)
    return pixel[0], pixel[1], pixel[2]


async def fetch_all(backend: RoboflowBackend, generation: Generation) -> list[Image.Image]:
    """Every image of an answer, downloaded and decoded."""
    return [decode(await backend.download(image)) for image in generation.images]


# ---- images ----------------------------------------------------------------------------------


def test_mock_color_is_sha256_of_prompt_and_input() -> None:
    """The fill colour is the first three bytes of sha256(prompt NUL input)."""
    digest = hashlib.sha256(b"cat\0img").digest()
    assert mock_color("cat", "img") == (digest[0], digest[1], digest[2])
    assert mock_color("cat", None) == tuple(hashlib.sha256(b"cat\0").digest()[:3])


async def test_images_decode_and_centre_is_mock_color() -> None:
    """Generated images are real PNGs of the capped size, centred on the prompt's colour."""
    async with serve() as (_, backend):
        generation = await backend.generate(make_item(n=2, size="1792x1024"), None)
        images = await fetch_all(backend, generation)
    assert len(images) == 2
    assert len({image.url for image in generation.images}) == 2
    for image in images:
        assert image.size == (256, 146)
        assert centre(image) == mock_color(PROMPT, None)


async def test_input_image_changes_the_colour() -> None:
    """The input image takes part in the colour, so variants are told apart on a sheet."""
    url = "https://example.com/tree.jpg"
    item = WorkItem(
        key="k" * 64,
        source="by-url",
        prompt=PROMPT,
        project_url="fall",
        params={"n": 1},
        input=InputImage("url", url),
    )
    async with serve() as (_, backend):
        [image] = await fetch_all(backend, await backend.generate(item, url))
    assert centre(image) == mock_color(PROMPT, url)
    assert centre(image) != mock_color(PROMPT, None)


@pytest.mark.parametrize("shape", ["data", "array", "images", "results", "b64_json"])
async def test_every_response_shape_reaches_the_same_pixels(shape: Any) -> None:
    """Each answer shape the mock can send is understood by the client."""
    async with serve(MockConfig(response_shape=shape)) as (_, backend):
        generation = await backend.generate(make_item(size="512x512"), None)
        [image] = await fetch_all(backend, generation)
    assert image.size == (256, 256)
    assert centre(image) == mock_color(PROMPT, None)
    assert (generation.images[0].data is not None) == (shape == "b64_json")


async def test_output_is_deterministic_across_servers() -> None:
    """Same prompt and input give the same bytes, on any server instance."""
    blobs = []
    for _ in range(2):
        async with serve() as (_, backend):
            generation = await backend.generate(make_item(), None)
            blobs.append(await backend.download(generation.images[0]))
    assert blobs[0] == blobs[1]
    assert blobs[0] == draw_image(PROMPT, None, index=0, width=256, height=256)
    other = draw_image("another prompt", None, index=0, width=256, height=256)
    assert centre(decode(other)) != centre(decode(blobs[0]))


def png_b64(size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    """A solid-colour PNG, base64-encoded as the client sends a local file."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def file_item(size: str = "256x256") -> WorkItem:
    """An item with a local input file (sent as base64)."""
    return WorkItem(
        key="f" * 64,
        source="local",
        prompt=PROMPT,
        project_url="fall",
        params={"n": 1, "size": size},
        input=InputImage("file", "/data/in.png", "ab" * 32),
    )


@pytest.mark.parametrize(
    ("input_size", "size"),
    [
        pytest.param((64, 64), "256x256", id="square"),
        pytest.param((300, 40), "1792x1024", id="wide-input-wide-output"),
        pytest.param((20, 200), "1024x1792", id="tall-input-tall-output"),
    ],
)
async def test_base64_input_is_shown_as_a_thumbnail(input_size: tuple[int, int], size: str) -> None:
    """A base64 input appears in the bottom-left third; the middle third stays pure colour."""
    blue = (0, 0, 255)
    payload = png_b64(input_size, blue)
    async with serve() as (_, backend):
        [image] = await fetch_all(backend, await backend.generate(file_item(size), payload))
    colour = mock_color(PROMPT, payload)
    w, h = image.size
    assert centre(image) == colour
    middle = image.crop((w // 3, h // 3, w - w // 3, h - h // 3))
    assert middle.getcolors() == [(middle.width * middle.height, colour)]
    corner = image.crop((0, h - h // 3, w // 3, h))
    assert dict((c, n) for n, c in corner.getcolors(maxcolors=w * h) or []).get(blue, 0) > 20
    assert blue not in {c for _, c in image.crop((w // 3, 0, w, h)).getcolors(w * h) or []}


@pytest.mark.parametrize(
    ("image", "image_type"),
    [
        pytest.param("not base64!", "base64", id="not-base64"),
        pytest.param(base64.b64encode(b"not an image").decode(), "base64", id="not-an-image"),
        pytest.param("https://example.com/a.png", "url", id="url-input"),
    ],
)
def test_inputs_it_cannot_show_draw_no_thumbnail(image: str, image_type: str) -> None:
    """An undecodable or remote input gives the plain image (same bytes as without it)."""
    with_input = draw_image(PROMPT, image, index=0, width=96, height=96, image_type=image_type)
    plain = paint(PROMPT, mock_color(PROMPT, image), None, index=0, width=96, height=96)
    assert with_input == plain


def test_thumbnail_is_deterministic() -> None:
    """Same prompt and base64 input give the same bytes, thumbnail included."""
    payload = png_b64((50, 30), (250, 120, 0))
    first, second = (
        draw_image(PROMPT, payload, index=1, width=120, height=90, image_type="base64")
        for _ in range(2)
    )
    assert first == second
    assert first != draw_image(PROMPT, payload, index=1, width=120, height=90)


def test_tiny_images_stay_pure_colour_in_the_centre() -> None:
    """Text never reaches the centre, even on a tiny image."""
    image = decode(draw_image(PROMPT * 5, None, index=3, width=8, height=5))
    assert centre(image) == mock_color(PROMPT * 5, None)


# ---- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error_class", "kind", "status", "ambiguous"),
    [
        pytest.param("429", RateLimitedError, "http_status", 429, False, id="429"),
        pytest.param("500", TransientError, "http_status", 500, False, id="500"),
        pytest.param("502", TransientError, "http_status", 502, False, id="502"),
        pytest.param("503", TransientError, "http_status", 503, False, id="503"),
        pytest.param("504", TransientError, "http_status", 504, False, id="504"),
        pytest.param("drop", TransientError, "connection", None, True, id="drop"),
        pytest.param("malformed", TransientError, "bad_response", 200, False, id="malformed"),
        pytest.param("wrong_shape", TransientError, "bad_response", 200, False, id="wrong-shape"),
        pytest.param("slow", TransientError, "timeout", None, True, id="slow"),
    ],
)
async def test_request_faults_surface_as_error_classes(
    fault: str,
    error_class: type[BackendError],
    kind: str,
    status: int | None,
    ambiguous: bool,
) -> None:
    """Each injected request fault reaches the client as the error the engine expects."""
    config = MockConfig(error_rate=1.0, faults={fault: 1.0}, slow_s=30.0)
    async with serve(config, timeout_s=0.3) as (server, backend):
        with pytest.raises(BackendError) as caught:
            await backend.generate(make_item(), None)
        assert server.stats.faults == {fault: 1}
    error = caught.value
    assert type(error) is error_class
    assert (error.kind, error.status, error.ambiguous) == (kind, status, ambiguous)


@pytest.mark.parametrize("fault", ["drop", "slow"])
async def test_ambiguous_faults_count_as_generations(fault: str) -> None:
    """A dropped or too-slow answer was still generated (and paid) server-side."""
    config = MockConfig(error_rate=1.0, faults={fault: 1.0}, slow_s=30.0)
    async with serve(config, timeout_s=0.3) as (server, backend):
        for _ in range(2):
            with pytest.raises(TransientError):
                await backend.generate(make_item(), None)
        assert (server.stats.generations, server.stats.duplicates) == (2, 1)


@pytest.mark.parametrize("fault", ["corrupt_image", "truncated_image"])
async def test_bad_image_bytes_fail_to_decode(fault: str) -> None:
    """Corrupt or truncated image bytes download fine but do not decode with Pillow."""
    config = MockConfig(error_rate=1.0, faults={fault: 1.0})
    async with serve(config) as (_, backend):
        generation = await backend.generate(make_item(), None)
        data = await backend.download(generation.images[0])
    assert data
    with pytest.raises(OSError, match=r"."):
        decode(data)


async def test_image_404_once_then_serves() -> None:
    """An image that 404s once is a download error, and the next GET succeeds."""
    config = MockConfig(error_rate=1.0, faults={"image_404_once": 1.0})
    async with serve(config) as (server, backend):
        generation = await backend.generate(make_item(), None)
        with pytest.raises(TransientError) as caught:
            await backend.download(generation.images[0])
        [image] = await fetch_all(backend, generation)
        assert server.stats.downloads == 2
    assert (caught.value.kind, caught.value.status) == ("download", 404)
    assert centre(image) == mock_color(PROMPT, None)


async def outcomes(config: MockConfig, count: int) -> list[str]:
    """What `count` sequential requests got: ``ok`` or the error's status."""
    seen = []
    async with serve(config) as (_, backend):
        for index in range(count):
            try:
                await backend.generate(make_item(f"prompt {index}"), None)
            except BackendError as error:
                seen.append(str(error.status))
            else:
                seen.append("ok")
    return seen


async def test_fault_sequence_is_deterministic_for_a_seed() -> None:
    """The same seed injects the same faults in the same order; another seed differs."""
    config = MockConfig(error_rate=0.5, faults={"500": 1.0, "503": 1.0}, seed=7)
    first = await outcomes(config, 16)
    assert first == await outcomes(config, 16)
    assert "ok" in first
    assert {"500", "503"} <= set(first)
    assert first != await outcomes(MockConfig(error_rate=0.5, faults={"500": 1.0}, seed=8), 16)


# ---- rate limit, auth, projects, refusals ----------------------------------------------------


@pytest.mark.parametrize(
    ("form", "low", "high"),
    [
        pytest.param("seconds", 0.01, 10.0, id="seconds"),
        pytest.param("date", 0.0, 12.0, id="date"),
    ],
)
async def test_enforced_rate_limit_answers_429_with_retry_after(
    form: Any, low: float, high: float
) -> None:
    """Over the server's rate limit a start gets 429 with a usable Retry-After."""
    config = MockConfig(rate_limit=0.1, burst=1, retry_after_form=form)
    async with serve(config) as (server, backend):
        await backend.generate(make_item("one"), None)
        with pytest.raises(RateLimitedError) as caught:
            await backend.generate(make_item("two"), None)
        assert server.stats.rate_limited == 1
        assert server.stats.generations == 1
    assert caught.value.retry_after is not None
    assert low <= caught.value.retry_after <= high


async def test_429_without_retry_after() -> None:
    """With retry_after_form none the client gets a 429 without a hint."""
    config = MockConfig(error_rate=1.0, faults={"429": 1.0}, retry_after_form="none")
    async with serve(config) as (server, backend):
        with pytest.raises(RateLimitedError) as caught:
            await backend.generate(make_item(), None)
        assert server.stats.starts_during_pause == 0
    assert caught.value.retry_after is None


async def test_starts_during_an_announced_pause_are_counted() -> None:
    """A start inside a Retry-After window the server announced is counted as a violation."""
    config = MockConfig(error_rate=1.0, faults={"429": 1.0}, retry_after_s=60.0, pause_grace_s=0.0)
    async with serve(config) as (server, backend):
        for _ in range(3):
            with pytest.raises(RateLimitedError):
                await backend.generate(make_item(), None)
        assert server.stats.rate_limited == 3
        assert server.stats.starts_during_pause == 2


async def test_in_flight_requests_within_grace_are_not_violations() -> None:
    """Requests that arrive right after a 429 (already in flight) are forgiven."""
    config = MockConfig(
        error_rate=1.0, faults={"429": 1.0}, retry_after_s=60.0, pause_grace_s=3600.0
    )
    async with serve(config) as (server, backend):
        for _ in range(2):
            with pytest.raises(RateLimitedError):
                await backend.generate(make_item(), None)
        assert server.stats.starts_during_pause == 0


async def test_rate_limit_headers_are_sent_when_asked() -> None:
    """With send_rate_limit_headers the client sees remaining requests and reset time."""
    config = MockConfig(rate_limit=0.5, burst=5, send_rate_limit_headers=True)
    async with serve(config) as (_, backend):
        generation = await backend.generate(make_item(), None)
    hint = generation.rate_limit
    assert isinstance(hint, RateLimitHint)
    assert hint.remaining == 4
    assert hint.reset_s is not None
    assert 1.0 < hint.reset_s <= 2.0


async def test_wrong_key_is_401_fatal() -> None:
    """A key other than the configured one aborts the run (401)."""
    async with serve(MockConfig(api_key="right-key"), key="wrong-key") as (server, backend):
        with pytest.raises(FatalError) as caught:
            await backend.generate(make_item(), None)
        assert server.stats.unauthorized == 1
        assert server.stats.generations == 0
    assert caught.value.status == 401
    assert "wrong-key" not in str(caught.value)


async def test_right_key_is_accepted() -> None:
    """The configured key is accepted."""
    async with serve(MockConfig(api_key=KEY)) as (_, backend):
        generation = await backend.generate(make_item(), None)
    assert len(generation.images) == 1


async def test_unknown_project_is_404_fatal() -> None:
    """A project the server does not know aborts the run (404)."""
    async with serve(MockConfig(projects=frozenset({"other"}))) as (server, backend):
        with pytest.raises(FatalError) as caught:
            await backend.generate(make_item(), None)
        assert server.stats.unknown_project == 1
    assert caught.value.status == 404


async def test_refuse_word_is_a_content_policy_refusal() -> None:
    """A prompt with the refuse word fails as refused (never retried)."""
    async with serve() as (server, backend):
        with pytest.raises(PermanentError) as caught:
            await backend.generate(make_item("please REFUSE this"), None)
        assert server.stats.refused == 1
    assert (caught.value.kind, caught.value.status) == ("refused", 400)


async def test_invalid_body_is_permanent_400() -> None:
    """A body without a prompt is a plain 400: the client gives up on the item."""
    async with (
        MockServer() as server,
        aiohttp.ClientSession() as session,
        session.post(f"{server.base_url}/synthetic-image", json={"n": 1}) as response,
    ):
        assert response.status == 400


# ---- stats and setup ------------------------------------------------------------------------


async def test_stats_count_requests_generations_duplicates_and_concurrency() -> None:
    """Stats expose requests, paid generations, duplicates, downloads and peak concurrency."""
    async with serve(MockConfig(latency_s=0.2)) as (server, backend):
        items = [make_item("a"), make_item("b"), make_item("a")]
        generations = await asyncio.gather(*(backend.generate(item, None) for item in items))
        await backend.download(generations[0].images[0])
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.base_url}/_stats") as response,
        ):
            served = await response.json()
    stats = server.stats
    assert (stats.requests, stats.generations, stats.images) == (3, 3, 3)
    assert stats.duplicates == 1
    assert stats.max_in_flight == 3
    assert stats.in_flight == 0
    assert stats.downloads == 1
    assert served == stats.to_json()


async def test_unknown_image_token_is_404() -> None:
    """An image URL the server never issued (or forgot) is a download error 404."""
    async with serve() as (server, backend):
        with pytest.raises(TransientError) as caught:
            await backend.download(GeneratedImage(url=f"{server.base_url}/images/nope.png"))
    assert caught.value.status == 404


async def test_backend_ignores_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy in the environment does not divert the client (trust_env is off)."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    async with serve() as (_, backend):
        generation = await backend.generate(make_item(), None)
    assert len(generation.images) == 1


async def test_server_binds_a_free_port() -> None:
    """port=0 binds a free loopback port, and base_url says which."""
    async with MockServer() as first, MockServer() as second:
        assert first.base_url.startswith("http://127.0.0.1:")
        assert first.base_url != second.base_url
    with pytest.raises(RuntimeError):
        _ = MockServer().base_url


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"faults": {"teapot": 1.0}}, id="unknown-fault"),
        pytest.param({"error_rate": 1.5}, id="error-rate-above-1"),
        pytest.param({"error_rate": 0.5, "faults": {"500": 0.0}}, id="no-positive-weight"),
        pytest.param({"rate_limit": 0.0}, id="zero-rate"),
        pytest.param({"burst": 0}, id="zero-burst"),
        pytest.param({"response_shape": "xml"}, id="unknown-shape"),
        pytest.param({"retry_after_form": "never"}, id="unknown-retry-after-form"),
        pytest.param({"latency_s": -1.0}, id="negative-latency"),
    ],
)
def test_invalid_config_is_rejected(overrides: dict[str, Any]) -> None:
    """A mock config that cannot work is refused up front with a ValueError."""
    with pytest.raises(ValueError, match="invalid mock config"):
        MockConfig(**overrides)


def _png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("extra", "status", "words"),
    [
        pytest.param({"image": "", "image_type": "base64"}, 400, "non-empty", id="empty-image"),
        pytest.param(
            {"image": "not base64!", "image_type": "base64"}, 400, "not valid base64", id="bad-b64"
        ),
        pytest.param({"image": "abc", "image_type": "png"}, 400, "image_type must", id="bad-type"),
        pytest.param({"image": _png_b64()}, 400, "image_type must", id="no-type"),
        pytest.param(
            {"image": "ftp://x/y.png", "image_type": "url"}, 400, "http(s) URL", id="bad-url"
        ),
        pytest.param({"image": _png_b64(), "image_type": "base64"}, 200, "", id="valid-base64"),
        pytest.param({}, 200, "", id="prompt-only"),
    ],
)
async def test_the_mock_refuses_what_roboflow_would(
    extra: dict[str, str], status: int, words: str
) -> None:
    """A curl-style request with a broken input image is a 400, as on the real endpoint."""
    async with MockServer(MockConfig()) as server, aiohttp.ClientSession() as session:
        body = {"project_url": "p", "prompt": "a cat", **extra}
        async with session.post(f"{server.base_url}/synthetic-image", json=body) as answer:
            text = await answer.text()
            assert answer.status == status, text
            assert words in text
