"""The ``mock`` backend kind: the Roboflow client against an embedded mock API.

Entering it starts a `MockServer` on a free loopback port in this event loop and yields
a `RoboflowBackend` pointed at it (with ``batch=``, a `BatchBackend` pointed at its OpenAI
Batch API), so a rehearsal sends real HTTP through the same client code as a real run;
leaving it closes both. It never uses a proxy or a key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..mockapi.server import MockConfig, MockServer
from .base import Backend
from .client_options import ClientOptions
from .openai_batch import BatchBackend, BatchOptions
from .roboflow import RoboflowBackend

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+; we support 3.10

__all__ = ["MockBackend"]

_NO_KEY = "mock"  # the embedded server is started without a key: any value passes


class MockBackend:
    """An embedded mock API and the client that talks to it, as one backend."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        config: MockConfig | None = None,
        batch: BatchOptions | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        # the registry's common signature; of it only concurrency and timeout_s serve here:
        # the client talks to its own server, without a key or a proxy
        del base_url, api_key
        self._server = MockServer(config or MockConfig())
        self._concurrency = options["concurrency"]
        self._timeout_s = options["timeout_s"]
        self._batch = batch
        self._client: RoboflowBackend | BatchBackend | None = None

    async def __aenter__(self) -> Backend:
        await self._server.start()
        try:
            client: RoboflowBackend | BatchBackend
            if self._batch is not None:
                client = _EmbeddedBatchBackend(
                    self._server.base_url + "/v1",
                    _NO_KEY,
                    concurrency=self._concurrency,
                    timeout_s=self._timeout_s,
                    batch=self._batch,
                )
            else:
                client = RoboflowBackend(
                    self._server.base_url,
                    _NO_KEY,
                    concurrency=self._concurrency,
                    timeout_s=self._timeout_s,
                )
            self._client = client
            return await client.__aenter__()
        except BaseException:
            await self._server.close()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._client is not None:
                await self._client.aclose()
        finally:
            await self._server.close()


class _EmbeddedBatchBackend(BatchBackend):
    """A rehearsal's Batch API client: its `api_root` is the mock's own, where the mock's
    Roboflow endpoints (upload, search) are, not its ``/v1``."""

    @property
    def api_root(self) -> str:
        """The embedded mock's root URL."""
        return super().api_root.removesuffix("/v1")
