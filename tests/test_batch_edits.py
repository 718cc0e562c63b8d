"""Edits through OpenAI's Batch API (``/v1/images/edits`` lines in the Images API's JSON
form) and a source's ``mask`` for edits online and in batches: the exact requests, the
mock's validation of edit lines, the spec errors, and the keys."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestServer
from PIL import Image
from test_batch import FakeOpenAI, Harness, harness, last_lines, ok_line
from test_openai import Recorder

from pipeline import api
from pipeline.backends.openai import OpenAIBackend
from pipeline.backends.openai_batch import BatchBackend, BatchOptions
from pipeline.errors import PermanentError, SpecError
from pipeline.items import expand_items, item_key
from pipeline.jobspec.load import load_spec
from pipeline.manifest.log import read_lines
from pipeline.mockapi.image import mock_color
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.records import InputImage, WorkItem

__all__ = ["harness"]  # the loopback Batch API fixture, shared with test_batch

KEY = "sk-batch-edits-test-5d2e8a"
PARAMS = {"model": "gpt-image-2", "quality": "low", "n": 1}


def png(color: str = "red", size: int = 16, mode: str = "RGB") -> bytes:
    """A real PNG of one colour."""
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(buffer, "JPEG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def file_input(path: Path, data: bytes) -> InputImage:
    """`path` written with `data`, as the ``file`` input (or mask) of an item."""
    path.write_bytes(data)
    return InputImage("file", str(path), hashlib.sha256(data).hexdigest())


def edit_item(index: int, **overrides: Any) -> WorkItem:
    fields: dict[str, Any] = {
        "key": f"{index:064x}",
        "source": "shelves",
        "prompt": f"the shelf in autumn {index}",
        "project_url": "",
        "params": PARAMS,
    }
    fields.update(overrides)
    return WorkItem(**fields)


def uploaded_lines(fake: FakeOpenAI) -> list[list[dict[str, Any]]]:
    """The request lines of each uploaded input file, in upload order."""
    return [
        [json.loads(line) for line in r["parts"]["file"]["data"].splitlines()]
        for r in fake.requests
        if r["path"] == "/v1/files"
    ]


# ---- the requests ------------------------------------------------------------------------


async def test_an_edit_is_one_json_line_with_the_file_as_a_data_url(
    harness: Callable[..., Any], tmp_path: Path
) -> None:
    """An item with a local file is sent as an ``/v1/images/edits`` line: the parameters,
    and ``images: [{"image_url": "data:image/png;base64,<the file's bytes>"}]``, in a
    batch whose endpoint is the edits one."""
    data = png("red")
    item = edit_item(1, input=file_input(tmp_path / "shelf.png", data))
    fake = FakeOpenAI(outputs=[ok_line(item.key)])
    h: Harness = await harness(fake)
    [result] = await asyncio.gather(h.backend.generate(item, b64(data)))
    assert len(result.images) == 1
    assert uploaded_lines(fake) == [
        [
            {
                "custom_id": item.key,
                "method": "POST",
                "url": "/v1/images/edits",
                "body": {
                    "prompt": item.prompt,
                    **PARAMS,
                    "images": [{"image_url": "data:image/png;base64," + b64(data)}],
                },
            }
        ]
    ]
    [create] = [r["json"] for r in fake.requests if r["path"] == "/v1/batches"]
    assert create["endpoint"] == "/v1/images/edits"
    assert h.recorded[0][0] == [item.key]  # recorded as submitted before the batch exists


async def test_an_edit_line_carries_the_mask_and_a_url_input_as_itself(
    harness: Callable[..., Any], tmp_path: Path
) -> None:
    """A source's mask is ``mask: {"image_url": "data:image/png;base64,..."}``; a URL
    input is passed as its own ``image_url``; a JPEG file's data URL says image/jpeg."""
    mask_data = png("white", mode="RGBA")
    mask = file_input(tmp_path / "mask.png", mask_data)
    url = "https://images.example.com/shelf.png"
    by_url = edit_item(1, input=InputImage("url", url), mask=mask)
    photo = jpeg()
    by_file = edit_item(2, input=file_input(tmp_path / "shelf.jpg", photo))
    fake = FakeOpenAI(outputs=[ok_line(by_url.key), ok_line(by_file.key)])
    h: Harness = await harness(fake)
    await asyncio.gather(h.backend.generate(by_url, url), h.backend.generate(by_file, b64(photo)))
    bodies = {line["custom_id"]: line["body"] for lines in uploaded_lines(fake) for line in lines}
    assert bodies[by_url.key]["images"] == [{"image_url": url}]
    assert bodies[by_url.key]["mask"] == {"image_url": "data:image/png;base64," + b64(mask_data)}
    assert bodies[by_file.key]["images"] == [{"image_url": "data:image/jpeg;base64," + b64(photo)}]
    assert "mask" not in bodies[by_file.key]


