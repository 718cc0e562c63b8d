"""The mock's OpenAI Files and Batch API: ``/v1/files`` and ``/v1/batches``.

A batch moves through validating → in_progress → finalizing → completed on the loop's
clock in `MockConfig.batch_s` seconds (a rehearsal speeds a 24-hour night up to seconds).
Each request line is checked as the real API checks a batch's input file (JSON,
``custom_id`` unique, ``method`` POST, ``url`` the batch's endpoint, at most 50,000
lines): a bad file fails the batch with ``errors``. Work is done, faults drawn and
generations counted when the batch is created (that is when it is paid for); the output
and error files are written out line by line when downloaded, deterministically, so a
client that downloads them twice gets the same bytes. `MockConfig.batch_expire_share`
leaves a share of lines undone: such a batch ends ``expired`` with what it finished.

An ``/v1/images/edits`` batch takes edits in the Images API's JSON form (``images``: 1 to
16 objects of one ``image_url`` (a ``data:`` URL or an http(s) URL) or ``file_id`` each;
an optional ``mask`` object of the same form, a PNG). A line whose body the API would
refuse is answered, as the API answers it, with its own 400 in the error file (nothing
is generated or paid for it); the others are drawn from their prompt and first input
image as the online edits are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .config import MockConfig, MockStats
from .image import PNG_SIGNATURE

__all__ = ["MAX_BATCH_LINES", "MAX_EDIT_IMAGES", "MockBatches"]

MAX_BATCH_LINES = 50_000
MAX_EDIT_IMAGES = 16  # input images one edit takes at most (GPT image models)
EDITS_ENDPOINT = "/v1/images/edits"
BATCH_ENDPOINTS = ("/v1/images/generations", EDITS_ENDPOINT)
# share of a batch's time spent in each phase before it is done
_VALIDATING, _FINALIZING = 0.1, 0.9

Generate = Callable[[dict[str, Any], str | None], Awaitable[dict[str, Any]]]
"""Makes the answer body of one generation request, given its fault (without counting)."""


@dataclass
class _Line:
    custom_id: str
    body: dict[str, Any]  # an edit's: the mock's drawing form (`_edit_body`)
    fault: str | None
    expired: bool = False
    refused: str | None = None  # why the API would answer this line 400 (nothing is made)


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    created: float  # loop time
    created_at: int  # unix seconds, as the API reports
    metadata: dict[str, Any]
    lines: list[_Line] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None


class MockBatches:
    """Files and batches held in memory; `add_routes` serves them."""

    def __init__(
        self,
        config: MockConfig,
        stats: MockStats,
        *,
        authorized: Callable[[web.Request], bool],
        draw_fault: Callable[[], str | None],
        generate: Generate,
        count: Callable[[dict[str, Any]], None],
    ) -> None:
        self._config = config
        self._stats = stats
        self._authorized = authorized
        self._draw_fault = draw_fault
        self._generate = generate
        self._count = count
        self._files: dict[str, bytes | _Batch] = {}  # input bytes, or the batch of an output
        self._batches: dict[str, _Batch] = {}
        self._made = 0

    def add_routes(self, app: web.Application) -> None:
        """Serve the Files and Batch endpoints under ``/v1``."""
        app.router.add_post("/v1/files", self.upload_file)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)

    def _id(self, prefix: str) -> str:
        self._made += 1
        return f"{prefix}-mock{self._made:06d}"

    def _denied(self, request: web.Request) -> web.Response | None:
        if self._authorized(request):
            return None
        self._stats.unauthorized += 1
        return _error(401, "invalid_api_key", "Incorrect API key provided.")

    async def upload_file(self, request: web.Request) -> web.Response:
        """``POST /v1/files`` (multipart ``purpose`` and ``file``)."""
        if (denied := self._denied(request)) is not None:
            return denied
        if not request.content_type.startswith("multipart/"):
            return _error(400, "invalid_request", "Expected a multipart form.")
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or not isinstance(upload, web.FileField):
            return _error(400, "invalid_request", "Expected purpose=batch and a file part.")
        data = upload.file.read()
        file_id = self._id("file")
        self._files[file_id] = data
        self._stats.batch_files += 1
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": upload.filename,
                "purpose": "batch",
            }
        )

    async def create_batch(self, request: web.Request) -> web.Response:
        """``POST /v1/batches``: the work is decided (and paid for) now."""
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "Body must be a JSON object.")
        source = self._files.get(str(body.get("input_file_id")))
        if not isinstance(source, bytes):
            return _error(404, "not_found", "No such file: input_file_id.")
        if body.get("endpoint") not in BATCH_ENDPOINTS:
            return _error(400, "invalid_request", f"endpoint must be one of {BATCH_ENDPOINTS}.")
        if body.get("completion_window") != "24h":
            return _error(400, "invalid_request", "completion_window must be 24h.")
        metadata = body.get("metadata") or {}
        batch = _Batch(
            id=self._id("batch"),
            input_file_id=str(body["input_file_id"]),
            endpoint=str(body["endpoint"]),
            created=asyncio.get_running_loop().time(),
            created_at=int(time.time()),
            metadata=metadata if isinstance(metadata, dict) else {},
        )
        batch.lines, batch.errors = _read_lines(source, batch.endpoint, self._files)
        if not batch.errors:
            self._decide(batch)
        self._batches[batch.id] = batch
        self._stats.batches += 1
        return web.json_response(self._describe(batch))

    def _decide(self, batch: _Batch) -> None:
        """Draw each line's fault and which lines the batch will not reach in time."""
        share = self._config.batch_expire_share
        for line in batch.lines:
            if line.refused is not None:
                continue  # answered 400 whenever the batch reaches it: nothing to pay
            digest = hashlib.sha256(f"{batch.id}\0{line.custom_id}".encode()).digest()
            line.expired = share > 0 and digest[0] / 256 < share
            if not line.expired:
                line.fault = self._draw_fault()
            if not line.expired and line.fault not in _FAILING:
                self._count(line.body)  # a generation that is paid for

    async def get_batch(self, request: web.Request) -> web.Response:
        """``GET /v1/batches/{id}``: its state on the mock's clock."""
        if (denied := self._denied(request)) is not None:
            return denied
        self._stats.batch_polls += 1
        batch = self._batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "not_found", "No such batch.")
        return web.json_response(self._describe(batch))

    async def list_batches(self, request: web.Request) -> web.Response:
        """``GET /v1/batches?limit=&after=``: newest first, as the API lists them."""
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            limit = min(max(int(request.query.get("limit", "20")), 1), 100)
        except ValueError:
            return _error(400, "invalid_request", "limit must be an integer.")
        ordered = sorted(self._batches.values(), key=lambda b: b.id, reverse=True)
        after = request.query.get("after")
        if after:
            ordered = [b for b in ordered if b.id < after]
        page = ordered[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": [self._describe(b) for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(ordered) > limit,
            }
        )

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/files/{id}/content``: an input file, or an output/error file written
        out a line at a time (a real one is gigabytes of base64 images)."""
        if (denied := self._denied(request)) is not None:
            return denied
        file_id = request.match_info["file_id"]
        found = self._files.get(file_id)
        if isinstance(found, bytes):
            return web.Response(body=found, content_type="application/octet-stream")
        if found is None:
            return _error(404, "not_found", "No such file.")
        self._stats.batch_downloads += 1
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        errors = file_id == found.error_file_id
        for line in found.lines:
            text = await self._result_line(found, line, errors=errors)
            if text is not None:
                await response.write(text)
        await response.write_eof()
        return response

    async def _result_line(self, batch: _Batch, line: _Line, *, errors: bool) -> bytes | None:
        """The output (or error) file's line for `line`; None when it belongs to the other."""
        request_id = "batch_req_" + hashlib.sha256(line.custom_id.encode()).hexdigest()[:24]
        result: dict[str, Any] = {"id": request_id, "custom_id": line.custom_id}
        if line.expired:
            if not errors:
                return None
            result["response"] = None
            result["error"] = {
                "code": "batch_expired",
                "message": "This request could not be executed before the completion window "
                "expired.",
            }
            return (json.dumps(result) + "\n").encode()
        status, body = await self._answer(line)
        if (status != 200) != errors:
            return None
        result["response"] = {"status_code": status, "request_id": request_id, "body": body}
        result["error"] = None
        return (json.dumps(result) + "\n").encode()

    async def _answer(self, line: _Line) -> tuple[int, dict[str, Any]]:
        if line.refused is not None:
            return 400, _error_body("invalid_request_error", line.refused)
        fault = line.fault
        if fault in ("500", "502", "503", "504"):
            return int(fault), _error_body("server_error", "The server had an error.")
        if fault == "429":
            return 429, _error_body("rate_limit_exceeded", "Rate limit reached.")
        if fault == "insufficient_quota":
            return 429, _error_body("insufficient_quota", "You exceeded your current quota.")
        if self._config.refuse_word and self._config.refuse_word in str(line.body["prompt"]):
            return 400, _error_body(
                "moderation_blocked", "Your request was rejected by the safety system."
            )
        if fault in ("malformed", "wrong_shape"):
            return 200, {"status": "queued", "message": "no images here"}
        return 200, await self._generate(line.body, fault)

    def _describe(self, batch: _Batch) -> dict[str, Any]:
        """The batch object as the API shows it now."""
        elapsed = asyncio.get_running_loop().time() - batch.created
        progress = elapsed / self._config.batch_s if self._config.batch_s > 0 else 1.0
        total = len(batch.lines)
        status, done = "validating", 0
        if batch.errors and progress >= _VALIDATING:
            status = "failed"
        elif progress >= 1.0:
            status = "expired" if any(line.expired for line in batch.lines) else "completed"
            done = total
        elif progress >= _FINALIZING:
            status, done = "finalizing", total
        elif progress >= _VALIDATING:
            status = "in_progress"
            done = int(total * (progress - _VALIDATING) / (_FINALIZING - _VALIDATING))
        finished = status in ("completed", "expired")
        if finished:
            self._name_files(batch)
        failed = sum(
            1
            for line in batch.lines
            if line.fault in _FAILING or line.expired or line.refused is not None
        )
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": batch.output_file_id if finished else None,
            "error_file_id": batch.error_file_id if finished else None,
            "created_at": batch.created_at,
            "metadata": batch.metadata,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "request_counts": {
                "total": total,
                "completed": done - failed if finished else done,
                "failed": failed if finished else 0,
            },
        }

    def _name_files(self, batch: _Batch) -> None:
        if batch.output_file_id is None:
            batch.output_file_id = self._id("file")
            batch.error_file_id = self._id("file")
            self._files[batch.output_file_id] = batch
            self._files[batch.error_file_id] = batch


