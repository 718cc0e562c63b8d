"""API keys come from environment variables, never from the spec: the one place env is read.

Each backend names its variable (``backend.api_key_env``); a missing key fails before
anything is sent, with a message that names the exact command to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pipeline.errors import CredentialsError
from pipeline.spec import BackendSettings

__all__ = ["read_api_key"]


def read_api_key(backend: BackendSettings, environ: Mapping[str, str] = os.environ) -> str:
    """The API key for `backend`, read from its variable; "" for the mock backend.

    Raises `CredentialsError` when the variable is unset or blank.
    """
    if backend.kind == "mock":
        return ""
    name = backend.api_key_env
    key = environ.get(name, "").strip()
    if not key:
        state = "is empty" if name in environ else "is not set"
        raise CredentialsError(
            f"{name} {state}: the {backend.kind} backend reads its API key from it. "
            f"Fix: export {name}=... (or set backend.api_key_env to another variable, "
            "or use backend.kind: mock to rehearse without a key)"
        )
    return key
