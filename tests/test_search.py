"""roboflow_search sources: the search request, its answers and errors, the spec, the
mock endpoint, and runs and plans that search once and reuse the recorded ids."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aioresponses import aioresponses
from checks import ThreadedMock, run_cli_at_debug
from yarl import URL

from pipeline import api
from pipeline.backends.roboflow_search import PAGE_LIMIT, RoboflowSearch
from pipeline.errors import FatalError, OutputError, SpecError
from pipeline.jobspec.load import load_spec, spec_from_data
from pipeline.jobspec.model import SearchSettings
from pipeline.manifest.log import read_latest
from pipeline.mockapi.dataset import MockDataset
from pipeline.mockapi.search import match_images
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.retry import RetryPolicy
from pipeline.run.job import run_job
from pipeline.store.lock import acquire_lock

KEY = "sk-search-5b1e9f0c7d2a-secret"
ROOT = "https://api.example.com"
ENDPOINT = f"{ROOT}/my-ws/trees/search"
ANY_SEARCH = re.compile(r"^https://api\.example\.com/my-ws/trees/search(\?.*)?$")


def query(**fields: Any) -> SearchSettings:
    data: dict[str, Any] = {"workspace": "my-ws", "project": "trees", "tag": "night"}
    data.update(fields)
    return SearchSettings.model_validate({k: v for k, v in data.items() if v is not None})


def page(ids: list[str], total: int | None = None, offset: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {
        "offset": offset,
        "results": [{"id": i, "name": f"{i}.jpg"} for i in ids],
    }
    if total is not None:
        body["total"] = total
    return body


class Sleeps:
    """A fake `sleep` that records the waits (those of the backoff, and of a 429's
    pause) and moves a fake `clock` on instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.now = 0.0

    async def __call__(self, seconds: float) -> None:
        if seconds:  # the retrier's 0 after a 429: its pause is the limiter's wait
            self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def searcher(root: str, key: str, *, attempts: int = 4, sleeps: Sleeps | None = None) -> Any:
    sleeps = sleeps or Sleeps()
    return RoboflowSearch(
        root,
        key,
        timeout_s=5,
        policy=RetryPolicy(max_attempts=attempts),
        sleep=sleeps,
        clock=sleeps.clock,
    )


async def search(q: SearchSettings, *, attempts: int = 4, sleep: Sleeps | None = None) -> Any:
    client = searcher(ROOT, KEY, attempts=attempts, sleeps=sleep)
    async with client:
        return await client.search(q)


def sent(mocked: aioresponses) -> list[tuple[str, URL, Any]]:
    """Every request aioresponses saw: method, URL (with query) and JSON body, in order."""
    calls = [(m, url, call) for (m, url), calls in mocked.requests.items() for call in calls]
    return [(m, url, call.kwargs.get("json")) for m, url, call in calls]


# ---------------------------------------------------------------- the request


async def test_request_is_a_keyed_post_with_the_documented_body(mock_http: aioresponses) -> None:
    """POST /{workspace}/{project}/search?api_key=KEY, JSON body: query, offset, limit, fields."""
    mock_http.post(ANY_SEARCH, payload=page(["a", "b"], total=2))
    result = await search(query(limit=10, in_dataset=True, batch=True))
    assert result.ids == ("a", "b")
    [(method, url, body)] = sent(mock_http)
    assert method == "POST"
    assert url.with_query(None) == URL(ENDPOINT)
    assert dict(url.query) == {"api_key": KEY}
    assert body == {
        "tag": "night",
        "in_dataset": True,
        "batch": True,
        "offset": 0,
        "limit": 10,
        "fields": ["id"],
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("prompt", "a maple at night", id="prompt"),
        pytest.param("like_image", "62MYRuqqWCRZ02q52vsY", id="like_image"),
        pytest.param("class_name", "maple", id="class_name"),
    ],
)
async def test_each_query_kind_is_sent_as_its_own_field(
    mock_http: aioresponses, field: str, value: str
) -> None:
    """The query goes under its own name, with nothing the spec did not set."""
    mock_http.post(ANY_SEARCH, payload=page(["a"]))
    await search(query(tag=None, **{field: value}, batch_id="b-7"))
    [(_, _, body)] = sent(mock_http)
    assert body == {field: value, "batch_id": "b-7", "offset": 0, "limit": 50, "fields": ["id"]}


