"""Proxies: HTTP(S)_PROXY and NO_PROXY are honoured, ~/.netrc never is, the mock stays direct.

A small forward proxy on 127.0.0.1 records every request line it forwards, so the tests
see exactly which requests went through it and with which headers.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from checks import run_spec, write_job_spec
from yarl import URL

from pipeline.backends.roboflow import RoboflowBackend
from pipeline.credentials import ProxySettings, bypasses_proxy, read_proxy_settings
from pipeline.errors import CredentialsError, TransientError
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.records import WorkItem

KEY = "sk-test-proxy-4b8e"
NETRC_USER, NETRC_SECRET = "netrc-user", "netrc-secret-9d2c"
PROXY_USER, PROXY_SECRET = "proxy-user", "proxy-secret-51fa"
# headers a proxy consumes rather than forwards
HOP_BY_HOP = frozenset(
    {"host", "connection", "proxy-connection", "proxy-authorization", "keep-alive"}
)


@dataclass(frozen=True)
class Forwarded:
    """One request as the proxy received it: method, request-target, headers."""

    method: str
    target: str
    headers: dict[str, str]


class ForwardProxy:
    """A plain-HTTP forward proxy on 127.0.0.1; with `refuse`, it answers 407 to all."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.seen: list[Forwarded] = []
        self._refuse = refuse
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port = 0

    def url(self, userinfo: str = "") -> str:
        """The proxy's URL as a user would write it in HTTP_PROXY."""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    async def __aenter__(self) -> ForwardProxy:
        self._client = aiohttp.ClientSession(trust_env=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        assert self._client is not None
        await self._runner.cleanup()
        await self._client.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Forwarded(request.method, request.raw_path, dict(request.headers)))
        if self._refuse:
            return web.Response(status=407, headers={"Proxy-Authenticate": 'Basic realm="t"'})
        if not request.raw_path.startswith("http://"):
            return web.Response(status=400, text="a forward proxy wants an absolute URL")
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._client.request(
            request.method,
            URL(request.raw_path, encoded=True),
            headers=headers,
            data=await request.read(),
        ) as upstream:
            body = await upstream.read()
            kept = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() in ("content-type", "retry-after", "date")
            }
            return web.Response(status=upstream.status, body=body, headers=kept)

    def targets(self, method: str) -> list[str]:
        """The request-targets of the forwarded requests with `method`."""
        return [f.target for f in self.seen if f.method == method]


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    """A recording forward proxy on a free loopback port."""
    async with ForwardProxy() as running:
        yield running


@pytest_asyncio.fixture
async def api() -> AsyncIterator[MockServer]:
    """The project's mock API on loopback, answering with image URLs to download."""
    async with MockServer(MockConfig()) as server:
        yield server


@pytest.fixture
def proxy_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set the proxy variables, with a key and a HOME whose ~/.netrc names 127.0.0.1."""
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login {NETRC_USER} password {NETRC_SECRET}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)

    def set_env(http_proxy: str, no_proxy: str | None = None) -> None:
        monkeypatch.setenv("HTTP_PROXY", http_proxy)
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        if no_proxy is not None:
            monkeypatch.setenv("NO_PROXY", no_proxy)

    return set_env


def write_spec(folder: Path, base_url: str) -> Path:
    """A roboflow-kind job of three prompts against `base_url`."""
    return write_job_spec(folder, base_url, prompts=3, max_attempts=2)


def out_text(out: Path) -> str:
    """Every text file the run left in OUT, concatenated (manifest, job.json, summary)."""
    return "".join(
        path.read_text(errors="replace")
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.suffix in (".json", ".jsonl", ".html", ".txt")
    )


async def test_every_post_and_download_goes_through_http_proxy(
    tmp_path: Path, proxy: ForwardProxy, api: MockServer, proxy_env: Callable[..., None]
) -> None:
    """With HTTP_PROXY set, every POST and every image GET of a run goes through the proxy."""
    proxy_env(proxy.url())
    result = await run_spec(write_spec(tmp_path, api.base_url))
    assert result.exit_code == 0
    posts, gets = proxy.targets("POST"), proxy.targets("GET")
    assert len(posts) == api.stats.requests == 3
    assert all(t.startswith(f"{api.base_url}/synthetic-image?api_key=") for t in posts)
    assert len(gets) == 3
    assert all(t.startswith(f"{api.base_url}/images/") for t in gets)


async def test_netrc_credentials_are_never_sent(
    tmp_path: Path, proxy: ForwardProxy, api: MockServer, proxy_env: Callable[..., None]
) -> None:
    """A ~/.netrc naming the API's and the proxy's host adds no Authorization to any request."""
    proxy_env(proxy.url())
    await run_spec(write_spec(tmp_path, api.base_url))
    netrc_basic = base64.b64encode(f"{NETRC_USER}:{NETRC_SECRET}".encode()).decode()
    assert proxy.seen
    for forwarded in proxy.seen:
        names = {name.lower() for name in forwarded.headers}
        assert not names & {"authorization", "proxy-authorization"}
        assert netrc_basic not in json.dumps(forwarded.headers)


async def test_proxy_credentials_reach_the_proxy_and_no_log_or_file(
    tmp_path: Path,
    proxy: ForwardProxy,
    api: MockServer,
    proxy_env: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """user:pass in HTTP_PROXY authenticate to the proxy; the password is in no log or file."""
    caplog.set_level(logging.DEBUG)
    proxy_env(proxy.url(f"{PROXY_USER}:{PROXY_SECRET}@"))
    path = write_spec(tmp_path, api.base_url)
    result = await run_spec(path)
    assert result.exit_code == 0
    expected = "Basic " + base64.b64encode(f"{PROXY_USER}:{PROXY_SECRET}".encode()).decode()
    assert proxy.seen
    assert all(f.headers.get("Proxy-Authorization") == expected for f in proxy.seen)
    assert "through the proxy 127.0.0.1" in caplog.text  # the proxy is named, not its secret
    assert PROXY_SECRET not in caplog.text
    assert PROXY_SECRET not in out_text(path.parent / "out")


async def test_no_proxy_sends_loopback_direct(
    tmp_path: Path, proxy: ForwardProxy, api: MockServer, proxy_env: Callable[..., None]
) -> None:
    """NO_PROXY=127.0.0.1 sends nothing through the proxy; the run still completes."""
    proxy_env(proxy.url(), no_proxy="127.0.0.1")
    result = await run_spec(write_spec(tmp_path, api.base_url))
    assert result.exit_code == 0
    assert api.stats.requests == 3
    assert proxy.seen == []


async def test_embedded_mock_never_uses_the_proxy(
    spec_factory: Callable[..., Path], proxy: ForwardProxy, proxy_env: Callable[..., None]
) -> None:
    """backend.kind: mock talks to its own loopback server directly, whatever HTTP_PROXY says."""
    proxy_env(proxy.url())
    result = await run_spec(spec_factory(output_dir="out"))
    assert result.exit_code == 0
    assert result.summary["ok"] == 1
    assert proxy.seen == []


async def test_proxy_407_aborts_with_a_fix_and_no_password(
    tmp_path: Path, api: MockServer, proxy_env: Callable[..., None]
) -> None:
    """A proxy refusing the credentials (407) stops the run (exit 3) naming the variable."""
    async with ForwardProxy(refuse=True) as refusing:
        proxy_env(refusing.url(f"{PROXY_USER}:{PROXY_SECRET}@"))
        result = await run_spec(write_spec(tmp_path, api.base_url))
    assert result.exit_code == 3
    assert result.message is not None
    assert "407" in result.message
    assert "HTTP_PROXY" in result.message
    assert f"127.0.0.1:{refusing.port}" in result.message
    assert PROXY_SECRET not in result.message
    assert api.stats.requests == 0


async def test_unreachable_proxy_names_it_without_its_password() -> None:
    """A proxy nobody listens on fails as a retryable connection error naming host:port only."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        settings = ProxySettings(http=f"http://{PROXY_USER}:{PROXY_SECRET}@127.0.0.1:{port}")
        item = WorkItem(key="f" * 64, source="s", prompt="p", project_url="p", params={})
        async with RoboflowBackend(
            "http://api.example.test", KEY, concurrency=1, timeout_s=5, proxies=settings
        ) as backend:
            with pytest.raises(TransientError) as caught:
                await backend.generate(item, None)
    assert f"proxy 127.0.0.1:{port}" in caught.value.message
    assert PROXY_SECRET not in str(caught.value)
    assert caught.value.kind == "connection"


