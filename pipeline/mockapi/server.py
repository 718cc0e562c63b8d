"""The embedded mock of Roboflow's ``POST /synthetic-image`` (aiohttp.web).

It answers with placeholder images (drawn by `pipeline.mockapi.image`: deterministic
from prompt and input, served by URL from the same server), and can inject the faults a
nightly job meets: 429 with Retry-After, 5xx, dropped connections, slow and malformed
answers, corrupt images, an enforced rate limit. `MockStats` counts what a client did to
it (duplicate generations, starts during an announced pause, peak concurrency) so tests
and benchmarks can prove the client's behaviour; its settings live in `pipeline.mockapi.config`.

At about 500 lines this module stays whole on purpose: it is one request handler whose
branches (auth, project, rate limit, faults, answer shapes, downloads) share the state of
one server, and splitting them would scatter that state across modules.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import hmac
import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from aiohttp import web
from PIL import Image

from .batches import MockBatches
from .config import (
    DEFAULT_FAULT_WEIGHTS,
    DEFAULT_PAUSE_GRACE_S,
    DEFAULT_SIZE,
    FATAL_FAULT_KINDS,
    FAULT_KINDS,
    MAX_BODY_BYTES,
    MAX_TOKENS,
    PHOTO_VARIANTS,
    MockConfig,
    MockStats,
)
from .dataset import MockDataset
from .image import (
    PNG_SIGNATURE,
    damage,
    draw_image,
    input_thumbnail,
    mock_color,
    paint,
    photo,
)
from .models import MockModels
from .search import serve_search
from .upload import serve_upload

__all__ = [
    "DEFAULT_FAULT_WEIGHTS",
    "DEFAULT_PAUSE_GRACE_S",
    "FATAL_FAULT_KINDS",
    "FAULT_KINDS",
    "MockConfig",
    "MockServer",
    "MockStats",
    "draw_image",
    "mock_color",
    "run_mock_server",
]


@dataclass
class _ImageSpec:
    """What to draw (lazily) for one image URL, and which fault it carries.

    It keeps the input's colour and thumbnail, never the input itself: a base64 input
    can be megabytes, and up to `MAX_TOKENS` specs are remembered.
    """

    prompt: str
    color: tuple[int, int, int]
    thumb: Image.Image | None
    index: int
    width: int
    height: int
    fault: str | None = None
    missed: bool = False


class _MockApi:
    """Request handlers and their state; one per `MockServer`."""

    def __init__(self, config: MockConfig, stats: MockStats) -> None:
        self.config = config
        self.stats = stats
        self.closing = asyncio.Event()
        self._rng = random.Random(config.seed)
        self._tokens: OrderedDict[str, _ImageSpec] = OrderedDict()
        self._minted = 0
        self._bucket = float(config.burst)
        self._bucket_at = asyncio.get_running_loop().time()
        self._pause_from = -math.inf
        self._pause_until = -math.inf
        self._photos: dict[tuple[int, int], list[tuple[bytes, str]]] = {}
        self._photo_lock = asyncio.Lock()
        self.dataset = MockDataset()  # Roboflow projects' images: upload adds, search finds
        self.batches = MockBatches(
            config,
            stats,
            authorized=self._bearer_ok,
            draw_fault=self._draw_fault,
            generate=self._batch_answer,
            count=self._count_generation,
        )
        self.models = MockModels(config, stats, authorized=self._bearer_ok)  # /v1/models

    def app(self) -> web.Application:
        """The aiohttp application serving the API, the images and the stats."""
        application = web.Application(client_max_size=MAX_BODY_BYTES)
        application.router.add_post("/synthetic-image", self.generate)
        application.router.add_post("/v1/images/generations", self.openai_generate)
        application.router.add_post("/v1/images/edits", self.openai_edit)
        application.router.add_get("/images/{token}.png", self.serve_image)
        application.router.add_get("/images/{token}.jpg", self.serve_image)
        application.router.add_get("/_stats", self.serve_stats)
        application.router.add_post("/{workspace}/{project}/search", self.search)
        application.router.add_post("/dataset/{project}/upload", self.upload)
        self.batches.add_routes(application)
        self.models.add_routes(application)
        if self.config.clock_offset_s:
            application.on_response_prepare.append(self._stamp_date)
        return application

    async def _stamp_date(self, request: web.Request, response: web.StreamResponse) -> None:
        """The ``Date`` of the server's own (offset) clock, as a misset server sends it."""
        response.headers["Date"] = _http_date(self._wall_now())

    def _wall_now(self) -> float:
        """The server's wall clock: the host's plus `clock_offset_s`."""
        return time.time() + self.config.clock_offset_s

    def _bearer_ok(self, request: web.Request) -> bool:
        """The request carries the key the mock was started with (any, without one)."""
        expected = self.config.api_key
        return expected is None or hmac.compare_digest(
            _bearer(request).encode(), expected.encode()
        )

    async def _batch_answer(self, body: dict[str, Any], fault: str | None) -> dict[str, Any]:
        """The answer body of one batch request line (the images inline, as online)."""
        payload = await self._payload(None, body, fault, "b64_json")
        assert isinstance(payload, dict)
        return payload

    async def search(self, request: web.Request) -> web.StreamResponse:
        """``POST /{workspace}/{project}/search`` (`pipeline.mockapi.search`)."""
        return await serve_search(
            request,
            dataset=self.dataset,
            config=self.config,
            stats=self.stats,
            draw_fault=self._draw_fault,
        )

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """``POST /dataset/{project}/upload`` (`pipeline.mockapi.upload`)."""
        now = asyncio.get_running_loop().time()
        return await serve_upload(
            request,
            dataset=self.dataset,
            config=self.config,
            stats=self.stats,
            draw_fault=self._draw_fault,
            rate_limited=lambda seconds: self._rate_limited(seconds, now),
            pause=self._pause,
        )

    async def serve_stats(self, request: web.Request) -> web.Response:
        """``GET /_stats``."""
        return web.json_response(self.stats.to_json())

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """``POST /synthetic-image``: counts the start, then answers or injects a fault."""
        return await self._serve(request, None)

    async def openai_generate(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/images/generations`` (OpenAI's JSON request and answer shape)."""
        return await self._serve(request, "generations")

    async def openai_edit(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/images/edits`` (multipart: ``image[]`` parts, fields for the rest)."""
        return await self._serve(request, "edits")

    async def _serve(self, request: web.Request, openai: str | None) -> web.StreamResponse:
        """Count the start, then answer or inject a fault; `openai` names its endpoint."""
        now = asyncio.get_running_loop().time()
        self.stats.requests += 1
        if self._pause_from + self.config.pause_grace_s < now < self._pause_until:
            self.stats.starts_during_pause += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            return await self._answer(request, now, openai)
        finally:
            self.stats.in_flight -= 1

    async def _answer(
        self, request: web.Request, now: float, openai: str | None
    ) -> web.StreamResponse:
        expected = self.config.api_key
        given = _bearer(request) if openai else request.query.get("api_key", "")
        if expected is not None and not hmac.compare_digest(given.encode(), expected.encode()):
            self.stats.unauthorized += 1
            return _error(401, "invalid_api_key", "Incorrect API key provided.")
        if openai == "edits":
            body = await _load_form(request)
        else:
            body = _load_body(await request.read())
        if body is None:
            what = (
                "a multipart form with prompt and image[]"
                if openai == "edits"
                else ("a JSON object with a prompt")
            )
            return _error(400, "invalid_request", f"Body must be {what}.")
        problem = _mask_problem(body) if openai else _roboflow_image_problem(body)
        if problem is not None:
            return _error(400, "invalid_request", problem)
        refusal = self.models.refusal(body.get("model")) if openai else None
        if refusal is not None:  # a model shut down by the mock's date: OpenAI's 404
            return refusal
        projects = self.config.projects
        if openai is None and projects is not None and body.get("project_url") not in projects:
            self.stats.unknown_project += 1
            return _error(404, "not_found", "Project not found.")
        if not self._take_token(now):
            wait = max(self._seconds_to_token(), self.config.min_retry_after_s)
            return self._rate_limited(wait, now)
        headers = self._rate_limit_headers()
        if self.config.refuse_word and self.config.refuse_word in body["prompt"]:
            self.stats.refused += 1
            return _error(
                400,
                "content_policy_violation",
                "Your request was rejected as a result of our safety system.",
            )
        fault = self._draw_fault()
        self.stats.faults_by_prompt.setdefault(str(body["prompt"]), []).append(fault)
        await self._pause(self.config.latency_s)
        return await self._respond(request, body, fault, headers, openai=openai is not None)

    async def _respond(
        self,
        request: web.Request,
        body: dict[str, Any],
        fault: str | None,
        headers: dict[str, str],
        *,
        openai: bool = False,
    ) -> web.StreamResponse:
        if fault == "429":
            return self._rate_limited(self.config.retry_after_s, asyncio.get_running_loop().time())
        if fault == "insufficient_quota":
            return _insufficient_quota()
        if fault in ("500", "502", "503", "504"):
            return _error(int(fault), "server_error", "The server had an error, try again.")
        if fault == "malformed":
            return web.Response(text='{"data": [{"url": ', content_type="application/json")
        if fault == "wrong_shape":
            return web.json_response({"status": "queued", "message": "no images here"})
        self._count_generation(body)
        if fault == "drop":
            _drop_connection(request)
            return web.Response(status=500)
        if fault == "slow":
            await self._pause(self.config.slow_s)
        shape = "b64_json" if openai else self.config.response_shape
        payload = await self._payload(request, body, fault, shape)
        return web.json_response(payload, headers=headers)

    async def serve_image(self, request: web.Request) -> web.Response:
        """``GET /images/<token>.png``: draw lazily, off the event loop."""
        self.stats.downloads += 1
        spec = self._tokens.get(request.match_info["token"])
        if spec is None:
            return _error(404, "not_found", "Unknown or expired image.")
        self._tokens.move_to_end(request.match_info["token"])
        if spec.fault == "image_404_once" and not spec.missed:
            spec.missed = True
            return _error(404, "not_found", "Image not ready yet.")
        data, _encoded = await self._image(request.match_info["token"], spec)
        jpeg = self.config.photo_format == "jpeg"
        return web.Response(body=data, content_type="image/jpeg" if jpeg else "image/png")

    async def _image(self, token: str, spec: _ImageSpec) -> tuple[bytes, str | None]:
        """The image for `spec`, and its base64 when that is cached (photo-like images)."""
        if self.config.photo_format is None:
            return await asyncio.to_thread(_render, spec), None
        pool = await self._photo_pool(spec.width, spec.height)
        data, encoded = pool[int(token[:8], 16) % len(pool)]
        if spec.fault is None:
            return data, encoded
        return damage(data, spec.fault), None

    async def _photo_pool(self, width: int, height: int) -> list[tuple[bytes, str]]:
        """`PHOTO_VARIANTS` photo-like images of this size with their base64, made once."""
        async with self._photo_lock:
            if (width, height) not in self._photos:
                fmt = self.config.photo_format or "png"
                made = [
                    await asyncio.to_thread(photo, seed, width, height, fmt)
                    for seed in range(PHOTO_VARIANTS)
                ]
                self._photos[width, height] = [(data, _b64(data)) for data in made]
            return self._photos[width, height]

    async def _payload(
        self, request: web.Request | None, body: dict[str, Any], fault: str | None, shape: str
    ) -> Any:
        specs = await asyncio.to_thread(self._specs, body, fault)
        tokens = [self._mint(spec) for spec in specs]
        if shape == "b64_json":
            images = [
                await self._image(token, spec) for token, spec in zip(tokens, specs, strict=True)
            ]
            return {
                "data": [
                    {"b64_json": encoded or _b64(blob), "id": token}
                    for (blob, encoded), token in zip(images, tokens, strict=True)
                ],
                "usage": _usage(body, len(specs)),  # as GPT image models report it
            }
        assert request is not None  # only inline answers are made without a request
        origin = str(request.url.origin())
        ext = "jpg" if self.config.photo_format == "jpeg" else "png"
        urls = [f"{origin}/images/{token}.{ext}" for token in tokens]
        pairs = list(zip(urls, tokens, strict=True))
        if shape == "array":
            return urls
        if shape == "images":
            return {"images": [{"image_url": url, "image_id": token} for url, token in pairs]}
        if shape == "results":
            return {"results": [{"image": url, "id": token} for url, token in pairs]}
        return {"data": [{"url": url, "id": token} for url, token in pairs]}

    def _specs(self, body: dict[str, Any], fault: str | None) -> list[_ImageSpec]:
        """One spec per image of the answer; hashes and decodes the input: run in a thread."""
        width, height = _scaled_size(body.get("size"), self.config.max_px)
        image = body.get("image") if isinstance(body.get("image"), str) else None
        image_type = body.get("image_type") if isinstance(body.get("image_type"), str) else None
        color = mock_color(body["prompt"], image)
        thumb = input_thumbnail(image, image_type, width, height)
        return [
            _ImageSpec(body["prompt"], color, thumb, index, width, height, fault)
            for index in range(_count(body.get("n")))
        ]

    def _mint(self, spec: _ImageSpec) -> str:
        self._minted += 1
        token = hashlib.sha256(f"{self._minted}\0{spec.prompt}".encode()).hexdigest()[:32]
        self._tokens[token] = spec
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)
        return token

    def _count_generation(self, body: dict[str, Any]) -> None:
        digest = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        self.stats.generations += 1
        self.stats.images += _count(body.get("n"))
        self.stats.generations_by_body[digest] = self.stats.generations_by_body.get(digest, 0) + 1

    def _draw_fault(self) -> str | None:
        config = self.config
        if config.error_rate <= 0 or self._rng.random() >= config.error_rate:
            return None
        names = [name for name, weight in config.faults.items() if weight > 0]
        fault = self._rng.choices(names, weights=[config.faults[n] for n in names])[0]
        self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1
        return fault

    def _take_token(self, now: float) -> bool:
        rate = self.config.rate_limit
        if rate is None:
            return True
        self._bucket = min(float(self.config.burst), self._bucket + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket >= 1.0:
            self._bucket -= 1.0
            return True
        return False

    def _seconds_to_token(self) -> float:
        rate = self.config.rate_limit or 1.0
        return max(1.0 - self._bucket, 0.0) / rate

    def _rate_limit_headers(self) -> dict[str, str]:
        rate = self.config.rate_limit
        if not self.config.send_rate_limit_headers or rate is None:
            return {}
        reset_s = (self.config.burst - self._bucket) / rate
        return {
            "x-ratelimit-limit-requests": str(self.config.burst),
            "x-ratelimit-remaining-requests": str(int(self._bucket)),
            "x-ratelimit-reset-requests": _format_duration(reset_s),
        }

    def _rate_limited(self, retry_after_s: float, now: float) -> web.Response:
        """A 429 whose Retry-After opens a window in which new starts are counted."""
        self.stats.rate_limited += 1
        headers = self._rate_limit_headers()
        form = self.config.retry_after_form
        if form == "seconds":
            headers["Retry-After"] = _format_seconds(retry_after_s)
            self._announce_pause(now, now + retry_after_s)
        elif form == "date":
            wall_now = self._wall_now()
            wall = math.ceil(wall_now + retry_after_s)
            headers["Retry-After"] = _http_date(wall)
            self._announce_pause(now, now + (wall - wall_now))
        return _error(429, "rate_limit_exceeded", "Rate limit reached, slow down.", headers)

    def _announce_pause(self, now: float, until: float) -> None:
        if now >= self._pause_until:
            self._pause_from = now
        self._pause_until = max(self._pause_until, until)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the server shuts down."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.closing.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            return


class MockServer:
    """The mock API on a loopback port: ``async with MockServer(config) as server``."""

    def __init__(
        self, config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else MockConfig()
        self.stats = MockStats()
        self._host = host
        self._port = port
        self._api: _MockApi | None = None
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server (the backend's ``base_url``)."""
        if self._base_url is None:
            raise RuntimeError("MockServer is not started")
        return self._base_url

    @property
    def dataset(self) -> MockDataset:
        """The Roboflow projects' images the running server holds (uploads land here)."""
        if self._api is None:
            raise RuntimeError("MockServer is not started")
        return self._api.dataset

    async def start(self) -> None:
        """Bind and serve; with port 0 a free port is chosen."""
        self._api = _MockApi(self.config, self.stats)
        self._runner = web.AppRunner(
            self._api.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        port = self._runner.addresses[0][1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._base_url = f"http://{host}:{port}"

    async def close(self) -> None:
        """Wake sleeping handlers and stop serving."""
        if self._api is not None:
            self._api.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def run_mock_server(config: MockConfig, host: str = "127.0.0.1", port: int = 8377) -> None:
    """Serve until Ctrl-C (``synthaug mock-server``), printing the URL to use."""

    async def serve() -> None:
        async with MockServer(config, host, port) as server:
            print(f"synthaug mock API on {server.base_url} (Ctrl-C to stop)", flush=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        print("mock API stopped", flush=True)


def _render(spec: _ImageSpec) -> bytes:
    data = paint(
        spec.prompt, spec.color, spec.thumb, index=spec.index, width=spec.width, height=spec.height
    )
    return damage(data, spec.fault)


def _drop_connection(request: web.Request) -> None:
    """Close the socket with no answer: the client cannot know the image was generated."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _load_body(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return None
    return body


_IMAGE_TYPES = ("id", "url", "base64")


def _roboflow_image_problem(body: Mapping[str, Any]) -> str | None:
    """What Roboflow's endpoint would refuse about the body's input image, or None.

    A rehearsal must fail where the real API would: an ``image`` without a known
    ``image_type``, an empty one, base64 that does not decode, a URL that is not http(s).
    """
    if "image" not in body and "image_type" not in body:
        return None
    image, kind = body.get("image"), body.get("image_type")
    if kind not in _IMAGE_TYPES:
        return f"image_type must be one of {', '.join(_IMAGE_TYPES)}, got {kind!r}."
    if not isinstance(image, str) or not image.strip():
        return "image must be a non-empty string."
    if kind == "base64":
        try:
            decoded = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if not decoded:
            return "image is not valid base64."
    if kind == "url" and not image.startswith(("http://", "https://")):
        return "image must be an http(s) URL."
    return None


def _mask_problem(body: Mapping[str, Any]) -> str | None:
    """What OpenAI's edits would refuse about the body's mask (it must be a PNG), or None."""
    mask = body.get("mask")
    if mask is None:
        return None
    try:  # a file part was read as base64; a text field named mask is refused here
        data = base64.b64decode(mask, validate=True) if isinstance(mask, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    if not data.startswith(PNG_SIGNATURE):
        return "mask must be a PNG image (a file part named mask)."
    return None


def _bearer(request: web.Request) -> str:
    """The key of an ``Authorization: Bearer`` header ("" without one)."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


async def _load_form(request: web.Request) -> dict[str, Any] | None:
    """An edit's multipart form as a body: its fields, its first ``image[]`` part as
    base64 (``image_type: base64``, as the drawing code reads inputs) and its ``mask``
    part, if any, as base64 too; None if invalid."""
    if not request.content_type.startswith("multipart/"):
        return None
    body: dict[str, Any] = {}
    try:
        form = await request.post()
    except ValueError:
        return None
    for name, value in form.items():
        if isinstance(value, web.FileField):
            if name in ("image[]", "image") and "image" not in body:
                body["image"] = _b64(value.file.read())
                body["image_type"] = "base64"
            elif name == "mask":
                body["mask"] = _b64(value.file.read())
        else:
            body[name] = value
    if not isinstance(body.get("prompt"), str) or not body.get("image"):
        return None
    return body


def _insufficient_quota() -> web.Response:
    """OpenAI's answer when the account has no credit left: a 429 that waiting cannot fix."""
    payload = {
        "error": {
            "message": "You exceeded your current quota, please check your plan and "
            "billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    return web.json_response(payload, status=429)


def _http_date(wall: float) -> str:
    """An HTTP date (RFC 9110 IMF-fixdate) of a POSIX time."""
    return email.utils.format_datetime(datetime.fromtimestamp(wall, timezone.utc), usegmt=True)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    payload = {"error": {"code": code, "message": message}}
    return web.json_response(payload, status=status, headers=headers)


# Output tokens per image of a GPT image model by quality (OpenAI's published figures for
# 1024x1024; the API's own default quality counts as medium here).
_OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160}


def _usage(body: Mapping[str, Any], images: int) -> dict[str, Any]:
    """A ``usage`` block shaped like OpenAI's: what a request of `images` images used."""
    text_tokens = max(1, len(str(body.get("prompt", ""))) // 4)
    image_tokens = 0 if body.get("image") is None else 323
    per_image = _OUTPUT_TOKENS.get(str(body.get("quality")), _OUTPUT_TOKENS["medium"])
    return {
        "input_tokens": text_tokens + image_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
        "output_tokens": per_image * images,
        "total_tokens": text_tokens + image_tokens + per_image * images,
    }


def _scaled_size(size: Any, max_px: int) -> tuple[int, int]:
    """The requested ``WxH`` scaled down to fit `max_px`, keeping the aspect ratio."""
    width, height = DEFAULT_SIZE
    if isinstance(size, str):
        w_text, sep, h_text = size.lower().partition("x")
        if sep and w_text.isdigit() and h_text.isdigit() and int(w_text) and int(h_text):
            width, height = int(w_text), int(h_text)
    scale = min(1.0, max_px / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _count(n: Any) -> int:
    try:
        return min(max(int(n), 1), 10)
    except (TypeError, ValueError):
        return 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _format_seconds(seconds: float) -> str:
    """Retry-After seconds: an integer when whole, else up to millisecond precision."""
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _format_duration(seconds: float) -> str:
    """OpenAI-style reset duration: ``20ms`` below a second, else ``1.5s``."""
    if seconds < 1.0:
        return f"{max(round(seconds * 1000), 0)}ms"
    return _format_seconds(round(seconds, 3)) + "s"
