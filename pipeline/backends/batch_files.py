"""The control calls of OpenAI's Files and Batch APIs: upload an input file, create a
batch, find one by its input file, poll one, read a results file.

Every call runs under the run's retry policy (`RetriedCalls`: `Retrier` and a 429 pause
for its Retry-After). Creating a batch whose answer may not have arrived looks the batch
up by its input file before it creates another. A poll, and a results read, are retried
for as long as it takes: their items were paid for, and failing them would submit them
again.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp

from ..errors import BackendError, TransientError
from ..records import BATCH_LOGGER, BatchRef
from ..retry import RetryPolicy
from .base import excerpt
from .http import ApiClient
from .retried import RetriedCalls, unlimited

__all__ = ["BatchFiles"]

_READ_CHUNK = 1024 * 1024

_log = logging.getLogger(__name__)
_batch_log = logging.getLogger(BATCH_LOGGER)  # what is in flight: shown by default


class BatchFiles:
    """The Files and Batches endpoints under `root` (``…/v1``), through `http`.

    `policy` is the run's retry policy; polls back off up to `poll_max_s` between tries.
    """

    def __init__(
        self, root: str, http: ApiClient, *, job: str, policy: RetryPolicy, poll_max_s: float
    ) -> None:
        self._http = http
        self._job = job
        self._files_url = root + "/files"
        self.batches_url = root + "/batches"
        self._calls = RetriedCalls(policy, on_retry=_log_retry)
        self._polls = self._calls.under(unlimited(policy, cap_s=poll_max_s))
        self._reads = self._calls.under(unlimited(policy))
        self._found: dict[str, asyncio.Task[BatchRef | None]] = {}  # file id -> lookup

    async def upload(self, lines: list[bytes]) -> str:
        """POST the JSONL input file (``purpose=batch``); its file id."""

        async def once() -> str:
            form = aiohttp.FormData()  # a form is read once: one per attempt
            form.add_field("purpose", "batch")
            form.add_field(
                "file",
                b"".join(lines),
                filename=f"synthaug-{_safe(self._job)}.jsonl",
                content_type="application/jsonl",
            )
            answer = await self._http.json("POST", self._files_url, data=form)
            return _field(answer, "id", self._files_url)

        return await self._calls.call(once)

    async def create(self, file_id: str, endpoint: str) -> BatchRef:
        """POST /batches for the file; on an answer that may not have arrived, look the
        batch up by its input file before creating another."""
        body = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": {"synthaug_job": self._job[:512]},
        }

        async def once() -> BatchRef:
            try:
                answer = await self._http.json("POST", self.batches_url, json=body)
            except TransientError as error:
                found = await self.find(file_id) if error.ambiguous else None
                if found is None:
                    raise
                return found
            return BatchRef(file_id, _field(answer, "id", self.batches_url))

        return await self._calls.call(once)

    async def find(self, file_id: str) -> BatchRef | None:
        """The batch created for `file_id`, if any (one lookup per file, shared)."""
        lookup = self._found.get(file_id)
        if lookup is None:
            lookup = self._found[file_id] = asyncio.ensure_future(self._look_up(file_id))
        return await asyncio.shield(lookup)

    async def _look_up(self, file_id: str) -> BatchRef | None:
        after: str | None = None
        while True:
            url = self.batches_url + "?limit=100" + (f"&after={after}" if after else "")
            page = await self._calls.call(partial(self._http.json, "GET", url))
            batches = page.get("data") if isinstance(page, dict) else None
            for batch in batches if isinstance(batches, list) else []:
                if isinstance(batch, dict) and batch.get("input_file_id") == file_id:
                    _batch_log.info("found batch %s of input file %s", batch.get("id"), file_id)
                    return BatchRef(file_id, str(batch.get("id")))
            if not (isinstance(page, dict) and page.get("has_more") and page.get("last_id")):
                return None
            after = str(page["last_id"])

    async def poll(self, batch_id: str) -> dict[str, Any]:
        """GET the batch; transient failures are tried again for as long as it takes."""
        url = f"{self.batches_url}/{batch_id}"

        async def once() -> dict[str, Any]:
            batch = await self._http.json("GET", url)
            if not isinstance(batch, dict):
                raise TransientError(
                    f"{url} answered something other than a batch: {excerpt(repr(batch))}",
                    kind="bad_response",
                )
            return batch

        return await self._polls.call(once)

    async def read(
        self,
        file_id: str,
        take: Callable[[bytes], Awaitable[None]],
        wanted: Callable[[], bool],
    ) -> None:
        """Read a results file through while lines are `wanted`, handing each line to
        ``await take(line)``; a transient failure reads it again, for as long as it takes
        (`take` skips the lines already handed over)."""
        url = f"{self._files_url}/{file_id}/content"

        async def once() -> None:
            if not wanted():
                return
            async for line in _lines(self._http, url):
                await take(line)

        await self._reads.call(once)


async def _lines(http: ApiClient, url: str) -> AsyncIterator[bytes]:
    """The lines of a results file as they arrive (without waiting for the whole)."""
    session = http.session()
    target = http.url(url)
    # no total timeout: a results file is gigabytes; a stalled read still times out
    timeout = aiohttp.ClientTimeout(total=None, sock_read=http.timeout.total)
    try:
        async with session.get(
            target, proxy=http.proxy_for(target), headers=http.auth(), timeout=timeout
        ) as response:
            if response.status != 200:
                text = await response.text(errors="replace")
                raise http.http_error(response.status, text, response.headers)
            rest = b""
            async for piece in response.content.iter_chunked(_READ_CHUNK):
                rest += piece
                *whole, rest = rest.split(b"\n")
                for line in whole:
                    if line.strip():
                        yield line
            if rest.strip():
                yield rest
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        failure = TransientError(f"reading {url} failed: {type(exc).__name__}", kind="download")
    else:
        return
    raise failure


def _log_retry(error: BackendError, attempt: int, wait_s: float) -> None:
    _log.warning(
        "Batch API call, attempt %d: %s; trying again in %.1f s", attempt, error.message, wait_s
    )


def _field(answer: Any, name: str, url: str) -> str:
    value = answer.get(name) if isinstance(answer, dict) else None
    if not isinstance(value, str) or not value:
        raise TransientError(
            f"{url} answered without {name}: {excerpt(repr(answer))}", kind="bad_response"
        )
    return value


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "job"