async def test_pages_with_offset_until_the_limit(mock_http: aioresponses) -> None:
    """600 images take pages of 250, 250 and 100 at offsets 0, 250, 500, and no more."""
    for start, size in ((0, 250), (250, 250), (500, 100)):
        mock_http.post(ANY_SEARCH, payload=page([f"i{n}" for n in range(start, start + size)]))
    result = await search(query(limit=600))
    bodies = [body for _, _, body in sent(mock_http)]
    assert [(b["offset"], b["limit"]) for b in bodies] == [(0, 250), (250, 250), (500, 100)]
    assert max(b["limit"] for b in bodies) == PAGE_LIMIT
    assert result.ids == tuple(f"i{n}" for n in range(600))
    assert result.requests == 3


async def test_a_short_page_ends_the_search(mock_http: aioresponses) -> None:
    """Fewer results than asked for: there is no next page to ask for."""
    mock_http.post(ANY_SEARCH, payload=page([f"i{n}" for n in range(250)]))
    mock_http.post(ANY_SEARCH, payload=page(["last"]))
    result = await search(query(limit=1000))
    assert len(result.ids) == 251
    assert len(sent(mock_http)) == 2


async def test_total_ends_the_search_without_an_empty_page(mock_http: aioresponses) -> None:
    """A full page that reaches ``total`` is the last one asked for."""
    mock_http.post(ANY_SEARCH, payload=page([f"i{n}" for n in range(250)], total=250))
    result = await search(query(limit=1000))
    assert (len(result.ids), result.total) == (250, 250)
    assert len(sent(mock_http)) == 1


async def test_repeated_ids_count_once(mock_http: aioresponses) -> None:
    """An image listed twice (the dataset changed between pages) is one input."""
    mock_http.post(ANY_SEARCH, payload=page(["a", "b", "a"]))
    assert (await search(query(limit=5))).ids == ("a", "b")


# ---------------------------------------------------------------- answers and errors


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"body": "{not json"}, id="invalid-json"),
        pytest.param({"payload": [{"id": "a"}]}, id="a-bare-list"),
        pytest.param({"payload": {"total": 3}}, id="no-results"),
        pytest.param({"payload": {"results": [{"name": "x.jpg"}]}}, id="result-without-id"),
        pytest.param({"payload": {"results": ["a"]}}, id="result-not-an-object"),
        pytest.param({"status": 503}, id="503"),
        pytest.param({"status": 500}, id="500"),
        pytest.param({"exception": asyncio.TimeoutError()}, id="timeout"),
        pytest.param({"exception": aiohttp.ServerDisconnectedError()}, id="dropped"),
    ],
)
async def test_transient_failures_are_retried(
    mock_http: aioresponses, answer: dict[str, Any]
) -> None:
    """A garbled answer, a 5xx, a timeout or a dropped connection: asked again."""
    mock_http.post(ANY_SEARCH, **answer)
    mock_http.post(ANY_SEARCH, payload=page(["a"], total=1))
    sleeps = Sleeps()
    assert (await search(query(), sleep=sleeps)).ids == ("a",)
    assert len(sent(mock_http)) == 2
    assert len(sleeps.waits) == 1


async def test_429_waits_its_retry_after(mock_http: aioresponses) -> None:
    """A 429's Retry-After is the wait before asking again."""
    mock_http.post(ANY_SEARCH, status=429, headers={"Retry-After": "7"})
    mock_http.post(ANY_SEARCH, payload=page(["a"]))
    sleeps = Sleeps()
    await search(query(), sleep=sleeps)
    assert sleeps.waits == [7.0]


async def test_failures_that_persist_abort_after_the_attempts(mock_http: aioresponses) -> None:
    """Still failing after every attempt: a `FatalError` (exit 3), after exactly that many."""
    for _ in range(3):
        mock_http.post(ANY_SEARCH, status=502)
    with pytest.raises(FatalError) as caught:
        await search(query(), attempts=3)
    assert len(sent(mock_http)) == 3
    assert caught.value.exit_code == 3
    assert "failed 3 times" in str(caught.value)
    assert "HTTP 502" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "advice"),
    [
        pytest.param(401, "api_key_env", id="401"),
        pytest.param(403, "api_key_env", id="403"),
        pytest.param(404, "roboflow_search.workspace", id="404"),
        pytest.param(400, "check the source's roboflow_search", id="400"),
    ],
)
async def test_refusals_are_fatal_at_once_and_say_what_to_check(
    mock_http: aioresponses, status: int, advice: str
) -> None:
    """401/403 (the key), 404 (workspace or project), 400 (the query): no retry, exit 3."""
    mock_http.post(ANY_SEARCH, status=status, payload={"error": {"message": f"nope {KEY}"}})
    with pytest.raises(FatalError) as caught:
        await search(query())
    assert len(sent(mock_http)) == 1
    assert caught.value.exit_code == 3
    assert advice in str(caught.value)
    assert "my-ws/trees" in str(caught.value)
    assert KEY not in str(caught.value)  # the answer echoed it


