"""Ask the API, before a run spends, whether it still serves the spec's models.

The packaged table (`pipeline.jobspec.catalog`) knows the shutdowns OpenAI had announced
when this synthaug was released; the API knows today's, and which models the key may
use. So a kind that `asks_models` (the registry) sends ``GET {base_url}/models/{model}``
once per model before the first generation, and:

- ``shutdown_date`` on or before the run's date: `SpecError` (exit 2), nothing sent;
- a 404 (``model_not_found``): `FatalError` (exit 3): the key cannot use the model;
- ``shutdown_date`` within `SHUTDOWN_WARNING_DAYS`: a warning in the log;
- any other status, a timeout or a network error: a warning, and the run goes on (the
  generation requests have their own retries and error advice; a restricted key may not
  be allowed to read models at all).

`judge` is the pure decision, so that every answer's meaning is tested without a network;
`synthaug models SPEC` shows the same answers (`ask_spec_api`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from .credentials import DIRECT, read_api_key, read_proxy_settings
from .errors import BackendError, FatalError
from .jobspec.catalog import SHUTDOWN_WARNING_DAYS, Catalog, default_catalog
from .jobspec.model import Spec

__all__ = [
    "ASK_TIMEOUT_S",
    "ModelAnswer",
    "ModelAsker",
    "Verdict",
    "ask_models",
    "ask_spec_api",
    "check_models",
    "judge",
    "raise_or_warn",
    "spec_models",
]

ASK_TIMEOUT_S = 30.0
"""Seconds one ``GET /models/{id}`` may take: a check, not worth a generation's wait."""
_MESSAGE_CHARS = 160

log = logging.getLogger(__name__)

Verdict = Literal["served", "shuts down soon", "shut down", "not available", "unknown"]


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """What the API said of one model, and what that means for a run."""

    model: str
    verdict: Verdict
    detail: str  # one line for the log, the error and `synthaug models`
    shutdown: dt.date | None = None
    status: int | None = None  # the HTTP status; None when no answer came

    def to_json(self) -> dict[str, Any]:
        """The answer as ``synthaug models --json`` prints it."""
        return {
            "model": self.model,
            "verdict": self.verdict,
            "shutdown_date": None if self.shutdown is None else self.shutdown.isoformat(),
            "status": self.status,
            "detail": self.detail,
        }


@runtime_checkable
class ModelAsker(Protocol):
    """A backend that can ask its API about a model (`OpenAIBackend.ask_model`)."""

    async def ask_model(self, model: str, *, timeout_s: float | None = None) -> tuple[int, Any]:
        """The HTTP status and parsed JSON of ``GET /models/{model}``."""
        ...


def spec_models(spec: Spec) -> dict[str, str]:
    """Each distinct model the spec's sources send, with the key path that sets it."""
    found: dict[str, str] = {}
    for index, source in enumerate(spec.sources):
        model = spec.source_params(source).get("model")
        if model is None or str(model) in found:
            continue
        own = getattr(source.params, "model", None) is not None
        found[str(model)] = f"sources[{index}].params.model" if own else "params.model"
    return found


def judge(
    model: str, status: int, payload: Any, today: dt.date, catalog: Catalog | None = None
) -> ModelAnswer:
    """What the answer (`status`, parsed `payload`) to ``GET /models/{model}`` means."""
    catalog = catalog or default_catalog()
    if status == 404:
        return ModelAnswer(
            model,
            "not available",
            f"the API key cannot use model {model}: GET /models/{model} answered 404 "
            f"({_error_code(payload) or 'not found'}): it is shut down, or not open to the "
            "key's organization or project",
            status=status,
        )
    if not 200 <= status < 300 or not isinstance(payload, Mapping):
        said = _error_message(payload)
        return ModelAnswer(
            model,
            "unknown",
            f"could not ask the API about model {model}: HTTP {status}"
            + (f" ({said})" if said else "")
            + "; going on",
            status=status,
        )
    return _judge_date(model, payload.get("shutdown_date"), status, today, catalog)


