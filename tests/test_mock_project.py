"""The mock's Roboflow project endpoint, ``GET /{workspace}/{project}``: its answer and
class counts, the key and project checks, the fault injection, the routes it must not
take, and ``synthaug mock-server --project-classes``, over real loopback HTTP."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from checks import ThreadedMock
from multidict import CIMultiDictProxy

from pipeline.backends.roboflow_project import RoboflowProject
from pipeline.errors import EXIT_OK, EXIT_USAGE, FatalError
from pipeline.mockapi.config import DEFAULT_PROJECT_COUNTS, parse_project_classes
from pipeline.mockapi.project import split_counts
from pipeline.mockapi.replies import ROBOFLOW_FAULTS
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.retry import RetryPolicy

KEY = "mock-key"
Headers = CIMultiDictProxy[str]
DEFAULT_CLASSES = {"person": 12, "car": 8, "tree": 5, "leaf": 2, "dog": 0}


@dataclass(frozen=True)
class Api:
    """A running mock (key `KEY`) and a session to ask it as a client does."""

    server: MockServer
    session: aiohttp.ClientSession

    async def get(self, path: str = "chess/pieces", **query: str) -> tuple[int, Any, Headers]:
        """``GET /{path}?api_key=KEY``: the status, the JSON (or the text when it is not
        JSON) and the headers."""
        url = f"{self.server.base_url}/{path}"
        async with self.session.get(url, params={"api_key": KEY, **query}) as answer:
            text = await answer.text()
            try:
                return answer.status, json.loads(text), answer.headers
            except ValueError:
                return answer.status, text, answer.headers


@asynccontextmanager
async def serve(**config: Any) -> AsyncIterator[Api]:
    """The mock with `config` (and key `KEY`), served while the block runs."""
    async with (
        MockServer(MockConfig(api_key=KEY, **config)) as server,
        aiohttp.ClientSession() as session,
    ):
        yield Api(server, session)


# ---- the answer --------------------------------------------------------------------------------


async def test_the_answer_has_roboflows_shape() -> None:
    """The documented form: workspace, then the project with its id, counts and splits;
    by default the vocabulary's first five classes with `DEFAULT_PROJECT_COUNTS`."""
    async with serve() as api:
        status, payload, _ = await api.get()
    assert status == 200
    assert payload == {
        "workspace": {"name": "chess", "url": "chess", "members": 1},
        "project": {
            "id": "chess/pieces",
            "type": "object-detection",
            "name": "pieces",
            "created": 1_700_000_000.0,
            "updated": 1_700_086_400.0,
            "images": 27,
            "unannotated": 0,
            "annotation": "pieces",
            "public": False,
            "splits": {"train": 18, "valid": 5, "test": 4},
            "classes": DEFAULT_CLASSES,
            "versions": [],
        },
    }
    assert tuple(DEFAULT_CLASSES.values()) == DEFAULT_PROJECT_COUNTS


async def test_the_default_classes_are_drawn_and_detected() -> None:
    """The default counts name classes of the detection vocabulary, so a rehearsal's
    images show them; another vocabulary gives its own first classes."""
    config = MockConfig()
    assert set(config.class_counts()) <= set(config.detect_classes)
    async with serve(detect_classes=("gnome", "teapot")) as api:
        _, payload, _ = await api.get()
    assert payload["project"]["classes"] == {"gnome": 12, "teapot": 8}
    assert payload["project"]["images"] == 20


async def test_counts_come_from_the_config() -> None:
    """`MockConfig.project_classes` is what every project reports; images are their sum."""
    classes = {"white-queen": 7, "black-queen": 4, "black-pawn": 37}
    async with serve(project_classes=classes) as api:
        _, first, _ = await api.get("roboflow/chess-sample")
        _, second, _ = await api.get("other/leaves")
    assert first["project"]["classes"] == second["project"]["classes"] == classes
    assert first["project"]["images"] == 48
    assert sum(first["project"]["splits"].values()) == 48


@pytest.mark.parametrize("images", [0, 1, 2, 9, 10, 27, 1001])
def test_splits_add_up_to_the_images(images: int) -> None:
    """train, valid and test are 70/20/10 and sum to the project's images."""
    splits = split_counts(images)
    assert list(splits) == ["train", "valid", "test"]
    assert sum(splits.values()) == images
    assert min(splits.values()) >= 0


async def test_set_project_classes_changes_the_answer_while_serving() -> None:
    """`MockServer.set_project_classes` swaps the counts of a running server; it keeps a
    copy, and refuses what the config would."""
    async with serve(project_classes={"a": 1}) as api:
        _, before, _ = await api.get()
        changed = {"a": 3, "b": 0}
        api.server.set_project_classes(changed)
        changed["c"] = 9  # the caller's dict is not the server's
        _, after, _ = await api.get()
        with pytest.raises(ValueError, match="whole numbers"):
            api.server.set_project_classes({"a": -1})
        _, unchanged, _ = await api.get()
    assert before["project"]["classes"] == {"a": 1}
    assert after["project"]["classes"] == unchanged["project"]["classes"] == {"a": 3, "b": 0}
    assert api.server.project_classes == {"a": 3, "b": 0}
    assert api.server.stats.project_requests == 3