@pytest.mark.parametrize(
    ("environ", "http", "https", "no_proxy"),
    [
        pytest.param({"HTTP_PROXY": "proxy:3128"}, "http://proxy:3128", None, "", id="no-scheme"),
        pytest.param(
            {"HTTPS_PROXY": "http://a:1", "https_proxy": "http://b:2"},
            None,
            "http://b:2",
            "",
            id="lower-case-wins",
        ),
        pytest.param(
            {"HTTPS_PROXY": "http://a:1", "https_proxy": ""},
            None,
            None,
            "",
            id="empty-lower-unsets",
        ),
        pytest.param(
            {"HTTP_PROXY": "http://a:1", "REQUEST_METHOD": "GET"}, None, None, "", id="cgi-httpoxy"
        ),
        pytest.param({"no_proxy": " .corp, 10.0.0.0/8 "}, None, None, ".corp, 10.0.0.0/8", id="no"),
    ],
)
def test_proxy_variables_are_read_as_curl_reads_them(
    environ: dict[str, str], http: str | None, https: str | None, no_proxy: str
) -> None:
    """Lower case wins, a missing scheme means http://, HTTP_PROXY is ignored under CGI."""
    settings = read_proxy_settings(environ)
    assert (settings.http, settings.https, settings.no_proxy) == (http, https, no_proxy)


def test_bad_proxy_variable_is_named_without_its_value() -> None:
    """An unusable proxy URL fails before anything is sent, naming the variable, not its value."""
    with pytest.raises(CredentialsError) as caught:
        read_proxy_settings({"HTTPS_PROXY": f"ftp://u:{PROXY_SECRET}@proxy:21"})
    assert "HTTPS_PROXY" in str(caught.value)
    assert PROXY_SECRET not in str(caught.value)
    assert PROXY_SECRET not in repr(read_proxy_settings({"HTTPS_PROXY": f"u:{PROXY_SECRET}@p:1"}))


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypass"),
    [
        pytest.param("127.0.0.1", "127.0.0.1", True, id="ip"),
        pytest.param("api.roboflow.com", "roboflow.com", True, id="domain-suffix"),
        pytest.param("api.roboflow.com", ".roboflow.com", True, id="leading-dot"),
        pytest.param("notroboflow.com", "roboflow.com", False, id="not-a-suffix"),
        pytest.param("10.2.3.4", "localhost, 10.0.0.0/8", True, id="cidr"),
        pytest.param("::1", "[::1]", True, id="ipv6"),
        pytest.param("anything", "*", True, id="star"),
        pytest.param("api.roboflow.com", "", False, id="empty"),
    ],
)
def test_no_proxy_matching(host: str, no_proxy: str, bypass: bool) -> None:
    """NO_PROXY entries match hosts, domain suffixes, IPs and CIDR networks, as in curl."""
    assert bypasses_proxy(host, no_proxy) is bypass
