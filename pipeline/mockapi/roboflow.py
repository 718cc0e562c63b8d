"""What the mock's Roboflow endpoints share: one server's state and the checks every one
of them makes before its own work.

Roboflow's search, upload, annotation, read-back, detection and project endpoints all
check the ``api_key`` query parameter (401) and the project (404) the same way, and all
but search turn a drawn fault into the same answer (429 with Retry-After, 5xx, malformed
or wrong-shaped JSON) or into a slow or dropped one. Writing those steps once keeps the
endpoints answering alike, and lets the server build one `MockRoboflow` and hand it to
every handler instead of six arguments each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from .config import MockConfig, MockStats
from .dataset import MockDataset
from .faults import MockFaults
from .replies import ROBOFLOW_FAULTS, drop_connection, fault_answer, roboflow_error

__all__ = ["DrawnFault", "MockRoboflow", "dropped"]


@dataclass(frozen=True, slots=True)
class DrawnFault:
    """The fault a request met: its `kind` (None: none), and the `answer` to send instead
    (None: go on; a ``drop`` is the handler's to apply, after its work)."""

    kind: str | None
    answer: web.Response | None = None

    @property
    def drops(self) -> bool:
        """The work is done, but the client must never hear of it."""
        return self.kind == "drop"


@dataclass(frozen=True, slots=True)
class MockRoboflow:
    """One server's Roboflow side: its settings, counters, projects' images, faults and
    class counts (read through `class_counts`, so the server can change them)."""

    config: MockConfig
    stats: MockStats
    dataset: MockDataset
    faults: MockFaults
    class_counts: Callable[[], Mapping[str, int]]

    def refused_key(self, request: web.Request) -> web.Response | None:
        """The 401 for a request whose ``api_key`` the mock does not accept (counted)."""
        if self.config.accepts_key(request.query.get("api_key", "")):
            return None
        self.stats.unauthorized += 1
        return roboflow_error(401, "Unauthorized: invalid api_key.")

    def unknown_project(self, project: str, shown: str | None = None) -> web.Response | None:
        """The 404 for a project the mock is not set to serve (counted); `shown` is the
        name the message gives (default: `project`)."""
        projects = self.config.projects
        if projects is None or project in projects:
            return None
        self.stats.unknown_project += 1
        return roboflow_error(404, f"Project {shown or project} not found.")

    def refused(self, request: web.Request) -> web.Response | None:
        """The 401 of `refused_key`, else the 404 of the path's project, else None."""
        refusal = self.refused_key(request)
        if refusal is not None:
            return refusal
        return self.unknown_project(request.match_info["project"])

    async def fault(self, malformed: str) -> DrawnFault:
        """Draw this request's fault: the answer that replaces a 429, 5xx, malformed
        (`malformed`, sent as JSON) or wrong-shaped one; otherwise, after the latency
        (and a ``slow`` fault's on top), the fault to go on with."""
        drawn = self.faults.draw()
        kind = drawn if drawn in ROBOFLOW_FAULTS else None
        answer = fault_answer(kind, too_many=self._too_many, malformed=malformed)
        if answer is not None:
            return DrawnFault(kind, answer)
        slow_s = self.config.slow_s if kind == "slow" else 0.0
        await self.faults.pause(self.config.latency_s + slow_s)
        return DrawnFault(kind)

    def _too_many(self) -> web.Response:
        """The server's 429, whose Retry-After announces a pause from now."""
        now = asyncio.get_running_loop().time()
        return self.faults.rate_limited(self.config.retry_after_s, now)


def dropped(request: web.Request) -> web.Response:
    """Close the connection unanswered: done (stored, billed), but the client never hears."""
    drop_connection(request)
    return web.Response(status=500)
