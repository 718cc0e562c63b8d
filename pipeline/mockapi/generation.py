"""The mock's generation endpoints: Roboflow's ``POST /synthetic-image`` and OpenAI's
``POST /v1/images/generations`` and ``/v1/images/edits``.

One handler serves the three, as they differ in a few steps only: the key (Roboflow's
``?api_key=``, OpenAI's Bearer header), the body (JSON, or an edit's multipart form),
what is refused (Roboflow's input image rules and unknown projects; OpenAI's mask rule
and shut-down models) and the answer's shape (Roboflow's image URLs in
`MockConfig.response_shape`, OpenAI's inline base64). The rest is shared: the counters
(`MockStats`), the rate limit, the content refusal, the faults (`pipeline.mockapi.faults`)
and the images (`pipeline.mockapi.served`). It also makes the answer of one Batch API
request line (`batch_answer`), through the same drawing path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from aiohttp import web

from .bodies import (
    bearer,
    image_count,
    load_body,
    load_form,
    mask_problem,
    roboflow_image_problem,
)
from .config import MockConfig, MockStats
from .faults import MockFaults
from .models import MockModels
from .replies import drop_connection, error, insufficient_quota
from .served import ServedImages

__all__ = ["MockGeneration"]


class MockGeneration:
    """The generation endpoints of one server, over its faults, images and models."""

    def __init__(
        self,
        config: MockConfig,
        stats: MockStats,
        *,
        faults: MockFaults,
        images: ServedImages,
        models: MockModels,
    ) -> None:
        self.config = config
        self.stats = stats
        self._faults = faults
        self._images = images
        self._models = models

    def add_routes(self, application: web.Application) -> None:
        """Serve Roboflow's and OpenAI's generation endpoints."""
        application.router.add_post("/synthetic-image", self.generate)
        application.router.add_post("/v1/images/generations", self.openai_generate)
        application.router.add_post("/v1/images/edits", self.openai_edit)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """``POST /synthetic-image``: counts the start, then answers or injects a fault."""
        return await self._serve(request, None)

    async def openai_generate(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/images/generations`` (OpenAI's JSON request and answer shape)."""
        return await self._serve(request, "generations")

    async def openai_edit(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/images/edits`` (multipart: ``image[]`` parts, fields for the rest)."""
        return await self._serve(request, "edits")

    async def batch_answer(self, body: dict[str, Any], fault: str | None) -> dict[str, Any]:
        """The answer body of one batch request line (the images inline, as online)."""
        payload = await self._images.payload(None, body, fault, "b64_json")
        assert isinstance(payload, dict)
        return payload

    def count_generation(self, body: dict[str, Any]) -> None:
        """Count a generation of `body` (and how often this very body was generated)."""
        digest = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        self.stats.generations += 1
        self.stats.images += image_count(body.get("n"))
        self.stats.generations_by_body[digest] = self.stats.generations_by_body.get(digest, 0) + 1

    async def _serve(self, request: web.Request, openai: str | None) -> web.StreamResponse:
        """Count the start, then answer or inject a fault; `openai` names its endpoint."""
        now = asyncio.get_running_loop().time()
        self.stats.requests += 1
        if self._faults.in_pause(now):
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
        given = bearer(request) if openai else request.query.get("api_key", "")
        if not self.config.accepts_key(given):
            self.stats.unauthorized += 1
            return error(401, "invalid_api_key", "Incorrect API key provided.")
        if openai == "edits":
            body = await load_form(request)
        else:
            body = load_body(await request.read())
        if body is None:
            what = (
                "a multipart form with prompt and image[]"
                if openai == "edits"
                else ("a JSON object with a prompt")
            )
            return error(400, "invalid_request", f"Body must be {what}.")
        problem = mask_problem(body) if openai else roboflow_image_problem(body)
        if problem is not None:
            return error(400, "invalid_request", problem)
        refusal = self._models.refusal(body.get("model")) if openai else None
        if refusal is not None:  # a model shut down by the mock's date: OpenAI's 404
            return refusal
        projects = self.config.projects
        if openai is None and projects is not None and body.get("project_url") not in projects:
            self.stats.unknown_project += 1
            return error(404, "not_found", "Project not found.")
        if not self._faults.take_token(now):
            wait = max(self._faults.seconds_to_token(), self.config.min_retry_after_s)
            return self._faults.rate_limited(wait, now)
        headers = self._faults.rate_limit_headers()
        if self.config.refuse_word and self.config.refuse_word in body["prompt"]:
            self.stats.refused += 1
            return error(
                400,
                "content_policy_violation",
                "Your request was rejected as a result of our safety system.",
            )
        fault = self._faults.draw()
        self.stats.faults_by_prompt.setdefault(str(body["prompt"]), []).append(fault)
        await self._faults.pause(self.config.latency_s)
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
            now = asyncio.get_running_loop().time()
            return self._faults.rate_limited(self.config.retry_after_s, now)
        if fault == "insufficient_quota":
            return insufficient_quota()
        if fault in ("500", "502", "503", "504"):
            return error(int(fault), "server_error", "The server had an error, try again.")
        if fault == "malformed":
            return web.Response(text='{"data": [{"url": ', content_type="application/json")
        if fault == "wrong_shape":
            return web.json_response({"status": "queued", "message": "no images here"})
        self.count_generation(body)
        if fault == "drop":
            drop_connection(request)
            return web.Response(status=500)
        if fault == "slow":
            await self._faults.pause(self.config.slow_s)
        shape = "b64_json" if openai else self.config.response_shape
        payload = await self._images.payload(request, body, fault, shape)
        return web.json_response(payload, headers=headers)