async def test_the_key_is_in_no_log_line_or_error(
    mock_http: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG, through retries and a fatal answer that echoes it, the key shows nowhere."""
    caplog.set_level(logging.DEBUG)
    mock_http.post(ANY_SEARCH, exception=aiohttp.ClientConnectionError(f"{ENDPOINT}?api_key={KEY}"))
    mock_http.post(ANY_SEARCH, status=500, body=f"api_key={KEY} broke")
    mock_http.post(ANY_SEARCH, payload={"results": [{"name": KEY}]})
    mock_http.post(ANY_SEARCH, status=403, body=f"key {KEY} has no access")
    with pytest.raises(FatalError) as caught:
        await search(query(), attempts=5)
    assert len(sent(mock_http)) == 4
    assert caplog.records
    assert KEY not in caplog.text
    assert KEY not in str(caught.value)
    assert caught.value.__context__ is None or KEY not in str(caught.value.__context__)


async def test_a_keyless_search_sends_no_api_key_parameter(mock_http: aioresponses) -> None:
    """The embedded mock takes no key: none is sent (not even an empty one)."""
    mock_http.post(ANY_SEARCH, payload=page(["a"]))
    async with searcher(ROOT, "") as client:
        await client.search(query())
    [(_, url, _)] = sent(mock_http)
    assert "api_key" not in url.query


# ---------------------------------------------------------------- spec


def search_spec(tmp_path: Path, search: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    source: dict[str, Any] = {
        "name": "night",
        "prompt": "the same scene in {snow|rain}",
        "roboflow_search": {
            "workspace": "my-ws",
            "project": "trees",
            "tag": "night",
            **(search or {}),
        },
    }
    data: dict[str, Any] = {
        "version": 1,
        "name": "job",
        "output_dir": str(tmp_path / "out"),
        "backend": {"kind": "mock"},
        "sources": [source],
    }
    data.update(top)
    return data


@pytest.mark.parametrize(
    ("search", "key_path", "words"),
    [
        pytest.param({"tag": None}, "sources[0].roboflow_search", "needs one of", id="no-query"),
        pytest.param(
            {"prompt": "maple"}, "sources[0].roboflow_search.tag", "found prompt and tag", id="two"
        ),
        pytest.param({"limit": 0}, "sources[0].roboflow_search.limit", "", id="limit-0"),
        pytest.param({"limit": 10_001}, "sources[0].roboflow_search.limit", "", id="limit-huge"),
        pytest.param({"workspace": "a/b"}, "sources[0].roboflow_search.workspace", "", id="slash"),
        pytest.param({"tags": "x"}, "sources[0].roboflow_search.tags", "", id="unknown-key"),
        pytest.param({"tag": "  "}, "sources[0].roboflow_search.tag", "empty", id="blank"),
    ],
)
def test_bad_search_blocks_are_spec_errors(
    tmp_path: Path, search: dict[str, Any], key_path: str, words: str
) -> None:
    """Each mistake names the key path to fix (and the line, from a file)."""
    data = search_spec(tmp_path, search)
    block = data["sources"][0]["roboflow_search"]
    data["sources"][0]["roboflow_search"] = {k: v for k, v in block.items() if v is not None}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.key_path == key_path
    assert caught.value.line is not None
    assert words in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_search_and_ids_in_one_source_is_two_input_kinds(tmp_path: Path) -> None:
    """A search source takes no other input."""
    data = search_spec(tmp_path)
    data["sources"][0]["roboflow_ids"] = ["abc"]
    with pytest.raises(SpecError, match="one input kind"):
        spec_from_data(data)


def test_openai_kind_refuses_a_search_source(tmp_path: Path) -> None:
    """OpenAI's API cannot take Roboflow ids, which is all a search yields."""
    data = search_spec(tmp_path, backend={"kind": "openai"})
    with pytest.raises(SpecError) as caught:
        spec_from_data(data)
    assert caught.value.key_path == "sources[0].roboflow_search"
    assert "backend.kind: roboflow" in str(caught.value)


def test_force_caption_regenerate_applies_to_a_search_source(tmp_path: Path) -> None:
    """Its items are Roboflow-id items: the parameter is theirs."""
    data = search_spec(tmp_path)
    data["sources"][0]["params"] = {"force_caption_regenerate": True}
    spec = spec_from_data(data)
    assert spec.source_params(spec.sources[0]) == {"force_caption_regenerate": True}


# ---------------------------------------------------------------- the mock's endpoint


async def post(server: MockServer, path: str, body: Any, key: str | None = None) -> tuple[int, Any]:
    url = URL(server.base_url + path)
    if key is not None:
        url = url.with_query(api_key=key)
    async with aiohttp.ClientSession() as session, session.post(url, data=json.dumps(body)) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param({"tag": "night", "limit": 251}, 400, id="limit-over-250"),
        pytest.param({"tag": "night", "limit": 0}, 400, id="limit-0"),
        pytest.param({"tag": "night", "offset": -1}, 400, id="negative-offset"),
        pytest.param({"tag": 3}, 400, id="tag-not-text"),
        pytest.param({"batch": "yes"}, 400, id="batch-not-bool"),
        pytest.param(["tag"], 400, id="not-an-object"),
        pytest.param({"like_image": "nope"}, 400, id="unknown-like-image"),
        pytest.param({"tag": "night", "limit": 250}, 200, id="limit-250"),
    ],
)
async def test_mock_refuses_what_the_real_endpoint_would(body: Any, status: int) -> None:
    """Bodies the real search refuses get a 400 from the mock too."""
    async with MockServer() as server:
        assert (await post(server, "/ws/trees/search", body))[0] == status


