"""The embedded mock of OpenAI's ``GET /v1/models`` and ``GET /v1/models/{id}``.

It knows the packaged catalog's image models (their shutdown dates from it), takes any
other ``gpt-image-*`` id as a current model (a model newer than this synthaug), and lets
`MockConfig.shutdowns` mark a model shut down on a date, for tests and rehearsals of
what a run does when OpenAI retires a model. A model whose shutdown date has passed on
the mock's date (`MockConfig.today`, else the host's) is still described here, with its
``shutdown_date``, but the generation endpoints answer a request for it as OpenAI does:
404 ``model_not_found`` (`MockModels.refusal`). Answers have OpenAI's shapes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..jobspec.catalog import Catalog, default_catalog
from .config import MockConfig, MockStats

__all__ = ["MockModels", "model_not_found"]

_CREATED = 1_745_193_600  # 2025-04-21: a model's "created" when its release date is unknown


def model_not_found(model: str) -> web.Response:
    """OpenAI's answer for a model that is shut down or not open to the key."""
    payload = {
        "error": {
            "message": f"The model '{model}' does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    return web.json_response(payload, status=404)


class MockModels:
    """The models the mock serves, and their endpoints."""

    def __init__(
        self,
        config: MockConfig,
        stats: MockStats,
        *,
        authorized: Callable[[web.Request], bool],
        catalog: Catalog | None = None,
    ) -> None:
        self._config = config
        self._stats = stats
        self._authorized = authorized
        self._catalog = catalog or default_catalog()

    def add_routes(self, application: web.Application) -> None:
        """Serve ``GET /v1/models`` and ``GET /v1/models/{id}``."""
        application.router.add_get("/v1/models", self.list_models)
        application.router.add_get("/v1/models/{model}", self.get_model)

    def today(self) -> dt.date:
        """The mock's date: the configured one, else the host's."""
        return self._config.today or dt.date.today()

    def shutdown(self, model: str) -> dt.date | None:
        """The model's shutdown date: the configured one, else the catalog's."""
        if model in self._config.shutdowns:
            return self._config.shutdowns[model]
        known = self._catalog.get(model)
        return None if known is None else known.shutdown

    def knows(self, model: str) -> bool:
        """Whether ``/models/{model}`` describes it (any ``gpt-image-*`` id does)."""
        return (
            model in self._config.shutdowns
            or self._catalog.get(model) is not None
            or model.startswith("gpt-image-")
        )

    def refusal(self, model: object) -> web.Response | None:
        """The 404 a generation endpoint answers for a model shut down by today; None
        when the model is served (or the request names none)."""
        if model is None:
            return None
        shutdown = self.shutdown(str(model))
        if shutdown is None or shutdown > self.today():
            return None
        self._stats.model_not_found += 1
        return model_not_found(str(model))

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models``: every model the mock knows by name."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        names = dict.fromkeys(
            [name for model in self._catalog.models for name in (model.name, *model.aliases)]
            + list(self._config.shutdowns)
        )
        return web.json_response({"object": "list", "data": [self._object(n) for n in names]})

    async def get_model(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models/{id}``: the model object, or 404 ``model_not_found``."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        model = request.match_info["model"]
        if not self.knows(model):
            return model_not_found(model)
        return web.json_response(self._object(model))

    def _refused(self, request: web.Request) -> web.StreamResponse | None:
        """Count the request; the key check and `MockConfig.models_fault`, if any."""
        self._stats.model_requests += 1
        if not self._authorized(request):
            self._stats.unauthorized += 1
            return _error(401, "invalid_api_key", "Incorrect API key provided.")
        fault = self._config.models_fault
        if fault is None:
            return None
        if fault == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if fault == "malformed":
            return web.Response(text='{"object": "model", "id": ', content_type="application/json")
        return _error(int(fault), "server_error", "The server had an error, try again.")

    def _object(self, model: str) -> dict[str, Any]:
        shutdown = self.shutdown(model)
        known = self._catalog.get(model)
        return {
            "id": model,
            "object": "model",
            "created": _created(None if known is None else known.released),
            "owned_by": "system",
            "shutdown_date": None if shutdown is None else shutdown.isoformat(),
        }


def _created(released: str | None) -> int:
    """Unix seconds of a release date (``YYYY-MM`` or ``YYYY-MM-DD``)."""
    if released is None:
        return _CREATED
    parts = [int(part) for part in released.split("-")[:3] if part.isdigit()]
    try:
        year, month, day = (*parts, 1, 1)[:3]
        date = dt.date(year, month, day)
    except ValueError:
        return _CREATED
    return int(dt.datetime(date.year, date.month, date.day, tzinfo=dt.timezone.utc).timestamp())


def _error(status: int, code: str, message: str) -> web.Response:
    payload = {"error": {"message": message, "type": code, "param": None, "code": code}}
    return web.json_response(payload, status=status)
