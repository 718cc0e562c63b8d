"""The mock's error answers and the header values it writes, in the real APIs' forms.

Kept apart from the handlers so that the generation endpoints, the image URLs and the
fault injection answer a refused key, a 429 or a quota error the same way, and so that
``Date``, ``Retry-After`` and OpenAI's reset durations are formatted in one place.
"""

from __future__ import annotations

import email.utils
from datetime import datetime, timezone

from aiohttp import web

__all__ = [
    "drop_connection",
    "error",
    "format_duration",
    "format_seconds",
    "http_date",
    "insufficient_quota",
]


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error answer with ``{"error": {"code", "message"}}``, as both APIs send."""
    payload = {"error": {"code": code, "message": message}}
    return web.json_response(payload, status=status, headers=headers)


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