async def test_prompt_items_and_edits_go_into_batches_of_their_own_endpoint(
    harness: Callable[..., Any], tmp_path: Path
) -> None:
    """A batch has one endpoint: generations and edits gather into separate files."""
    data = png()
    prompt_only = edit_item(1)
    edit = edit_item(2, input=file_input(tmp_path / "a.png", data))
    fake = FakeOpenAI(outputs=[ok_line(prompt_only.key), ok_line(edit.key)])
    h: Harness = await harness(fake)
    await asyncio.gather(h.backend.generate(prompt_only, None), h.backend.generate(edit, b64(data)))
    files = uploaded_lines(fake)
    assert sorted({line["url"] for line in lines} == {lines[0]["url"]} for lines in files) == [
        True,
        True,
    ]
    assert sorted(lines[0]["url"] for lines in files) == [
        "/v1/images/edits",
        "/v1/images/generations",
    ]
    endpoints = sorted(r["json"]["endpoint"] for r in fake.requests if r["path"] == "/v1/batches")
    assert endpoints == ["/v1/images/edits", "/v1/images/generations"]


async def test_the_file_limit_counts_each_lines_inline_image(
    harness: Callable[..., Any], tmp_path: Path
) -> None:
    """An edit line is counted at its real size, data URL included: a limit that holds
    two lines cuts five items into files of at most two; a line larger than the limit
    fails its item at once (it could never be sent in a batch)."""
    data = png(size=64) + bytes(range(256)) * 12  # a few kB: the image is most of a line
    items = [edit_item(i, input=file_input(tmp_path / f"{i}.png", data)) for i in range(5)]
    line_bytes = len(b64(data)) + 400  # the base64, and the rest of a line with room to spare
    fake = FakeOpenAI(outputs=[ok_line(item.key) for item in items])
    h: Harness = await harness(fake, max_file_bytes=2 * line_bytes)
    results = await asyncio.gather(*(h.backend.generate(item, b64(data)) for item in items))
    assert all(len(result.images) == 1 for result in results)
    uploads = [r["parts"]["file"]["data"] for r in fake.requests if r["path"] == "/v1/files"]
    assert all(len(upload) <= 2 * line_bytes for upload in uploads)
    assert sorted(len(upload.splitlines()) for upload in uploads) == [1, 2, 2]

    big = png(size=256) + bytes(4 * line_bytes)  # a PNG header, then padding
    huge = edit_item(9, input=file_input(tmp_path / "big.png", big))
    with pytest.raises(PermanentError, match="more than a batch input file takes"):
        await h.backend.generate(huge, b64(big))


# ---- the mock's Batch API ----------------------------------------------------------------


def edit_line(custom_id: str, body: dict[str, Any]) -> bytes:
    request = {"custom_id": custom_id, "method": "POST", "url": "/v1/images/edits", "body": body}
    return json.dumps(request).encode() + b"\n"


def image_url(data: bytes, mime: str = "image/png") -> dict[str, str]:
    return {"image_url": f"data:{mime};base64,{b64(data)}"}


MALFORMED = [
    pytest.param({}, "images must be a list of 1 to 16", id="no-images"),
    pytest.param({"images": []}, "images must be a list of 1 to 16", id="empty-images"),
    pytest.param(
        {"images": [image_url(png())] * 17}, "images must be a list of 1 to 16", id="17-images"
    ),
    pytest.param(
        {"images": [{**image_url(png()), "file_id": "file-x"}]},
        "exactly one of image_url or file_id",
        id="both-keys",
    ),
    pytest.param(
        {"images": [{"image_url": "data:image/png;base64,@@@@"}]},
        "does not decode",
        id="bad-base64",
    ),
    pytest.param({"images": [{"file_id": "file-nope"}]}, "no such file", id="unknown-file-id"),
    pytest.param(
        {"images": [image_url(png())], "mask": image_url(jpeg(), "image/jpeg")},
        "mask must be a PNG",
        id="jpeg-mask",
    ),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED)