def _judge_date(
    model: str, value: object, status: int, today: dt.date, catalog: Catalog
) -> ModelAnswer:
    """The verdict of a model's ``shutdown_date`` on `today`."""
    if value is None:
        return ModelAnswer(model, "served", "the API serves it (no shutdown date)", None, status)
    shutdown = _date(value)
    if shutdown is None:
        return ModelAnswer(
            model,
            "unknown",
            f"the API answered an unreadable shutdown_date {str(value)[:40]!r} for model "
            f"{model}; going on",
            status=status,
        )
    days = (shutdown - today).days
    instead = _replacement(model, today, catalog)
    if days <= 0:
        detail = f"the API says {model} was shut down on {shutdown.isoformat()}: {instead}"
        return ModelAnswer(model, "shut down", detail, shutdown, status)
    if days <= SHUTDOWN_WARNING_DAYS:
        when = "tomorrow" if days == 1 else f"in {days} days"
        detail = f"the API says {model} shuts down {when} ({shutdown.isoformat()}): {instead}"
        return ModelAnswer(model, "shuts down soon", detail, shutdown, status)
    detail = f"the API serves it; its shutdown is announced for {shutdown.isoformat()}"
    return ModelAnswer(model, "served", detail, shutdown, status)


def _date(value: object) -> dt.date | None:
    """``YYYY-MM-DD`` (or a full ISO timestamp, or Unix seconds) as a date; None if not."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, dt.timezone.utc).date()
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value[:10])
        except ValueError:
            return None
    return None


def _replacement(model: str, today: dt.date, catalog: Catalog) -> str:
    """``use X`` from the catalog: the model's named replacements, else a current model."""
    known = catalog.get(model)
    if known is not None and known.replacements:
        return catalog.replacement_text(known, today)
    others = [m.name for m in catalog.current(today) if m.name != model and m.shutdown is None]
    return f"use {others[0]} (see `synthaug models`)" if others else "see `synthaug models`"


def _error_message(payload: Any) -> str:
    """The ``error.message`` of an OpenAI error answer, shortened; "" without one."""
    error = payload.get("error") if isinstance(payload, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else None
    if not isinstance(message, str):
        return ""
    flat = " ".join(message.split())
    return flat if len(flat) <= _MESSAGE_CHARS else flat[: _MESSAGE_CHARS - 1] + "…"


def _error_code(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, Mapping) else None
    code = error.get("code") if isinstance(error, Mapping) else None
    return code if isinstance(code, str) else ""


async def ask_models(asker: ModelAsker, models: Iterable[str], today: dt.date) -> list[ModelAnswer]:
    """Ask about each model once, in turn; a failed request is an ``unknown`` answer."""
    answers = []
    for model in models:
        try:
            status, payload = await asker.ask_model(model, timeout_s=ASK_TIMEOUT_S)
        except BackendError as error:
            answers.append(
                ModelAnswer(
                    model,
                    "unknown",
                    f"could not ask the API about model {model}: {error.message}; going on",
                )
            )
            continue
        answers.append(judge(model, status, payload, today))
    return answers


def raise_or_warn(spec: Spec, answers: Iterable[ModelAnswer]) -> None:
    """Stop the run for a model the API no longer serves to this key; log the rest."""
    paths = spec_models(spec)
    for answer in answers:
        if answer.verdict == "shut down":
            key_path = paths.get(answer.model, "params.model")
            raise spec.error(key_path, answer.detail, value=answer.model)
        if answer.verdict == "not available":
            raise FatalError(
                f"{answer.detail} (see `synthaug models`)",
                kind="http_status",
                status=answer.status,
            )
        if answer.verdict in ("shuts down soon", "unknown"):
            log.warning("%s", answer.detail)
        else:
            log.debug("model %s: %s", answer.model, answer.detail)


async def check_models(spec: Spec, backend: object) -> list[ModelAnswer]:
    """Before a run of a kind that `asks_models` spends: ask about the spec's models
    through its open `backend` and stop or warn (`raise_or_warn`). A backend that
    cannot ask (one a test passed in) is not asked."""
    if not spec.backend.registered.asks_models:
        return []
    models = list(spec_models(spec))
    if not isinstance(backend, ModelAsker) or not models:
        return []
    answers = await ask_models(backend, models, spec.today)
    raise_or_warn(spec, answers)
    return answers


async def ask_spec_api(spec: Spec) -> list[ModelAnswer] | None:
    """For ``synthaug models SPEC``: what the API says of the spec's models, through a
    client of the spec's kind opened for this; None for a kind that does not ask.

    Needs the key (`CredentialsError` without it); sends nothing but the questions.
    """
    kind = spec.backend.registered
    if not kind.asks_models:
        return None
    api_key = read_api_key(spec.backend)
    proxies = read_proxy_settings() if kind.proxied else DIRECT
    async with kind.open_single(
        spec.backend.base_url, api_key, timeout_s=spec.backend.timeout_s, proxies=proxies
    ) as backend:
        return await ask_models(backend, spec_models(spec), spec.today)