async def test_mock_checks_key_and_project_and_pages() -> None:
    """401 without the key, 404 for an unknown project; offset/limit page the matches."""
    config = MockConfig(api_key=KEY, projects=frozenset({"trees"}))
    async with MockServer(config) as server:
        assert (await post(server, "/ws/trees/search", {"tag": "night"}))[0] == 401
        assert (await post(server, "/ws/other/search", {"tag": "night"}, KEY))[0] == 404
        _, first = await post(server, "/ws/trees/search", {"tag": "night", "limit": 4}, KEY)
        _, rest = await post(
            server, "/ws/trees/search", {"tag": "night", "offset": 4, "fields": ["id"]}, KEY
        )
    every = [i.id for i in match_images(MockDataset().images("trees"), {"tag": "night"})]
    assert first["total"] == rest["total"] == len(every) == 6
    assert [r["id"] for r in first["results"] + rest["results"]] == every
    assert all("night" in r["tags"] for r in first["results"])
    assert rest["results"] == [{"id": i} for i in every[4:]]
    assert server.stats.searches == 4


async def test_mock_ids_are_inputs_its_generation_endpoint_takes() -> None:
    """An id the mock's search finds is an ``image_type: id`` input of /synthetic-image."""
    async with MockServer() as server:
        _, found = await post(server, "/ws/trees/search", {"class_name": "oak", "limit": 1})
        body = {"prompt": "snow", "image": found["results"][0]["id"], "image_type": "id"}
        status, answer = await post(server, "/synthetic-image", body)
    assert status == 200
    assert answer["data"]


async def test_the_client_rides_through_the_mocks_injected_faults() -> None:
    """With faults injected into half the answers, the search still finds every image."""
    config = MockConfig(error_rate=0.5, seed=3, faults={"503": 1, "429": 1, "malformed": 1})
    sleeps = Sleeps()
    async with MockServer(config) as server:
        client = searcher(server.base_url, "", attempts=20, sleeps=sleeps)
        async with client:
            result = await client.search(query(workspace="ws", tag=None, class_name="pine"))
    assert len(result.ids) == 8
    assert server.stats.searches > result.requests  # faults were met, and retried
    assert len(sleeps.waits) == server.stats.searches - result.requests


# ---------------------------------------------------------------- runs and plans


def write_roboflow_spec(tmp_path: Path, base_url: str, **search: Any) -> Path:
    """A roboflow-kind job against the mock at `base_url` with one search source."""
    data = search_spec(
        tmp_path,
        {"workspace": "ws", "limit": 4, **search},
        backend={"kind": "roboflow", "base_url": base_url, "timeout_s": 5},
        project_url="trees",
        params={"size": "32x32"},
        run={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "rate_limit": "1000/s"},
    )
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    return KEY


async def run(path: Path) -> Any:
    return await run_job(load_spec(path), spec_path=path)


def inputs(out: Path) -> set[str]:
    return {r["input"]["value"] for r in read_latest(out / "manifest.jsonl").values()}