async def test_mock_answers_a_malformed_edit_line_with_its_own_400(
    body: dict[str, Any], message: str
) -> None:
    """The mock's edits batch answers a line the API would refuse with a 400 in the error
    file (nothing generated); the good line beside it is drawn from prompt and input."""
    good = {"prompt": "a shelf", "images": [image_url(png("red"))], "mask": image_url(png())}
    data = edit_line("good", good) + edit_line("bad", {"prompt": "a shelf", **body})
    async with MockServer(MockConfig(batch_s=0)) as server, aiohttp.ClientSession() as session:
        form = aiohttp.FormData({"purpose": "batch"})
        form.add_field("file", data, filename="in.jsonl", content_type="application/jsonl")
        async with session.post(f"{server.base_url}/v1/files", data=form) as answer:
            file_id = (await answer.json())["id"]
        create = {"input_file_id": file_id, "endpoint": "/v1/images/edits"}
        create["completion_window"] = "24h"
        async with session.post(f"{server.base_url}/v1/batches", json=create) as answer:
            batch_id = (await answer.json())["id"]
        async with session.get(f"{server.base_url}/v1/batches/{batch_id}") as answer:
            batch = await answer.json()
        assert batch["status"] == "completed"
        assert batch["request_counts"]["failed"] == 1
        results: dict[str, Any] = {}
        for name in ("output_file_id", "error_file_id"):
            url = f"{server.base_url}/v1/files/{batch[name]}/content"
            async with session.get(url) as answer:
                for line in (await answer.read()).splitlines():
                    result = json.loads(line)
                    results[result["custom_id"]] = result["response"]
        generations = server.stats.generations
    assert results["bad"]["status_code"] == 400
    assert message in results["bad"]["body"]["error"]["message"]
    assert results["good"]["status_code"] == 200
    assert results["good"]["body"]["data"][0]["b64_json"]
    assert generations == 1  # only the good line was made (and paid for)


async def test_a_refused_edit_line_fails_its_item_without_a_retry(tmp_path: Path) -> None:
    """The Batch API client against the mock: a line answered 400 fails its item for
    good (a `PermanentError`, as a 400 online), the other item of the batch is ok."""
    good_data = png("blue")
    good = edit_item(1, input=file_input(tmp_path / "good.png", good_data))
    bad = edit_item(2, input=file_input(tmp_path / "bad.png", b"@@@@"))
    async with MockServer(MockConfig(batch_s=0)) as server:
        options = BatchOptions(job="edits", poll_interval_s=0.01, poll_max_s=0.02, gather_s=0.01)
        backend = BatchBackend(
            server.base_url + "/v1", KEY, concurrency=2, timeout_s=5, batch=options
        )
        backend.bind_manifest({}, lambda _items, _ref: None)
        try:
            ok, failed = await asyncio.gather(
                backend.generate(good, b64(good_data)),
                backend.generate(bad, "@@@@"),
                return_exceptions=True,
            )
        finally:
            await backend.aclose()
        batches = server.stats.batches
    assert not isinstance(ok, BaseException), ok
    assert len(ok.images) == 1
    assert isinstance(failed, PermanentError)
    assert (failed.status, failed.kind, failed.item_key) == (400, "http_status", bad.key)
    assert batches == 1


# ---- whole jobs --------------------------------------------------------------------------


