"""The embedded mock of Roboflow's image search: ``POST /{workspace}/{project}/search``.

It answers as the real endpoint documents: ``{"offset", "total", "results": [{"id",
"name", ...}]}``, paged by ``offset`` / ``limit`` (at most 250), over the project's
images in `pipeline.mockapi.dataset`. ``tag``, ``class_name``, ``batch`` and
``batch_id`` filter; ``prompt`` and ``like_image`` sort the whole project by a
deterministic likeness (shared words, tags and classes), as a semantic search ranks
rather than filters. It checks the key and the project as the mock's generation endpoint
does, refuses bodies the real one would (400), and applies the server's fault injection
(429 with Retry-After, 5xx, dropped connections, malformed and wrong-shaped answers) so
the client's retries can be proved. The ids it returns are valid ``image_type: id``
inputs of the mock's ``/synthetic-image``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from .config import MockConfig
from .dataset import MockImage
from .replies import roboflow_error
from .roboflow import MockRoboflow, dropped

__all__ = ["MAX_SEARCH_LIMIT", "match_images", "search_problem", "serve_search"]

MAX_SEARCH_LIMIT = 250
"""The real endpoint's largest page."""
DEFAULT_SEARCH_LIMIT = 50
_TEXT_FIELDS = ("prompt", "like_image", "tag", "class_name", "batch_id")


async def serve_search(request: web.Request, *, roboflow: MockRoboflow) -> web.StreamResponse:
    """``POST /{workspace}/{project}/search``: key, body, project, fault, then a page."""
    roboflow.stats.searches += 1
    refusal = roboflow.refused_key(request)
    if refusal is not None:
        return refusal
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    problem = search_problem(body)
    if problem is not None:
        return roboflow_error(400, problem)
    assert isinstance(body, dict)
    workspace, project = request.match_info["workspace"], request.match_info["project"]
    refusal = roboflow.unknown_project(project, shown=f"{workspace}/{project}")
    if refusal is not None:
        return refusal
    images = list(roboflow.dataset.images(project))
    like = body.get("like_image")
    if like is not None and not any(like in (image.id, image.name) for image in images):
        return roboflow_error(400, f"like_image {like!r} is not an image of {workspace}/{project}.")
    fault = _search_fault(roboflow.faults.draw())
    if fault is not None:
        return _faulty(request, fault, roboflow.config)
    matched = match_images(images, body)
    offset = body.get("offset", 0)
    page = matched[offset : offset + body.get("limit", DEFAULT_SEARCH_LIMIT)]
    fields = body.get("fields")
    results = [_result(image, workspace, fields) for image in page]
    return web.json_response({"offset": offset, "total": len(matched), "results": results})


def search_problem(body: Any) -> str | None:
    """Why the real endpoint would refuse this body (a 400), or None."""
    if not isinstance(body, dict):
        return "Body must be a JSON object."
    for key in _TEXT_FIELDS:
        value = body.get(key)
        if key in body and (not isinstance(value, str) or not value.strip()):
            return f"{key} must be a non-empty string."
    for key, default, low, high in (
        ("offset", 0, 0, None),
        ("limit", DEFAULT_SEARCH_LIMIT, 1, MAX_SEARCH_LIMIT),
    ):
        value = body.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"{key} must be a whole number of at least {low}."
        if high is not None and value > high:
            return f"{key} must be at most {high}."
    if "in_dataset" in body and not isinstance(body["in_dataset"], (bool, str)):
        return "in_dataset must be a boolean or a project id."
    if "batch" in body and not isinstance(body["batch"], bool):
        return "batch must be a boolean."
    fields = body.get("fields")
    if fields is not None and (
        not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)
    ):
        return "fields must be a list of field names."
    return None


def match_images(images: Iterable[MockImage], body: Mapping[str, Any]) -> list[MockImage]:
    """The images a (valid) search body finds, in the order the answer lists them."""
    found = [image for image in images if _passes(image, body)]
    prompt, like = body.get("prompt"), body.get("like_image")
    if isinstance(like, str):
        model = next((i for i in found if like in (i.id, i.name)), None)
        words = set(model.tags + model.class_names) if model else set()
        return sorted(found, key=lambda i: (-_likeness(i, words), _tiebreak(like, i)))
    if isinstance(prompt, str):
        words = set(prompt.lower().split())
        return sorted(found, key=lambda i: (-_likeness(i, words), _tiebreak(prompt, i)))
    return found


def _passes(image: MockImage, body: Mapping[str, Any]) -> bool:
    if "tag" in body and body["tag"] not in image.tags:
        return False
    if "class_name" in body and body["class_name"] not in image.class_names:
        return False
    if body.get("batch") is True and image.batch is None:
        return False
    return "batch_id" not in body or image.batch == body["batch_id"]


def _likeness(image: MockImage, words: set[str]) -> int:
    """How many of `words` the image's tags, classes and name carry."""
    own = {w.lower() for w in image.tags + image.class_names}
    own.update(image.name.lower().replace(".", " ").replace("-", " ").split())
    return len(own & {w.lower() for w in words})


def _tiebreak(query: str, image: MockImage) -> str:
    return hashlib.sha256(f"{query}\0{image.id}".encode()).hexdigest()


def _result(image: MockImage, workspace: str, fields: list[str] | None) -> dict[str, Any]:
    """One result as the documented example shows it, cut to the requested fields."""
    full: dict[str, Any] = {
        "id": image.id,
        "name": image.name,
        "owner": workspace,
        "split": image.split,
        "annotations": {
            "count": len(image.class_names),
            "classes": {name: 1 for name in image.class_names},
        },
        "labels": [],
        "tags": list(image.tags),
    }
    if fields is None:
        return full
    return {key: value for key, value in full.items() if key in fields}


_SEARCH_FAULTS = frozenset({"429", "500", "502", "503", "504", "drop", "malformed", "wrong_shape"})


def _search_fault(fault: str | None) -> str | None:
    """The drawn fault, if a search can meet it (image faults concern generations only)."""
    return fault if fault in _SEARCH_FAULTS else None


def _faulty(request: web.Request, fault: str, config: MockConfig) -> web.StreamResponse:
    """A search's own fault answers: its 429 is not the server's rate limit (it counts
    nowhere and announces no pause), and a 502 does not say ``retryable``."""
    if fault == "429":
        seconds = config.retry_after_s
        shown = str(int(seconds)) if seconds == int(seconds) else f"{seconds:.3f}"
        payload = {"error": {"message": "Rate limit reached, slow down."}}
        return web.json_response(payload, status=429, headers={"Retry-After": shown})
    if fault == "malformed":
        return web.Response(text='{"results": [{"id": ', content_type="application/json")
    if fault == "wrong_shape":
        return web.json_response({"status": "indexing", "message": "no results here"})
    if fault == "drop":
        return dropped(request)
    return roboflow_error(int(fault), "The server had an error, try again.")
