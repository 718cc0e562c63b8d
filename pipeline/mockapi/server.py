"""The embedded mock API's server: `MockServer` (start, close, ``base_url``) and the
application it serves, put together from the mock's parts.

The mock answers Roboflow's and OpenAI's endpoints on a loopback port with placeholder
images, and can inject the faults a nightly job meets, so that tests, benchmarks and
user rehearsals (``synthaug mock-server``, backend kind ``mock``) send real HTTP through
the real clients. Each endpoint is its own module; this one only wires them to one
server's shared state:

- `pipeline.mockapi.generation`: ``POST /synthetic-image`` (Roboflow) and
  ``POST /v1/images/generations`` / ``/v1/images/edits`` (OpenAI);
- `pipeline.mockapi.served`: the answers' images, ``GET /images/<token>.png``;
- `pipeline.mockapi.faults`: fault injection, the enforced rate limit, Retry-After;
- `pipeline.mockapi.search`, `pipeline.mockapi.upload`, `pipeline.mockapi.annotate` over
  `pipeline.mockapi.dataset`: Roboflow's image search, upload, annotation upload and
  image read-back;
- `pipeline.mockapi.detect`: Roboflow's hosted detection, ``POST /{project}/{version}``,
  which finds the shapes `pipeline.mockapi.image` draws (`pipeline.mockapi.shapes`);
- `pipeline.mockapi.project`: Roboflow's project, ``GET /{workspace}/{project}``, with
  the class counts the server holds (`MockServer.set_project_classes` changes them);
- `pipeline.mockapi.roboflow`: what those Roboflow endpoints share (`MockRoboflow`: the
  key and project checks, the fault injection), built once per server;
- `pipeline.mockapi.batches`: OpenAI's Files and Batch API; `pipeline.mockapi.models`:
  its models list;
- `pipeline.mockapi.config`: the settings (`MockConfig`) and counters (`MockStats`, also
  served at ``GET /_stats``), which tests and benchmarks read to prove a client's
  behaviour.

The names tests and benchmarks import from here (`MockConfig`, `draw_image`, ...) are
re-exported from the modules that hold them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from types import MappingProxyType

from aiohttp import web

from .annotate import serve_annotate, serve_image
from .batches import MockBatches
from .bodies import bearer
from .config import (
    DEFAULT_FAULT_WEIGHTS,
    DEFAULT_PAUSE_GRACE_S,
    FATAL_FAULT_KINDS,
    FAULT_KINDS,
    MAX_BODY_BYTES,
    MockConfig,
    MockStats,
    class_count_problems,
)
from .dataset import MockDataset
from .detect import serve_detect
from .faults import MockFaults
from .generation import MockGeneration
from .image import draw_image, mock_color
from .models import MockModels
from .project import add_project_route
from .roboflow import MockRoboflow
from .search import serve_search
from .served import ServedImages
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

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _MockApi:
    """One server's parts and the state they share; built in the server's event loop."""

    def __init__(
        self,
        config: MockConfig,
        stats: MockStats,
        class_counts: Callable[[], Mapping[str, int]],
    ) -> None:
        self.config = config
        self.stats = stats
        self.faults = MockFaults(config, stats)
        self.dataset = MockDataset()  # Roboflow projects' images: upload adds, search finds
        self.roboflow = MockRoboflow(config, stats, self.dataset, self.faults, class_counts)
        self.images = ServedImages(config, stats)
        self.models = MockModels(config, stats, authorized=self._bearer_ok)  # /v1/models
        self.generation = MockGeneration(
            config, stats, faults=self.faults, images=self.images, models=self.models
        )
        self.batches = MockBatches(
            config,
            stats,
            authorized=self._bearer_ok,
            draw_fault=self.faults.draw,
            generate=self.generation.batch_answer,
            count=self.generation.count_generation,
        )

    def app(self) -> web.Application:
        """The aiohttp application serving the API, the images and the stats."""
        application = web.Application(client_max_size=MAX_BODY_BYTES)
        self.generation.add_routes(application)
        self.images.add_routes(application)
        router, roboflow = application.router, self._roboflow
        router.add_get("/_stats", self.serve_stats)
        router.add_post("/{workspace}/{project}/search", roboflow(serve_search))
        router.add_post("/dataset/{project}/upload", roboflow(serve_upload))
        router.add_post("/dataset/{project}/annotate/{image_id}", roboflow(serve_annotate))
        router.add_get("/{workspace}/{project}/images/{image_id}", roboflow(serve_image))
        self.batches.add_routes(application)
        self.models.add_routes(application)
        # last: two segments (for detection, the second a number) must not shadow others
        router.add_post(r"/{project}/{version:\d+}", roboflow(serve_detect))
        add_project_route(application, self.roboflow)
        if self.config.clock_offset_s:
            application.on_response_prepare.append(self.faults.stamp_date)
        return application

    def _roboflow(self, serve: Callable[..., Awaitable[web.StreamResponse]]) -> Handler:
        """A Roboflow endpoint's handler, given this server's Roboflow side."""
        return partial(serve, roboflow=self.roboflow)

    def _bearer_ok(self, request: web.Request) -> bool:
        """The request carries the key the mock was started with (any, without one)."""
        return self.config.accepts_key(bearer(request))

    async def serve_stats(self, request: web.Request) -> web.Response:
        """``GET /_stats``."""
        return web.json_response(self.stats.to_json())


class MockServer:
    """The mock API on a loopback port: ``async with MockServer(config) as server``."""

    def __init__(
        self, config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else MockConfig()
        self.stats = MockStats()
        self._project_classes: Mapping[str, int] = MappingProxyType(self.config.class_counts())
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

    @property
    def project_classes(self) -> Mapping[str, int]:
        """The class counts ``GET /{workspace}/{project}`` reports (from the config at first)."""
        return self._project_classes

    def set_project_classes(self, classes: Mapping[str, int]) -> None:
        """Report these class counts from now on, even while serving (a copy is kept).

        Raises ValueError for a name that is empty or a count that is not a whole
        number >= 0.
        """
        problems = class_count_problems(classes)
        if problems:
            raise ValueError("invalid project classes: " + "; ".join(problems))
        self._project_classes = MappingProxyType(dict(classes))

    async def start(self) -> None:
        """Bind and serve; with port 0 a free port is chosen."""
        self._api = _MockApi(self.config, self.stats, lambda: self._project_classes)
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
            self._api.faults.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
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
