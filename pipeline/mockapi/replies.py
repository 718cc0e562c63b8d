"""The mock's error answers and the header values it writes, in the real APIs' forms.

Kept apart from the handlers so that the generation endpoints, the image URLs and the
fault injection answer a refused key, a 429 or a quota error the same way, so that
Roboflow's dataset and inference endpoints (upload, annotate, detect) turn a drawn fault
into the same answer (`fault_answer`), and so that ``Date``, ``Retry-After`` and OpenAI's
reset durations are formatted in one place.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import datetime, timezone

from aiohttp import web

__all__ = [
    "ROBOFLOW_FAULTS",
    "drop_connection",
    "error",
    "fault_answer",
    "format_duration",
    "format_seconds",
    "http_date",
    "insufficient_quota",
    "roboflow_error",
]

ROBOFLOW_FAULTS = frozenset(
    {"429", "500", "502", "503", "504", "drop", "malformed", "wrong_shape", "slow"}
)
"""The faults Roboflow's dataset and inference endpoints carry (the others are images')."""


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error answer with ``{"error": {"code", "message"}}``, as both APIs send."""
    payload = {"error": {"code": code, "message": message}}
    return web.json_response(payload, status=status, headers=headers)


def roboflow_error(status: int, message: str, **fields: str) -> web.Response:
    """Roboflow's error answer: ``{"error": {"message", ...fields}}``."""
    return web.json_response({"error": {"message": message, **fields}}, status=status)


def fault_answer(
    fault: str | None, *, too_many: Callable[[], web.Response], malformed: str
) -> web.Response | None:
    """What a Roboflow endpoint answers instead for a drawn `fault`, or None to go on.

    A 429 is `too_many()` (the server's, with its Retry-After); a 5xx says
    ``retryable`` for a 502, as Roboflow's does; ``malformed`` sends the `malformed` text
    as JSON; ``wrong_shape`` valid JSON of the wrong shape. None for no fault and for the
    ones the endpoint applies itself (``slow``, ``drop``) or cannot carry.
    """
    if fault == "429":
        return too_many()
    if fault in ("500", "502", "503", "504"):
        payload: dict[str, object] = {"error": {"message": "The server had an error, try again."}}
        if fault == "502":
            payload["retryable"] = True
        return web.json_response(payload, status=int(fault))
    if fault == "malformed":
        return web.Response(text=malformed, content_type="application/json")
    if fault == "wrong_shape":
        return web.json_response({"message": "queued"})
    return None


def insufficient_quota() -> web.Response:
    """OpenAI's answer when the account has no credit left: a 429 that waiting cannot fix."""
    payload = {
        "error": {
            "message": "You exceeded your current quota, please check your plan and "
            "billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    return web.json_response(payload, status=429)


def drop_connection(request: web.Request) -> None:
    """Close the socket with no answer: the client cannot know the image was generated."""
    transport = request.transport
    if transport is not None:
        transport.close()


def http_date(wall: float) -> str:
    """An HTTP date (RFC 9110 IMF-fixdate) of a POSIX time."""
    return email.utils.format_datetime(datetime.fromtimestamp(wall, timezone.utc), usegmt=True)


def format_seconds(seconds: float) -> str:
    """Retry-After seconds: an integer when whole, else up to millisecond precision."""
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def format_duration(seconds: float) -> str:
    """OpenAI-style reset duration: ``20ms`` below a second, else ``1.5s``."""
    if seconds < 1.0:
        return f"{max(round(seconds * 1000), 0)}ms"
    return format_seconds(round(seconds, 3)) + "s"
