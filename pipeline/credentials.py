"""API keys and proxies come from environment variables: the one place env is read.

Each backend names its key's variable (``backend.api_key_env``); a missing key fails
before anything is sent, with a message that names the exact command to fix it. The
proxy variables (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``) are read here too, once
per run, so the HTTP client never looks at the environment (nor at ``~/.netrc``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import CredentialsError
from .jobspec.fields import SHARD_FIELD
from .jobspec.model import BackendSettings, BalanceSettings
from .jobspec.stage_settings import LabelSettings, UploadSettings
from .shard import Shard

__all__ = [
    "DIRECT",
    "ProxySettings",
    "balance_from_backend",
    "bypasses_proxy",
    "key_env_name",
    "labels_from_backend",
    "per_shard_key",
    "read_api_key",
    "read_balance_key",
    "read_label_key",
    "read_proxy_settings",
    "read_upload_key",
    "uploads_to_backend",
]


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The proxy for each URL scheme and the hosts exempt from them (``NO_PROXY``).

    The proxy URLs may carry credentials (``http://user:password@proxy:3128``), so
    they stay out of the repr.
    """

    http: str | None = field(default=None, repr=False)
    https: str | None = field(default=None, repr=False)
    no_proxy: str = ""

    def proxy_for(self, scheme: str, host: str) -> str | None:
        """The proxy URL a request to `scheme`://`host` goes through, or None for direct."""
        proxy = {"http": self.http, "https": self.https}.get(scheme.lower())
        if proxy is None or bypasses_proxy(host, self.no_proxy):
            return None
        return proxy


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Whether NO_PROXY exempts `host`, read as curl reads it.

    Entries are separated by commas or spaces: ``*`` (every host), a host name or domain
    (``example.com`` also covers ``api.example.com``; a leading dot changes nothing), an
    IP address, or an IP network in CIDR form (``10.0.0.0/8``).
    """
    host = host.strip("[]").rstrip(".").lower()
    address = _ip(host)
    for entry in no_proxy.replace(",", " ").lower().split():
        if entry == "*":
            return True
        name = entry.strip("[]").lstrip(".").rstrip(".")
        if address is not None and "/" in name:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                continue
        elif host == name or host.endswith("." + name):
            return True
    return False


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


DIRECT = ProxySettings()
"""No proxy at all: what the embedded mock uses, whatever the environment says."""


def read_api_key(
    backend: BackendSettings, environ: Mapping[str, str] = os.environ, *, shard: Shard | None = None
) -> str:
    """The API key for `backend`, read from its variable; "" for a kind that needs none.

    A variable named with ``{shard}`` is the shard's own (``--shard 2/4`` reads
    ``OPENAI_API_KEY_2`` for ``OPENAI_API_KEY_{shard}``). Raises `CredentialsError` when
    the variable is unset or blank, or names a shard's key and no shard was given.
    """
    if not backend.registered.needs_key:
        return ""
    return _read_key(
        key_env_name(backend, shard),
        f"the {backend.kind} backend reads its API key from it",
        "backend.api_key_env to another variable, or use backend.kind: mock to rehearse "
        "without a key",
        environ,
    )


def key_env_name(backend: BackendSettings, shard: Shard | None) -> str:
    """The variable `backend`'s key is read from, for `shard` (see `read_api_key`)."""
    name = backend.api_key_env
    if not per_shard_key(backend):
        return name
    if shard is None:
        raise CredentialsError(
            f"backend.api_key_env is {name}: one key per shard. Fix: run with --shard I/N "
            f"(shard I reads {name.replace(SHARD_FIELD, 'I')}), or name one variable"
        )
    return name.replace(SHARD_FIELD, str(shard.index))


def per_shard_key(backend: BackendSettings) -> bool:
    """Whether each shard reads its own key (``{shard}`` in ``backend.api_key_env``): then
    each shard paces its own quota, shared with no sibling."""
    return SHARD_FIELD in backend.api_key_env


def _read_key(name: str, who: str, instead: str, environ: Mapping[str, str]) -> str:
    """The stripped value of variable `name`; `CredentialsError` saying how to set it
    when it is unset or blank (`who` reads it; `instead`: the other way to fix it)."""
    key = environ.get(name, "").strip()
    if not key:
        state = "is empty" if name in environ else "is not set"
        raise CredentialsError(f"{name} {state}: {who}. Fix: export {name}=... (or set {instead})")
    return key


