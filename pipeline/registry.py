"""The backend registry: each kind of image API synthaug can call, and what it needs.

The one place a kind is described: whether it needs a key, whether its images cost
money, whether it needs a Roboflow project, its default pace, whether it may go through
a proxy, and the class that talks to it. The class is named, not imported: a run opens
it through `open_backend_class` (or, for one question outside a run, `open_single`), so
a run against the real API never loads the mock server (aiohttp.web and Pillow's drawing
are a measurable share of a short run's CPU).
No other module tests a kind by its name.

A backend class is built as ``cls(base_url, api_key, concurrency=..., timeout_s=...,
proxies=...)`` and used as an async context manager that yields the `Backend`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BACKENDS", "DEFAULT_KIND", "DEFAULT_RATE_LIMIT", "BackendKind", "backend_kind"]

DEFAULT_RATE_LIMIT = "5/min"  # OpenAI's Tier-1 image limit: safe for a first real run


@dataclass(frozen=True, slots=True)
class BackendKind:
    """What one kind of backend is: its needs, its defaults and its class."""

    name: str
    summary: str
    backend_class: str  # "module:Class" within this package, imported when a run opens it
    needs_key: bool = True
    priced: bool = True  # False: rehearsals, which cost nothing
    needs_project: bool = False  # True: the spec must name project_url
    default_rate_limit: str | None = DEFAULT_RATE_LIMIT
    proxied: bool = True  # False: always connect directly (a loopback server of our own)
    base_url: str = "https://api.roboflow.com"  # backend.base_url when the spec sets none
    api_key_env: str = "ROBOFLOW_API_KEY"  # backend.api_key_env when the spec sets none
    project_in_body: bool = True  # False: the request body (and so the key) has no project_url
    # False: Roboflow's own inputs and parameters (roboflow_ids, unmodified_prompt,
    # force_caption_regenerate) are spec errors for this kind: its API would refuse them
    roboflow_extras: bool = True
    # True: the kind serves Roboflow's upload, annotate and detection endpoints itself (the
    # embedded mock), so an `upload:` block without base_url, or a `label:` block without
    # api_url, goes there, with no key
    serves_uploads: bool = False
    # "module:Class" for ``backend.mode: batch`` (OpenAI's Batch API), built with the
    # common signature plus ``batch=BatchOptions``; None: the kind has no batch mode
    batch_class: str | None = None
    # True: the API runs inside this process (the embedded mock) and forgets everything,
    # its batches too, when the run ends
    in_process: bool = False
    # True: an edit may carry a source's `mask:` (OpenAI's edits take one; Roboflow's
    # endpoint has no such field, so a mask is a spec error for it)
    takes_mask: bool = False
    # True: before the first generation a run asks ``GET {base_url}/models/{model}`` for
    # each model the spec uses (the backend class has `ask_model`): a model shut down or
    # not open to the key stops the run before it spends (`pipeline.model_check`)
    asks_models: bool = False

    def provides_batch_control(self, mode: str) -> bool:
        """Whether the backend a run opens in `mode` (``backend.mode``) is a Batch API
        client (`pipeline.backends.base.BatchControl`): batch mode of a kind that has one."""
        return mode == "batch" and self.batch_class is not None

    def open_backend_class(self, *, batch: bool = False) -> type:
        """The class that talks to this kind of API (imported now); with `batch`, the
        one that sends through the Batch API."""
        named = self.batch_class if batch else self.backend_class
        assert named is not None, f"{self.name} has no batch mode"
        module, _, name = named.partition(":")
        cls = getattr(importlib.import_module(f".{module}", __package__), name)
        assert isinstance(cls, type), named
        return cls

    @contextlib.asynccontextmanager
    async def open_single(
        self, base_url: str, api_key: str, *, timeout_s: float, proxies: object
    ) -> AsyncIterator[Any]:
        """A client of this kind for a question outside a run (``synthaug models``,
        ``plan --resolve``): one connection, open for the ``async with``, closed after.

        Its class is imported in a thread: the first import (aiohttp's) takes about
        100 ms, which must not hold the event loop."""
        import asyncio  # here, not at the top: `synthaug status` imports this module

        backend_class = await asyncio.to_thread(self.open_backend_class)
        async with backend_class(
            base_url, api_key, concurrency=1, timeout_s=timeout_s, proxies=proxies
        ) as backend:
            yield backend


BACKENDS: Mapping[str, BackendKind] = {
    kind.name: kind
    for kind in (
        BackendKind(
            "roboflow",
            "Roboflow's POST /synthetic-image (OpenAI image models behind it)",
            "backends.roboflow:RoboflowBackend",
            needs_project=True,
        ),
        BackendKind(
            "openai",
            "OpenAI's POST /images/generations and /images/edits, called directly",
            "backends.openai:OpenAIBackend",
            base_url="https://api.openai.com/v1",
            api_key_env="OPENAI_API_KEY",
            project_in_body=False,
            roboflow_extras=False,
            batch_class="backends.openai_batch:BatchBackend",
            takes_mask=True,
            asks_models=True,
        ),
        BackendKind(
            "mock",
            "the embedded mock API on a loopback port: no key, no network, no spend",
            "backends.embedded:MockBackend",
            needs_key=False,
            priced=False,
            default_rate_limit=None,
            proxied=False,
            serves_uploads=True,
            batch_class="backends.embedded:MockBackend",
            in_process=True,
            takes_mask=True,
        ),
    )
}
"""Every kind a spec may name, by name."""

DEFAULT_KIND = "roboflow"


def backend_kind(name: str) -> BackendKind:
    """The registered kind called `name`; ValueError naming the kinds there are."""
    try:
        return BACKENDS[name]
    except KeyError:
        names = [repr(kind) for kind in BACKENDS]
        known = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
        raise ValueError(f"expected {known}, got {name!r}") from None
