"""`ClientOptions`: the keywords every API client's constructor takes, declared once.

The registry builds a client as ``cls(base_url, api_key, concurrency=..., timeout_s=...,
proxies=...)`` (tests add ``clock=``), and the upload stage builds its client the same
way. Each client takes them as ``**options: Unpack[ClientOptions]`` and hands them on to
its `ApiClient` (`pipeline.backends.http`) as they came, so the keyword list is not
copied into every constructor while the call sites still name each keyword, checked by
mypy.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypedDict

from ..credentials import ProxySettings

__all__ = ["ClientOptions"]


class _ClientNeeds(TypedDict):
    concurrency: int
    timeout_s: float


class ClientOptions(_ClientNeeds, total=False):
    """``concurrency`` and ``timeout_s``, and optionally ``clock`` and ``proxies``
    (`ApiClient`'s defaults: UTC now, no proxy)."""

    clock: Callable[[], datetime]
    proxies: ProxySettings
