"""The embedded mock of Roboflow's project endpoint: ``GET /{workspace}/{project}``.

A ``roboflow_balance`` source plans what a project lacks from the class counts this
endpoint reports, so a rehearsal needs it offline. It answers in Roboflow's documented
form, ``{"workspace": {"name", "url", "members"}, "project": {"id", "type", "name",
"created", "updated", "images", "unannotated", "annotation", "public", "splits",
"classes", "versions"}}``, with the server's current class counts (which a test can
change while the server runs, to prove a client reads them once). The project's images
are the sum of its counts, all annotated, split 70/20/10; its dates are fixed, so the
answer is the same every time. The key, the project and the fault injection are checked
as upload's are. The route takes two segments, so the server adds it last, and it never
takes the mock's own first segments (``v1``, ``images``, ``dataset``) for a workspace.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from aiohttp import web

from .roboflow import MockRoboflow, dropped

__all__ = [
    "CREATED",
    "OWN_SEGMENTS",
    "UPDATED",
    "add_project_route",
    "project_answer",
    "serve_project",
    "split_counts",
]

CREATED = 1_700_000_000.0
"""When every mock project was created (epoch seconds, as Roboflow sends them)."""
UPDATED = CREATED + 86_400.0
OWN_SEGMENTS = ("v1", "images", "dataset")
"""First path segments of the mock's other routes: never a workspace here."""
_NOT_OWN = "|".join(OWN_SEGMENTS)
_PATH = "/{workspace:(?!(?:" + _NOT_OWN + ")/)[^/]+}/{project}"


def add_project_route(application: web.Application, roboflow: MockRoboflow) -> None:
    """Serve ``GET /{workspace}/{project}``; add it after the other routes.

    Another method on two such segments answers 404, as it did before the route was
    there (not 405: it names no resource of the mock's).
    """
    application.router.add_get(_PATH, partial(serve_project, roboflow=roboflow))
    application.router.add_route("*", _PATH, _not_found)


async def serve_project(request: web.Request, *, roboflow: MockRoboflow) -> web.StreamResponse:
    """``GET /{workspace}/{project}``: key, project, fault, then the project."""
    roboflow.stats.project_requests += 1
    refusal = roboflow.refused(request)
    if refusal is not None:
        return refusal
    fault = await roboflow.fault(malformed='{"workspace": {"name": ')
    if fault.answer is not None:
        return fault.answer
    if fault.drops:  # the client never hears it
        return dropped(request)
    workspace, project = request.match_info["workspace"], request.match_info["project"]
    return web.json_response(project_answer(workspace, project, roboflow.class_counts()))


async def _not_found(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


def project_answer(workspace: str, project: str, classes: Mapping[str, int]) -> dict[str, Any]:
    """Roboflow's answer for a project whose annotated instances per class are `classes`."""
    images = sum(classes.values())
    return {
        "workspace": {"name": workspace, "url": workspace, "members": 1},
        "project": {
            "id": f"{workspace}/{project}",
            "type": "object-detection",
            "name": project,
            "created": CREATED,
            "updated": UPDATED,
            "images": images,
            "unannotated": 0,
            "annotation": project,
            "public": False,
            "splits": split_counts(images),
            "classes": dict(classes),
            "versions": [],
        },
    }


def split_counts(images: int) -> dict[str, int]:
    """`images` split 70/20/10 into train, valid and test (test takes the remainder)."""
    train, valid = images * 7 // 10, images * 2 // 10
    return {"train": train, "valid": valid, "test": images - train - valid}