def uploads_to_backend(upload: UploadSettings, backend: BackendSettings) -> bool:
    """Whether the `upload:` block goes to the backend's own server (the embedded mock)."""
    return upload.base_url is None and backend.registered.serves_uploads


def balance_from_backend(balance: BalanceSettings, backend: BackendSettings) -> bool:
    """Whether a `roboflow_balance:` source asks the backend's own server (the embedded
    mock) for its class counts."""
    return balance.base_url is None and backend.registered.serves_uploads


def read_balance_key(
    balance: BalanceSettings, backend: BackendSettings, environ: Mapping[str, str] = os.environ
) -> str:
    """The Roboflow key a balance source reads its counts with; "" for the embedded mock.
    Raises `CredentialsError` when the variable is unset or blank."""
    if balance_from_backend(balance, backend):
        return ""
    return _read_key(
        balance.api_key_env,
        "a roboflow_balance source reads the project's class counts with it",
        "roboflow_balance.api_key_env to another variable",
        environ,
    )


def labels_from_backend(label: LabelSettings, backend: BackendSettings) -> bool:
    """Whether the `label:` block asks the backend's own server (the embedded mock)."""
    return label.api_url is None and backend.registered.serves_uploads


def read_label_key(
    label: LabelSettings | None,
    backend: BackendSettings,
    environ: Mapping[str, str] = os.environ,
) -> str:
    """The Roboflow key the `label:` block sends; "" when there is none or it asks the
    embedded mock. Raises `CredentialsError` when the variable is unset or blank."""
    if label is None or labels_from_backend(label, backend):
        return ""
    return _read_key(
        label.api_key_env,
        "the label: block reads the Roboflow API key from it",
        "label.api_key_env to another variable",
        environ,
    )


def read_upload_key(
    upload: UploadSettings | None,
    backend: BackendSettings,
    environ: Mapping[str, str] = os.environ,
) -> str:
    """The Roboflow key the `upload:` block sends; "" when there is no upload block or it
    goes to the embedded mock. Raises `CredentialsError` when the variable is unset or
    blank, before anything is sent."""
    if upload is None or uploads_to_backend(upload, backend):
        return ""
    return _read_key(
        upload.api_key_env,
        "the upload: block reads the Roboflow API key from it",
        "upload.api_key_env to another variable",
        environ,
    )


def read_proxy_settings(environ: Mapping[str, str] = os.environ) -> ProxySettings:
    """The proxies named by the environment, read as curl and Python's urllib read them.

    The lower-case variable wins over the upper-case one; an empty one means none. As in
    urllib, ``HTTP_PROXY`` is ignored under CGI (``REQUEST_METHOD`` set: "httpoxy").
    Raises `CredentialsError` for a value that is not a proxy URL, without echoing it
    (it may hold a password).
    """
    cgi = "REQUEST_METHOD" in environ
    return ProxySettings(
        http=_proxy_url(environ, "http_proxy", upper_case=not cgi),
        https=_proxy_url(environ, "https_proxy"),
        no_proxy=_proxy_variable(environ, "no_proxy") or "",
    )


def _proxy_variable(environ: Mapping[str, str], name: str, *, upper_case: bool = True) -> str:
    """The value of `name` (lower case) or else its upper-case form, stripped."""
    if name in environ:
        return environ[name].strip()
    return environ.get(name.upper(), "").strip() if upper_case else ""


def _proxy_url(environ: Mapping[str, str], name: str, *, upper_case: bool = True) -> str | None:
    """A proxy URL with its scheme (``proxy:3128`` means ``http://proxy:3128``), or None."""
    value = _proxy_variable(environ, name, upper_case=upper_case)
    if not value:
        return None
    url = value if "://" in value else f"http://{value}"
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        usable = False
    if not usable:
        shown = name if name in environ else name.upper()
        raise CredentialsError(
            f"{shown} is not a proxy URL synthaug can use: set it to "
            "http://[user:password@]host:port (or unset it to connect directly)"
        )
    return url
