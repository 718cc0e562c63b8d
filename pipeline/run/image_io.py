"""Moving image bytes for the generation stage: an item's input read and encoded just
before its request, an answer's images downloaded, checked whole and stored.

Checking, hashing and writing run in a small thread pool of their own, so that the event
loop thread competes for the GIL and the CPUs with few others (a stall of the loop
delays every request). Downloads follow the one retry policy.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from ..backends.base import Backend, encode_image
from ..errors import BackendError
from ..manifest.writer import ManifestWriter
from ..records import GeneratedImage, OutputFile, WorkItem
from ..retry import Retrier, RetryPolicy
from ..sources import read_input_bytes
from ..store import files as outputs

__all__ = ["DOWNLOAD_ATTEMPTS", "ImageIO"]

DOWNLOAD_ATTEMPTS = 3  # tries of one image URL before the item regenerates
LARGE_INPUT_BYTES = 256 * 1024  # base64 in a thread above this
STORE_THREADS = 2
"""Threads that check, hash and write images: few (see the module docstring)."""


class ImageIO:
    """An item's input on the way out, its answer's images on the way into OUT."""

    def __init__(
        self,
        backend: Backend,
        *,
        out_dir: Path,
        writer: ManifestWriter,
        policy: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]],
        on_retry: Callable[[BackendError, int, float], None],
        rng: random.Random | None = None,
    ) -> None:
        self._backend = backend
        self._out_dir = out_dir
        # its threads start on first use and end with `close`
        self._store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="synthaug-store")
        # image folders are fsynced once per manifest sync, before it, not once per image
        self._folders = outputs.FolderSync()
        writer.add_sync_hook(self._folders.flush)
        # a download is free to repeat (the image was paid for once): no ambiguity to weigh
        self._downloads = Retrier(
            RetryPolicy(DOWNLOAD_ATTEMPTS, policy.base_s, policy.cap_s, retry_ambiguous=True),
            sleep=sleep,
            on_retry=on_retry,
            rng=rng,
        )

    def close(self) -> None:
        """Wait for a store begun by a cancelled item (call in a thread): it ends before
        the run does, and before the OUT lock is let go."""
        self._store_pool.shutdown()

    async def input_for_body(self, item: WorkItem) -> str | None:
        """The body's `image` value, read and encoded just before the request starts."""
        if item.input is None:
            return None
        if item.input.kind != "file":
            return item.input.value
        data = await asyncio.to_thread(
            read_input_bytes, Path(item.input.value), item.input.sha256 or ""
        )
        if len(data) > LARGE_INPUT_BYTES:
            return await asyncio.to_thread(encode_image, data)
        return encode_image(data)

    async def fetch_and_store(
        self, item: WorkItem, images: tuple[GeneratedImage, ...]
    ) -> tuple[OutputFile, ...]:
        """Download every image of an answer and store it verified, atomically."""
        stored: list[OutputFile] = []
        try:
            for index, image in enumerate(images):
                stored.append(await self._fetch_one(item, index, image))
        except BaseException:
            # no manifest line will name these: leave no unnamed file behind
            await asyncio.shield(asyncio.to_thread(outputs.discard_outputs, self._out_dir, stored))
            raise
        return tuple(stored)

    async def _fetch_one(self, item: WorkItem, index: int, image: GeneratedImage) -> OutputFile:
        """One image downloaded (by the one retry policy, `DOWNLOAD_ATTEMPTS` tries) and
        stored; bytes that came inline are stored once (fetching them again gives the same
        bytes: a bad image regenerates the item instead)."""
        fetch = partial(self._fetch_once, item, index, image)
        if image.url is None:
            return await fetch()
        return await self._downloads.call(fetch)

    async def _fetch_once(self, item: WorkItem, index: int, image: GeneratedImage) -> OutputFile:
        data = await self._backend.download(image)
        store = partial(
            outputs.store_image,
            self._out_dir,
            source=item.source,
            key=item.key,
            index=index,
            data=data,
            url=image.url,
            id=image.id,
            folders=self._folders,
        )
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, store)