async def test_a_run_generates_from_the_found_ids_and_a_resume_reuses_them(
    tmp_path: Path, key: str
) -> None:
    """Items are found ids × variants; the ids are recorded; a resume sends no search."""
    async with MockServer(MockConfig(api_key=key, projects=frozenset({"trees"}))) as server:
        path = write_roboflow_spec(tmp_path, server.base_url)
        first = await run(path)
        searches = server.stats.searches
        second = await run(path)
        assert server.stats.searches == searches == 1
    expected = [i.id for i in match_images(MockDataset().images("trees"), {"tag": "night"})][:4]
    out = tmp_path / "out"
    assert (first.exit_code, first.summary["ok"]) == (0, 8)  # 4 ids x {snow|rain}
    assert inputs(out) == set(expected)
    assert {r["input"]["kind"] for r in read_latest(out / "manifest.jsonl").values()} == {"id"}
    record = json.loads((out / "search.json").read_text())["sources"]["night"]
    assert record["ids"] == expected
    assert record["query"]["tag"] == "night"
    job = json.loads((out / "job.json").read_text())
    assert job["sources"][0]["input"] == "roboflow_search"
    assert job["sources"][0]["items"] == 8
    assert (second.exit_code, second.summary["skipped_ok"], second.summary["requests"]) == (0, 8, 0)


async def test_a_resume_works_on_the_recorded_ids_even_if_the_dataset_changed(
    tmp_path: Path, key: str
) -> None:
    """The record, not a new search, decides a resume's images."""
    async with MockServer(MockConfig(api_key=key)) as server:
        path = write_roboflow_spec(tmp_path, server.base_url, limit=2)
        await run(path)
    record_path = tmp_path / "out" / "search.json"
    data = json.loads(record_path.read_text())
    data["sources"]["night"]["ids"] = ["recorded-1", "recorded-2", "recorded-3"]
    record_path.write_text(json.dumps(data))
    async with MockServer(MockConfig(api_key=key)) as server:
        result = await run(write_roboflow_spec(tmp_path, server.base_url, limit=2))
        assert server.stats.searches == 0
    assert result.summary["ok"] == 6  # only the new ids' 3 x 2 items ran
    assert {"recorded-1", "recorded-2", "recorded-3"} <= inputs(tmp_path / "out")


async def test_an_edited_query_searches_again(tmp_path: Path, key: str) -> None:
    """A changed search (here its limit) is not answered by the old record."""
    async with MockServer(MockConfig(api_key=key)) as server:
        await run(write_roboflow_spec(tmp_path, server.base_url, limit=2))
        result = await run(write_roboflow_spec(tmp_path, server.base_url, limit=3))
        assert server.stats.searches == 2
    assert (result.summary["skipped_ok"], result.summary["ok"]) == (4, 2)
    record = json.loads((tmp_path / "out" / "search.json").read_text())
    assert len(record["sources"]["night"]["ids"]) == 3


async def test_a_search_that_finds_nothing_stops_before_anything_is_sent(
    tmp_path: Path, key: str
) -> None:
    """An empty search source is a spec error (exit 2): no generation, nothing recorded."""
    async with MockServer(MockConfig(api_key=key)) as server:
        path = write_roboflow_spec(tmp_path, server.base_url, tag="no-such-tag")
        with pytest.raises(SpecError) as caught:
            await run(path)
        assert server.stats.requests == 0
    assert caught.value.key_path == "sources[0].roboflow_search"
    assert "found no images" in str(caught.value)
    assert not (tmp_path / "out" / "search.json").exists()


async def test_a_refused_key_aborts_with_exit_3_and_sends_no_generation(
    tmp_path: Path, key: str
) -> None:
    """A 401 on the search ends the run before its first request (exit 3)."""
    async with MockServer(MockConfig(api_key="another-key")) as server:
        with pytest.raises(FatalError) as caught:
            await run(write_roboflow_spec(tmp_path, server.base_url))
        assert (server.stats.searches, server.stats.requests) == (1, 0)
    assert caught.value.exit_code == 3
    assert key not in str(caught.value)


async def test_max_items_holds_for_what_the_search_found(tmp_path: Path, key: str) -> None:
    """The typo guard counts the found ids, before the first generation."""
    async with MockServer(MockConfig(api_key=key)) as server:
        path = write_roboflow_spec(tmp_path, server.base_url, limit=6)
        data = yaml.safe_load(path.read_text())
        data["run"]["max_items"] = 10
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(SpecError, match="max_items"):
            await run(path)
        assert server.stats.requests == 0