_FAILING = frozenset({"500", "502", "503", "504", "429", "insufficient_quota"})


def _read_lines(
    data: bytes, endpoint: str, files: dict[str, bytes | _Batch]
) -> tuple[list[_Line], list[dict[str, Any]]]:
    """The request lines of an input file, or the errors that fail its batch (`files`:
    what an edit's ``file_id`` may name)."""
    lines: list[_Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    raw_lines = data.splitlines()
    if len(raw_lines) > MAX_BATCH_LINES:
        problem = f"The file has {len(raw_lines)} requests; a batch takes {MAX_BATCH_LINES}."
        return [], [{"code": "too_many_requests", "message": problem, "line": None}]
    for number, raw in enumerate(raw_lines, start=1):
        found = _line_problem(raw, endpoint, seen)
        if isinstance(found, str):
            errors.append({"code": "invalid_request", "message": found, "line": number})
            continue
        if endpoint == EDITS_ENDPOINT:
            try:
                found.body = _edit_body(found.body, files)
            except _Refused as refused:
                found.refused = str(refused)
        lines.append(found)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The file has no requests.", "line": None})
    return lines, errors


def _line_problem(raw: bytes, endpoint: str, seen: set[str]) -> _Line | str:
    try:
        request = json.loads(raw)
    except ValueError:
        return "Line is not valid JSON."
    if not isinstance(request, dict):
        return "Line is not a JSON object."
    custom_id, body = request.get("custom_id"), request.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        return "Missing custom_id."
    if custom_id in seen:
        return f"Duplicate custom_id {custom_id!r}."
    if request.get("method") != "POST" or request.get("url") != endpoint:
        return f"Expected method POST and url {endpoint}."
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return "body must be a JSON object with a prompt."
    seen.add(custom_id)
    return _Line(custom_id, body, None)


class _Refused(ValueError):
    """An edit line's body that the API would answer with a 400 (the message says why)."""


def _edit_body(body: dict[str, Any], files: dict[str, bytes | _Batch]) -> dict[str, Any]:
    """An edit in the Images API's JSON form as the mock draws it: the body without
    ``images`` and ``mask``, with the first image as ``image`` / ``image_type`` (as the
    online edits' multipart is read) and the mask as its hash. Raises `_Refused`."""
    images = body.get("images")
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_EDIT_IMAGES:
        raise _Refused(f"images must be a list of 1 to {MAX_EDIT_IMAGES} image objects.")
    inputs = [_image_reference(ref, files, f"images[{i}]") for i, ref in enumerate(images)]
    drawn = {key: value for key, value in body.items() if key not in ("images", "mask")}
    drawn["image"], drawn["image_type"] = inputs[0]
    if "mask" in body:
        mask, kind = _image_reference(body["mask"], files, "mask")
        if kind != "base64" or not base64.b64decode(mask).startswith(PNG_SIGNATURE):
            raise _Refused("mask must be a PNG image (a data URL or a file_id).")
        drawn["mask"] = "sha256:" + hashlib.sha256(mask.encode()).hexdigest()
    return drawn


def _image_reference(
    reference: object, files: dict[str, bytes | _Batch], where: str
) -> tuple[str, str]:
    """One image object as the mock's (image, image_type): base64 bytes or a URL."""
    if not isinstance(reference, dict) or len(reference) != 1:
        raise _Refused(f"{where} must be an object with exactly one of image_url or file_id.")
    if "file_id" in reference:
        stored = files.get(str(reference["file_id"]))
        if not isinstance(stored, bytes):
            raise _Refused(f"{where}.file_id: no such file.")
        return base64.b64encode(stored).decode("ascii"), "base64"
    url = reference.get("image_url")
    if not isinstance(url, str):
        raise _Refused(f"{where} must be an object with exactly one of image_url or file_id.")
    if url.startswith(("https://", "http://")):
        return url, "url"
    header, comma, encoded = url.partition(",")
    if not (url.startswith("data:image/") and comma and header.endswith(";base64")):
        raise _Refused(f"{where}.image_url must be a data:image/...;base64 URL or an http(s) URL.")
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if not decoded:
        raise _Refused(f"{where}.image_url: the data URL's base64 does not decode.")
    return encoded, "base64"


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "type": code, "message": message, "param": None}}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(_error_body(code, message), status=status)
