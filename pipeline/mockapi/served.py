"""The images the mock has answered with: minted tokens, drawn lazily, served by URL.

An answer names its images by token; what to draw for a token (`ImageSpec`: prompt,
input colour and thumbnail, size, fault) is remembered, up to `MAX_TOKENS` of them, and
the picture is drawn only when it is downloaded from ``GET /images/<token>.png`` (or
inlined as base64), off the event loop. With `MockConfig.photo_format` the images are
photo-like ones from a small pool made once per size, so that a benchmark measures the
client, not the mock's drawing. Faults that live in the image (corrupt bytes, a 404
before the first download succeeds) are carried by its spec.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from .bodies import b64, image_count, scaled_size, usage
from .config import MAX_TOKENS, PHOTO_VARIANTS, MockConfig, MockStats
from .image import damage, input_thumbnail, mock_color, paint, photo
from .replies import error

__all__ = ["ImageSpec", "ServedImages"]


@dataclass
class ImageSpec:
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


class ServedImages:
    """The tokens of one server's answers, their images, and ``GET /images/<token>``."""

    def __init__(self, config: MockConfig, stats: MockStats) -> None:
        self.config = config
        self.stats = stats
        self._tokens: OrderedDict[str, ImageSpec] = OrderedDict()
        self._minted = 0
        self._photos: dict[tuple[int, int], list[tuple[bytes, str]]] = {}
        self._photo_lock = asyncio.Lock()

    def add_routes(self, application: web.Application) -> None:
        """Serve the images at ``/images/<token>.png`` and ``.jpg``."""
        application.router.add_get("/images/{token}.png", self.serve_image)
        application.router.add_get("/images/{token}.jpg", self.serve_image)

    async def serve_image(self, request: web.Request) -> web.Response:
        """``GET /images/<token>.png``: draw lazily, off the event loop."""
        self.stats.downloads += 1
        spec = self._tokens.get(request.match_info["token"])
        if spec is None:
            return error(404, "not_found", "Unknown or expired image.")
        self._tokens.move_to_end(request.match_info["token"])
        if spec.fault == "image_404_once" and not spec.missed:
            spec.missed = True
            return error(404, "not_found", "Image not ready yet.")
        data, _encoded = await self._image(request.match_info["token"], spec)
        jpeg = self.config.photo_format == "jpeg"
        return web.Response(body=data, content_type="image/jpeg" if jpeg else "image/png")

    async def payload(
        self, request: web.Request | None, body: dict[str, Any], fault: str | None, shape: str
    ) -> Any:
        """The answer body for `body` in `shape`: images inline (``b64_json``, OpenAI's,
        with ``usage``) or as URLs on this server in one of Roboflow's shapes."""
        specs = await asyncio.to_thread(self._specs, body, fault)
        tokens = [self._mint(spec) for spec in specs]
        if shape == "b64_json":
            images = [
                await self._image(token, spec) for token, spec in zip(tokens, specs, strict=True)
            ]
            return {
                "data": [
                    {"b64_json": encoded or b64(blob), "id": token}
                    for (blob, encoded), token in zip(images, tokens, strict=True)
                ],
                "usage": usage(body, len(specs)),  # as GPT image models report it
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

    async def _image(self, token: str, spec: ImageSpec) -> tuple[bytes, str | None]:
        """The image for `spec`, and its base64 when that is cached (photo-like images)."""
        if self.config.photo_format is None:
            return await asyncio.to_thread(_render, spec, self.config.detect_classes), None
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
                self._photos[width, height] = [(data, b64(data)) for data in made]
            return self._photos[width, height]

    def _specs(self, body: dict[str, Any], fault: str | None) -> list[ImageSpec]:
        """One spec per image of the answer; hashes and decodes the input: run in a thread."""
        width, height = scaled_size(body.get("size"), self.config.max_px)
        image = body.get("image") if isinstance(body.get("image"), str) else None
        image_type = body.get("image_type") if isinstance(body.get("image_type"), str) else None
        color = mock_color(body["prompt"], image)
        thumb = input_thumbnail(image, image_type, width, height)
        return [
            ImageSpec(body["prompt"], color, thumb, index, width, height, fault)
            for index in range(image_count(body.get("n")))
        ]

    def _mint(self, spec: ImageSpec) -> str:
        self._minted += 1
        token = hashlib.sha256(f"{self._minted}\0{spec.prompt}".encode()).hexdigest()[:32]
        self._tokens[token] = spec
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)
        return token


def _render(spec: ImageSpec, classes: tuple[str, ...]) -> bytes:
    data = paint(
        spec.prompt,
        spec.color,
        spec.thumb,
        index=spec.index,
        width=spec.width,
        height=spec.height,
        classes=classes,
    )
    return damage(data, spec.fault)