def test_set_project_classes_from_another_thread() -> None:
    """A `ThreadedMock`'s counts change from the test's thread between two reads."""

    def read(base_url: str) -> dict[str, int]:
        with urllib.request.urlopen(f"{base_url}/ws/p?api_key=any") as answer:
            classes: dict[str, int] = json.load(answer)["project"]["classes"]
        return classes

    with ThreadedMock(MockConfig(project_classes={"cat": 2})) as mock:
        before = read(mock.base_url)
        mock.server.set_project_classes({"cat": 5, "dog": 1})
        after = read(mock.base_url)
    assert (before, after) == ({"cat": 2}, {"cat": 5, "dog": 1})


async def test_the_real_client_reads_the_counts() -> None:
    """`RoboflowProject` (the balance source's client) reads the mock's counts as they are."""
    async with (
        serve(project_classes={"cat": 2, "dog": 0}) as api,
        RoboflowProject(
            api.server.base_url, KEY, timeout_s=5.0, policy=RetryPolicy(max_attempts=1)
        ) as client,
    ):
        counts = await client.class_counts("ws", "pets")
    assert counts == {"cat": 2, "dog": 0}


# ---- refusals and faults -----------------------------------------------------------------------


async def test_bad_key_and_unknown_project() -> None:
    """A key the mock does not accept: 401; a project outside `projects`: 404; both in
    Roboflow's error form, counted."""
    async with serve(projects=frozenset({"pieces"})) as api:
        bad_key = await api.get(api_key="wrong")
        unknown = await api.get("chess/checkers")
        known = await api.get("chess/pieces")
        stats = api.server.stats
    assert bad_key[:2] == (401, {"error": {"message": "Unauthorized: invalid api_key."}})
    assert unknown[:2] == (404, {"error": {"message": "Project checkers not found."}})
    assert known[0] == 200
    assert (stats.unauthorized, stats.unknown_project, stats.project_requests) == (1, 1, 3)


async def test_the_real_client_stops_at_a_refused_key() -> None:
    """The client turns the mock's 401 into a fatal error naming the key to check."""
    async with (
        serve() as api,
        RoboflowProject(
            api.server.base_url, "wrong", timeout_s=5.0, policy=RetryPolicy(max_attempts=2)
        ) as client,
    ):
        with pytest.raises(FatalError, match="api_key_env"):
            await client.class_counts("ws", "pets")
        assert api.server.stats.project_requests == 1


@pytest.mark.parametrize("fault", sorted(ROBOFLOW_FAULTS - {"drop"}))
async def test_faults_answer_as_the_other_roboflow_endpoints(fault: str) -> None:
    """Every Roboflow fault replaces the answer as upload's and detection's do: a 429 with
    Retry-After, a 5xx (a 502 says ``retryable``), unparseable or wrong-shaped JSON; a
    slow answer is still the project."""
    config = {"error_rate": 1.0, "faults": {fault: 1.0}, "slow_s": 0.0, "retry_after_s": 2.0}
    async with serve(**config) as api:
        got, payload, headers = await api.get()
        stats = api.server.stats
    assert got == (int(fault) if fault.isdigit() else 200)
    assert stats.faults == {fault: 1}
    if fault == "429":
        assert headers["Retry-After"] == "2"
        assert stats.rate_limited == 1
    elif fault == "502":
        assert payload["retryable"] is True
    elif fault == "malformed":
        assert isinstance(payload, str)
    elif fault == "wrong_shape":
        assert "project" not in payload
    elif fault == "slow":
        assert payload["project"]["classes"] == DEFAULT_CLASSES


async def test_a_dropped_connection_is_no_answer() -> None:
    """The ``drop`` fault closes the connection without an answer (aiohttp may ask again
    once, as it does for a GET: that one is dropped too)."""
    async with serve(error_rate=1.0, faults={"drop": 1.0}) as api:
        with pytest.raises(aiohttp.ClientError):
            await api.get()
        stats = api.server.stats
    assert stats.project_requests >= 1
    assert stats.faults == {"drop": stats.project_requests}


async def test_image_faults_do_not_reach_the_project() -> None:
    """Faults that concern images only (corrupt, truncated, 404 once) leave it whole."""
    faults = {"corrupt_image": 1.0, "truncated_image": 1.0, "image_404_once": 1.0}
    async with serve(error_rate=1.0, faults=faults) as api:
        status, payload, _ = await api.get()
    assert status == 200
    assert payload["project"]["classes"] == DEFAULT_CLASSES