async def test_plan_sends_nothing_and_shows_the_count_unknown(tmp_path: Path, key: str) -> None:
    """Without --resolve a search not yet recorded is null, with a note naming the fix."""
    async with MockServer(MockConfig(api_key=key)) as server:
        spec = load_spec(write_roboflow_spec(tmp_path, server.base_url))
        data = (await asyncio.to_thread(api.plan, spec)).to_json()
        assert server.stats.searches == 0
    [source] = data["sources"]
    assert (source["items"], source["images"], data["total"]["items"]) == (None, None, None)
    assert "plan --resolve" in source["count_unknown_because"]
    assert any("plan --resolve" in note for note in data["count_notes"])


async def test_plan_resolve_searches_records_and_counts(tmp_path: Path, key: str) -> None:
    """--resolve makes plan's only request, records the ids, and the run uses them."""
    async with MockServer(MockConfig(api_key=key)) as server:
        spec = load_spec(write_roboflow_spec(tmp_path, server.base_url))
        resolved = await asyncio.to_thread(api.plan, spec, resolve=True)
        assert (server.stats.searches, server.stats.requests) == (1, 0)
        again = await asyncio.to_thread(api.plan, spec)  # from the record: no request
        result = await run_job(spec, spec_path=tmp_path / "spec.yaml")
        assert server.stats.searches == 1
    assert resolved.to_json()["total"]["items"] == again.to_json()["total"]["items"] == 8
    assert result.summary["ok"] == 8


async def test_plan_resolve_is_refused_while_a_run_holds_the_lock(tmp_path: Path, key: str) -> None:
    """--resolve writes OUT/search.json under OUT's lock: while a run holds it, plan
    --resolve fails with the lock's error (exit 2) before it searches or writes."""
    async with MockServer(MockConfig(api_key=key)) as server:
        spec = load_spec(write_roboflow_spec(tmp_path, server.base_url))
        out = spec.output_dir
        with acquire_lock(out):  # as a run holds it
            before = sorted(p.name for p in out.iterdir())
            with pytest.raises(OutputError, match="in use by another synthaug run") as refused:
                await asyncio.to_thread(api.plan, spec, resolve=True)
            assert sorted(p.name for p in out.iterdir()) == before
        assert refused.value.exit_code == 2
        assert (server.stats.searches, server.stats.requests) == (0, 0)
        assert not (out / "search.json").exists()
        resolved = await asyncio.to_thread(api.plan, spec, resolve=True)  # lock released
    assert resolved.to_json()["total"]["items"] == 8
    assert (out / "search.json").exists()
    assert not (out / ".synthaug.lock").exists()


@pytest.mark.slow
def test_cli_plan_and_run_on_the_mock_kind(
    tmp_path: Path, spec_factory: Callable[..., Path]
) -> None:
    """`plan` (unknown), `plan --resolve` (counted), `run` on the embedded mock: no key."""
    path = spec_factory(
        output_dir="out",
        sources=[
            {
                "name": "pines",
                "prompt": "the same in snow",
                "roboflow_search": {"workspace": "ws", "project": "trees", "class_name": "pine"},
            }
        ],
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    unknown = cli("plan", "--json")
    assert unknown.returncode == 0, unknown.stderr
    assert json.loads(unknown.stdout)["total"]["items"] is None
    assert not (tmp_path / "out").exists()
    counted = cli("plan", "--json", "--resolve")
    assert counted.returncode == 0, counted.stderr
    assert json.loads(counted.stdout)["total"]["items"] == 8  # 8 seeded pines
    ran = cli("run", "--no-progress", "--no-grid")
    assert ran.returncode == 0, ran.stderr
    assert "8 ok" in ran.stderr


@pytest.mark.slow
def test_the_key_never_leaks_from_a_search_run_at_debug(tmp_path: Path) -> None:
    """A CLI run at DEBUG whose search is refused, then one that runs: no key anywhere."""
    for config in (MockConfig(api_key="another-key"), MockConfig(api_key=KEY)):
        with ThreadedMock(config) as mock:
            path = write_roboflow_spec(tmp_path, mock.base_url)
            proc = run_cli_at_debug(path, {"ROBOFLOW_API_KEY": KEY})
        assert proc.returncode == (3 if config.api_key != KEY else 0), proc.stderr
        assert KEY.encode() not in proc.stdout + proc.stderr
        for file in tmp_path.rglob("*"):
            assert not file.is_file() or KEY.encode() not in file.read_bytes(), file