def write_edit_spec(folder: Path, **source: Any) -> Path:
    """A mock-kind batch spec whose one source edits two PNG files."""
    (folder / "shelves").mkdir(exist_ok=True)
    (folder / "shelves" / "a.png").write_bytes(png("red", size=48))
    (folder / "shelves" / "b.png").write_bytes(png("blue", size=48))
    spec = {
        "version": 1,
        "name": "edits",
        "output_dir": "out",
        "backend": {"kind": "mock", "mode": "batch", "poll_interval_s": 0.05, "poll_max_s": 0.2},
        "params": {"n": 1},
        "run": {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "sources": [
            {
                "name": "shelves",
                "prompt": "the same shelf in autumn",
                "images": ["shelves/*.png"],
                **source,
            }
        ],
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "with_mask", [pytest.param(False, id="plain"), pytest.param(True, id="mask")]
)
def test_batch_edit_job_runs_on_the_embedded_mock_and_stores_its_images(
    tmp_path: Path, with_mask: bool
) -> None:
    """``mode: batch`` with an ``images:`` source (two files, ``n: 1``) on the embedded
    mock: both items ok, their images stored, each drawn from the prompt and its input;
    the keys are those an online run computes."""
    if with_mask:
        (tmp_path / "mask.png").write_bytes(png("white", size=48, mode="RGBA"))
    path = write_edit_spec(tmp_path, **({"mask": "mask.png"} if with_mask else {}))
    spec = api.load_spec(path)
    result = api.run(spec)
    assert result.exit_code == 0, result.message
    assert (result.ok, result.failed) == (2, 0)
    lines = last_lines(tmp_path / "out")
    assert {line["status"] for line in lines.values()} == {"ok"}
    online = yaml.safe_load(path.read_text())
    online["backend"]["mode"] = "online"
    path.write_text(yaml.safe_dump(online))
    assert set(lines) == {item.key for item in expand_items(load_spec(path))}
    prompt = "the same shelf in autumn"
    for line in lines.values():
        [output] = line["outputs"]
        stored = tmp_path / "out" / output["path"]
        assert stored.is_file()
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == output["sha256"]
        source_bytes = Path(line["input"]["value"]).read_bytes()
        with Image.open(stored) as image:
            middle = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
        assert middle == mock_color(prompt, b64(source_bytes))  # drawn from this input
        assert line["batch"]["id"].startswith("batch-mock")  # the ok line names its batch
    statuses = [line["status"] for line in read_lines(tmp_path / "out" / "manifest.jsonl")]
    assert statuses.count("submitted") == 4  # recorded before and after the batch was made


# ---- mask: the spec ----------------------------------------------------------------------

HEAD = "version: 1\nname: job\nbackend:\n  kind: {kind}\n{extra}sources:\n  - name: a\n"


def mask_spec(sandbox: Path, source: str, *, kind: str = "openai", extra: str = "") -> Path:
    (sandbox / "in.png").write_bytes(png())
    path = sandbox / "spec.yaml"
    path.write_text(HEAD.format(kind=kind, extra=extra) + "    prompt: x\n" + source)
    return path


MASK_ERRORS = [
    pytest.param(
        "    images: [in.png]\n    mask: mask.png\n",
        {"mask.png": png()},
        "roboflow",
        "backend roboflow's endpoint takes no mask",
        id="roboflow-kind",
    ),
    pytest.param(
        "    mask: mask.png\n",
        {"mask.png": png()},
        "openai",
        "only applies to a source with input images",
        id="prompt-only-source",
    ),
    pytest.param(
        "    images: [in.png]\n    mask: missing.png\n",
        {},
        "openai",
        "missing.png does not exist",
        id="missing-file",
    ),
    pytest.param(
        "    images: [in.png]\n    mask: mask.jpg\n",
        {"mask.jpg": jpeg()},
        "mock",
        "mask.jpg is not a PNG",
        id="not-a-png",
    ),
    pytest.param(
        "    images: [in.png]\n    mask: mask.png\n",
        {"mask.png": b"\x89PNG\r\n\x1a\nnot really"},
        "openai",
        "not an image Pillow can read",
        id="broken-png",
    ),
]


@pytest.mark.parametrize(("source", "files", "kind", "words"), MASK_ERRORS)
def test_mask_spec_errors_name_the_key_and_line(
    sandbox: Path, source: str, files: dict[str, bytes], kind: str, words: str
) -> None:
    """A mask where it cannot apply is a SpecError at ``sources[0].mask`` with its line."""
    for name, data in files.items():
        (sandbox / name).write_bytes(data)
    extra = "project_url: shelves\n" if kind == "roboflow" else ""
    path = mask_spec(sandbox, source, kind=kind, extra=extra)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    error = info.value
    line = path.read_text().splitlines().index(next(s for s in source.splitlines() if "mask" in s))
    assert (error.key_path, error.line) == ("sources[0].mask", line + 1)
    assert words in str(error)


@pytest.mark.slow
def test_a_mask_spec_error_exits_2_from_the_cli(sandbox: Path) -> None:
    """The CLI prints the one-line error with file, line and key, and exits 2."""
    (sandbox / "mask.png").write_bytes(png())
    path = mask_spec(
        sandbox,
        "    images: [in.png]\n    mask: mask.png\n",
        kind="roboflow",
        extra="project_url: shelves\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "ROBOFLOW_API_KEY": "rf-key"},
    )
    assert result.returncode == 2, result.stderr
    assert (
        "spec.yaml:10 sources[0].mask: backend roboflow's endpoint takes no mask" in result.stderr
    )


# ---- mask: keys --------------------------------------------------------------------------


def test_the_mask_enters_the_key_only_when_set(sandbox: Path) -> None:
    """Without a mask the key is the one documented (and computed before masks existed);
    with one, the body has ``mask: sha256:<hex>`` besides, so the key differs."""
    mask_data = png("white", mode="RGBA")
    (sandbox / "mask.png").write_bytes(mask_data)
    plain_path = mask_spec(sandbox, "    images: [in.png]\n")
    [plain] = list(expand_items(load_spec(plain_path)))
    body = {
        "prompt": "x",
        "image": "sha256:" + hashlib.sha256(png()).hexdigest(),
        "image_type": "base64",
    }
    assert plain.key == item_key("openai", body, 0)
    assert plain.mask is None
    masked_path = mask_spec(sandbox, "    images: [in.png]\n    mask: mask.png\n")
    [masked] = list(expand_items(load_spec(masked_path)))
    mask_hash = hashlib.sha256(mask_data).hexdigest()
    assert masked.key == item_key("openai", {**body, "mask": "sha256:" + mask_hash}, 0)
    assert masked.key != plain.key
    assert masked.mask == InputImage("file", str(sandbox / "mask.png"), mask_hash)


# ---- mask: online ------------------------------------------------------------------------


async def test_online_edit_sends_the_mask_as_a_multipart_part(tmp_path: Path) -> None:
    """Online, the mask is a ``mask`` part (PNG) after the ``image[]`` part."""
    recorder = Recorder()
    data, mask_data = png("red"), png("white", mode="RGBA")
    item = edit_item(
        1,
        input=file_input(tmp_path / "shelf.png", data),
        mask=file_input(tmp_path / "mask.png", mask_data),
    )
    async with TestServer(recorder.app(), host="127.0.0.1") as server:
        base = str(server.make_url("/v1"))
        async with OpenAIBackend(base, KEY, concurrency=1, timeout_s=5) as client:
            await client.generate(item, b64(data))
    [parts] = recorder.parts
    assert parts["image[]"] == ("shelf.png", "image/png", data)
    assert parts["mask"] == ("mask.png", "image/png", mask_data)
    assert list(parts)[-2:] == ["image[]", "mask"]


@pytest_asyncio.fixture
async def mock_session() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async with MockServer(MockConfig()) as server, aiohttp.ClientSession() as session:
        yield server.base_url, session


@pytest.mark.parametrize(
    ("mask", "status"),
    [pytest.param(png("white"), 200, id="png"), pytest.param(jpeg(), 400, id="jpeg")],
)
async def test_mock_online_edit_takes_a_png_mask_part(
    mock_session: tuple[str, aiohttp.ClientSession], mask: bytes, status: int
) -> None:
    """The mock's ``/v1/images/edits`` accepts a ``mask`` part, and refuses one that is
    not a PNG, as the API does."""
    base, session = mock_session
    form = aiohttp.FormData({"prompt": "a shelf", "n": "1"})
    form.add_field("image[]", png(), filename="a.png", content_type="image/png")
    form.add_field("mask", mask, filename="mask.png", content_type="image/png")
    async with session.post(f"{base}/v1/images/edits", data=form) as answer:
        assert answer.status == status
        if status == 400:
            assert "mask must be a PNG" in (await answer.json())["error"]["message"]