async def test_the_real_client_rides_through_faults() -> None:
    """With every other read faulted, the client's retries get the counts (its sleeps
    faked)."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    config = {"error_rate": 0.5, "seed": 3, "faults": {"503": 1.0, "malformed": 1.0}}
    async with (
        serve(project_classes={"cat": 4}, **config) as api,
        RoboflowProject(
            api.server.base_url,
            KEY,
            timeout_s=5.0,
            policy=RetryPolicy(max_attempts=10),
            sleep=sleep,
        ) as client,
    ):
        counts = await client.class_counts("ws", "pets")
        stats = api.server.stats
    assert counts == {"cat": 4}
    assert stats.project_requests == sum(stats.faults.values()) + 1


# ---- routes ------------------------------------------------------------------------------------


async def test_the_route_does_not_shadow_the_others() -> None:
    """Every other GET route still answers as before (models, batches, stats, a served
    image); the mock's own first segments are no workspace, and another method on two
    segments is still a 404 (detection keeps its numbered versions)."""
    async with serve() as api:
        base = api.server.base_url
        body = {"project_url": "p", "prompt": "a cat"}
        generate = api.session.post(f"{base}/synthetic-image", params={"api_key": KEY}, json=body)
        async with generate as answer:
            image_url = (await answer.json())["data"][0]["url"]
        statuses = {}
        for path in ("v1/models", "v1/models/gpt-image-1", "v1/batches", "_stats", "v1/files"):
            bearer = {"Authorization": f"Bearer {KEY}"}
            async with api.session.get(f"{base}/{path}", headers=bearer) as r:
                statuses[path] = r.status
        async with api.session.get(image_url) as answer:
            image = (answer.status, answer.content_type)
        async with api.session.get(f"{base}/images/nothing") as answer:
            statuses["images/nothing"] = answer.status
        async with api.session.post(f"{base}/chess/pieces", params={"api_key": KEY}) as answer:
            statuses["POST chess/pieces"] = answer.status
        async with api.session.get(f"{base}/_stats") as answer:
            stats = await answer.json()
    assert statuses == {
        "v1/models": 200,
        "v1/models/gpt-image-1": 200,
        "v1/batches": 200,
        "_stats": 200,
        "v1/files": 405,  # POST only, as before: not taken for a workspace
        "images/nothing": 404,
        "POST chess/pieces": 404,
    }
    assert image == (200, "image/png")
    assert stats["project_requests"] == 0
    assert stats["model_requests"] == 2


# ---- settings and the flag ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        pytest.param({"a": -1}, "whole numbers", id="negative"),
        pytest.param({"a": 1.5}, "whole numbers", id="fraction"),
        pytest.param({"a": True}, "whole numbers", id="bool"),
        pytest.param({"a": "3"}, "whole numbers", id="text"),
        pytest.param({"": 1}, "non-empty", id="empty-name"),
        pytest.param({"  ": 1}, "non-empty", id="blank-name"),
    ],
)
def test_bad_counts_are_refused(classes: dict[Any, Any], words: str) -> None:
    """The config refuses a count that is not a whole number >= 0 or a blank name."""
    with pytest.raises(ValueError, match=words):
        MockConfig(project_classes=classes)


def test_empty_counts_are_a_project_without_classes() -> None:
    """No classes at all is a valid (new, empty) project."""
    assert MockConfig(project_classes={}).class_counts() == {}


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        pytest.param("a=2,b=10,c=25", {"a": 2, "b": 10, "c": 25}, id="three"),
        pytest.param(
            " white-queen = 7 , black-pawn=0 ", {"white-queen": 7, "black-pawn": 0}, id="spaces"
        ),
        pytest.param("Person=1", {"Person": 1}, id="case-kept"),
    ],
)
def test_the_flag_is_parsed(text: str, counts: dict[str, int]) -> None:
    """``NAME=COUNT`` pairs, comma-separated, white space around them ignored."""
    assert parse_project_classes(text) == counts


@pytest.mark.parametrize("text", ["a", "a=", "=3", "a=-1", "a=1.5", "a=x", "a=1,,b=2", "a=²"])
def test_bad_flag_values_are_refused(text: str) -> None:
    """What is not ``NAME=COUNT,...`` raises ValueError naming the form."""
    with pytest.raises(ValueError, match="NAME=COUNT"):
        parse_project_classes(text)


def test_a_class_given_twice_is_refused() -> None:
    """The flag names each class once."""
    with pytest.raises(ValueError, match="twice"):
        parse_project_classes("a=1,b=2,a=3")


def test_mock_server_flag_sets_the_counts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--project-classes a=2,b=10,c=25`` reaches the server's config; a bad value is a
    usage error (exit 2) naming the flag."""
    import pipeline.mockapi.server as server_module
    from pipeline.cli import main

    started: list[MockConfig] = []
    monkeypatch.setattr(
        server_module, "run_mock_server", lambda config, host, port: started.append(config)
    )
    with pytest.raises(SystemExit) as ended:
        main(["mock-server", "--project-classes", "a=2,b=10,c=25"])
    assert ended.value.code == EXIT_OK
    assert started[0].project_classes == {"a": 2, "b": 10, "c": 25}
    with pytest.raises(SystemExit) as ended:
        main(["mock-server", "--project-classes", "a=many"])
    assert ended.value.code == EXIT_USAGE
    assert "--project-classes" in capsys.readouterr().err
    assert len(started) == 1
