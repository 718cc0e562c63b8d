"""The `label:` block and the annotations that follow uploads.

The detection and annotation clients' exact requests and every answer form are checked
with aioresponses; the stages' rules (classes kept, ``no_detection``, what is uploaded and
annotated, exactly once, the loud read-back) with fakes of the clients; whole runs against
the mock API on 127.0.0.1 live in tests/test_label_runs.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import pytest
import pytest_asyncio
from aioresponses import aioresponses
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pipeline.backends import roboflow_detect
from pipeline.backends.roboflow_detect import RoboflowDetectClient
from pipeline.backends.roboflow_upload import RoboflowUploadClient
from pipeline.cli import main
from pipeline.errors import FatalError, PermanentError, TransientError
from pipeline.jobspec.stage_settings import LabelSettings, UploadSettings
from pipeline.limiter import Limiter
from pipeline.records import (
    ImageUpload,
    InputImage,
    ItemRecord,
    LabelRecord,
    OutputFile,
    Prediction,
    UploadAnswer,
    UploadRecord,
)
from pipeline.retry import RetryPolicy
from pipeline.run.pool import RunStop
from pipeline.run.stages import StageContext
from pipeline.stages.label import LabelStage
from pipeline.stages.remote import RemoteCalls
from pipeline.stages.upload import UploadStage
from pipeline.voc import voc_xml

KEY = "rf-label-UNIQUE-5be0c2"
HOST = "https://serverless.roboflow.test"
DETECT = re.compile(r"^https://serverless\.roboflow\.test/leaves/3\?.*$")
BASE = "https://api.roboflow.test"
ANNOTATE = re.compile(r"^https://api\.roboflow\.test/dataset/leaves/annotate/img123\?.*$")
READ_BACK = re.compile(r"^https://api\.roboflow\.test/ws/leaves/images/img123\?.*$")


def png(width: int = 40, height: int = 30) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def sent(mock_http: aioresponses) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (verb, str(url), call.kwargs)
        for (verb, url), calls in mock_http.requests.items()
        for call in calls
    ]


PREDICTION = {
    "x": 20.5,
    "y": 15,
    "width": 9,
    "height": 6,
    "class": "leaf",
    "confidence": 0.87,
    "class_id": 0,
    "detection_id": "d1",
}


# ---- the detection client ---------------------------------------------------------------


@pytest_asyncio.fixture
async def detector() -> AsyncIterator[RoboflowDetectClient]:
    async with RoboflowDetectClient(
        HOST + "/",
        KEY,
        model="leaves/3",
        confidence=0.4,
        overlap=0.25,
        concurrency=2,
        timeout_s=5,
    ) as client:
        yield client


async def test_detect_sends_roboflows_request_and_reads_predictions(
    detector: RoboflowDetectClient, mock_http: aioresponses
) -> None:
    """POST {api_url}/{project}/{version}, key and thresholds (0-100) in the query, the
    image's base64 as a form body; predictions come back as the API gave them."""
    image = png()
    mock_http.post(
        DETECT, payload={"image": {"width": 40, "height": 30}, "predictions": [PREDICTION]}
    )
    found = await detector.detect(image)
    assert found == (Prediction(20.5, 15.0, 9.0, 6.0, "leaf", 0.87),)
    [(method, url, kwargs)] = sent(mock_http)
    parts = urlsplit(url)
    assert (method, parts.netloc, parts.path) == ("POST", "serverless.roboflow.test", "/leaves/3")
    assert parse_qs(parts.query) == {
        "api_key": [KEY],
        "confidence": ["40"],
        "overlap": ["25"],
        "format": ["json"],
    }
    assert kwargs["data"] == base64.b64encode(image)
    assert kwargs["headers"]["Content-Type"] == "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("status", "advice"),
    [(401, "label.api_key_env"), (403, "label.api_key_env"), (404, "label.model")],
)
async def test_refused_key_or_unknown_model_is_fatal_and_says_which_key(
    detector: RoboflowDetectClient, mock_http: aioresponses, status: int, advice: str
) -> None:
    mock_http.post(DETECT, status=status, payload={"error": {"message": f"nope {KEY}"}})
    with pytest.raises(FatalError) as caught:
        await detector.detect(png())
    assert caught.value.status == status
    assert advice in str(caught.value)
    assert KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"status": 429, "headers": {"Retry-After": "2"}}, TransientError),
        ({"status": 503, "payload": {"error": "busy"}}, TransientError),
        ({"status": 200, "body": "not json"}, TransientError),
        ({"status": 200, "payload": {"predictions": [{"x": "a"}]}}, TransientError),
        ({"status": 200, "payload": {"message": "queued"}}, TransientError),
    ],
    ids=["429", "503", "not-json", "bad-prediction", "no-predictions"],
)
async def test_failed_answers_are_typed(
    detector: RoboflowDetectClient,
    mock_http: aioresponses,
    answer: dict[str, Any],
    error: type[Exception],
) -> None:
    mock_http.post(DETECT, **answer)
    with pytest.raises(error):
        await detector.detect(png())


async def test_a_413_sends_the_image_shrunk_and_scales_the_boxes_back(
    detector: RoboflowDetectClient, mock_http: aioresponses
) -> None:
    """The server refuses the size: the image goes again at half size, and the boxes it
    finds there come back in the stored image's pixels."""
    image = png(400, 300)
    mock_http.post(DETECT, status=413, payload={"error": {"message": "too large"}})
    half = {"x": 100, "y": 75, "width": 20, "height": 10, "class": "leaf", "confidence": 0.9}
    mock_http.post(DETECT, payload={"predictions": [half]})
    [found] = await detector.detect(image)
    assert (found.x, found.y, found.width, found.height) == (200, 150, 40, 20)
    first, second = (base64.b64decode(k["data"]) for _m, _u, k in sent(mock_http))
    assert first == image
    with Image.open(io.BytesIO(second)) as small:
        assert small.size == (200, 150)


async def test_an_image_over_the_hosted_limit_is_shrunk_before_it_is_sent(
    detector: RoboflowDetectClient, mock_http: aioresponses, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = png(400, 300)
    monkeypatch.setattr(roboflow_detect, "MAX_REQUEST_BYTES", len(image) // 2)
    mock_http.post(DETECT, payload={"predictions": []})
    assert await detector.detect(image) == ()
    [(_m, _u, kwargs)] = sent(mock_http)
    assert len(kwargs["data"]) <= len(image) // 2


async def test_an_image_refused_at_every_size_fails_for_good(
    detector: RoboflowDetectClient, mock_http: aioresponses
) -> None:
    for _ in range(10):
        mock_http.post(DETECT, status=413, payload={"error": {"message": "too large"}})
    with pytest.raises(PermanentError, match="413"):
        await detector.detect(png(300, 300))


# ---- the annotation client --------------------------------------------------------------


@pytest_asyncio.fixture
async def uploader() -> AsyncIterator[RoboflowUploadClient]:
    async with RoboflowUploadClient(
        BASE, KEY, project="leaves", concurrency=2, timeout_s=5
    ) as client:
        yield client


async def test_annotate_sends_the_voc_file_as_roboflow_python_does(
    uploader: RoboflowUploadClient, mock_http: aioresponses
) -> None:
    mock_http.post(ANNOTATE, payload={"success": True})
    text = voc_xml("abc-0.png", 40, 30, [Prediction(20, 15, 10, 6, "leaf", 0.9)])
    already = await uploader.annotate("img123", "abc-0.xml", text, prediction=True)
    assert already is False
    [(method, url, kwargs)] = sent(mock_http)
    assert method == "POST"
    assert urlsplit(url).path == "/dataset/leaves/annotate/img123"
    assert parse_qs(urlsplit(url).query) == {
        "api_key": [KEY],
        "name": ["abc-0.xml"],
        "prediction": ["true"],
    }
    assert kwargs["data"] == text.encode()
    assert kwargs["headers"]["Content-Type"] == "text/plain"


@pytest.mark.parametrize(
    ("status", "message"),
    [(409, "Conflict"), (400, "Image was already annotated.")],
)
async def test_already_annotated_counts_as_success(
    uploader: RoboflowUploadClient, mock_http: aioresponses, status: int, message: str
) -> None:
    mock_http.post(ANNOTATE, status=status, payload={"error": {"message": message}})
    assert await uploader.annotate("img123", "a.xml", "<annotation/>", prediction=False) is True


async def test_an_invalid_annotation_fails_loudly(
    uploader: RoboflowUploadClient, mock_http: aioresponses
) -> None:
    mock_http.post(ANNOTATE, status=400, payload={"error": {"message": "Invalid annotation"}})
    with pytest.raises(PermanentError, match="Invalid annotation"):
        await uploader.annotate("img123", "a.xml", "<annotation/>", prediction=True)


@pytest.mark.parametrize(
    ("payload", "kept"),
    [
        ({"image": {"id": "img123", "annotation": {"boxes": [{"label": "a"}] * 3}}}, 3),
        ({"image": {"id": "img123", "annotation": {"width": 4, "height": 4, "boxes": []}}}, 0),
        ({"image": {"id": "img123"}}, 0),
        ({"something": "else"}, None),
    ],
)
async def test_read_back_counts_the_boxes_roboflow_kept(
    uploader: RoboflowUploadClient,
    mock_http: aioresponses,
    payload: dict[str, Any],
    kept: int | None,
) -> None:
    mock_http.get(READ_BACK, payload=payload)
    assert await uploader.boxes_kept("ws", "img123") == kept
    [(method, url, _kwargs)] = sent(mock_http)
    assert (method, parse_qs(urlsplit(url).query)) == ("GET", {"api_key": [KEY]})


# ---- VOC: centre form to corners --------------------------------------------------------


@given(
    boxes=st.lists(
        st.tuples(
            st.integers(0, 500), st.integers(0, 400), st.integers(1, 100), st.integers(1, 80)
        ),
        max_size=5,
    )
)
def test_voc_corners_are_the_centre_form_converted_exactly(
    boxes: list[tuple[int, int, int, int]],
) -> None:
    """Boxes drawn from pixel corners, given in the API's centre form, come back as the
    same corners (clipped to the image)."""
    width, height = 600, 480
    predictions = [
        Prediction(x0 + w / 2, y0 + h / 2, w, h, f"c{i}", 0.5)
        for i, (x0, y0, w, h) in enumerate(boxes)
    ]
    root = ElementTree.fromstring(voc_xml("k-0.png", width, height, predictions))
    assert root.findtext("filename") == "k-0.png"
    objects = root.findall("object")
    assert [o.findtext("name") for o in objects] == [p.class_name for p in predictions]
    for obj, (x0, y0, w, h) in zip(objects, boxes, strict=True):
        box = obj.find("bndbox")
        assert box is not None
        corners = [float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]
        assert corners == [x0, y0, min(x0 + w, width), min(y0 + h, height)]


# ---- the stages, with fake clients ------------------------------------------------------


@dataclass
class FakeDetector:
    answers: dict[bytes, tuple[Prediction, ...]] = field(default_factory=dict)
    asked: list[bytes] = field(default_factory=list)
    fail_with: Exception | None = None

    async def detect(self, data: bytes) -> tuple[Prediction, ...]:
        self.asked.append(data)
        if self.fail_with is not None:
            raise self.fail_with
        return self.answers.get(data, ())

    async def aclose(self) -> None:
        pass


@dataclass
class FakeProject:
    uploads: list[str] = field(default_factory=list)
    annotations: list[tuple[str, str, str, bool]] = field(default_factory=list)
    kept: int | None = None
    annotate_error: Exception | None = None

    async def upload(self, image: ImageUpload) -> UploadAnswer:
        self.uploads.append(image.name)
        return UploadAnswer(id=f"id-{image.name}", duplicate=False)

    async def annotate(
        self, image_id: str, name: str, annotation: str, *, prediction: bool
    ) -> bool:
        if self.annotate_error is not None:
            raise self.annotate_error
        self.annotations.append((image_id, name, annotation, prediction))
        return False

    async def boxes_kept(self, workspace: str, image_id: str) -> int | None:
        return self.kept

    async def aclose(self) -> None:
        pass


def stored(out: Path, name: str, colour: tuple[int, int, int]) -> tuple[OutputFile, bytes]:
    folder = out / "images" / "src"
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    data = buffer.getvalue()
    (folder / name).write_bytes(data)
    return OutputFile(f"images/src/{name}", hashlib.sha256(data).hexdigest(), 40, 30), data


def record(*outputs: OutputFile) -> ItemRecord:
    return ItemRecord(
        key="ab" * 32,
        status="ok",
        source="src",
        vars={},
        repeat=0,
        input=InputImage("url", "https://example.test/a.png"),
        prompt="a leaf",
        params={"n": len(outputs)},
        outputs=outputs,
    )


def calls(stop: RunStop, what: str) -> RemoteCalls:
    return RemoteCalls(
        what,
        policy=RetryPolicy(max_attempts=2, base_s=0.0, cap_s=0.0),
        limiter=Limiter(rate=None, image_rate=None, concurrency=4),
        stop=stop,
        max_consecutive_failures=10,
    )


def context(out: Path, stop: RunStop) -> StageContext:
    return StageContext(stop=stop, out_dir=out, day="2026-12-07", backend_root=None)


def never() -> bool:
    return False


LEAF = Prediction(10, 10, 4, 4, "leaf", 0.9)
ROCK = Prediction(30, 20, 6, 6, "rock", 0.8)


async def test_label_keeps_the_classes_asked_for_and_flags_an_empty_output(
    tmp_path: Path,
) -> None:
    stop = RunStop()
    first, first_data = stored(tmp_path, "k-0.png", (1, 2, 3))
    second, second_data = stored(tmp_path, "k-1.png", (4, 5, 6))
    detector = FakeDetector(answers={first_data: (LEAF, ROCK), second_data: (ROCK,)})
    settings = LabelSettings(model="leaves/3", classes=("leaf",), require_detection=True)
    stage = LabelStage(
        settings, client=detector, calls=calls(stop, "label"), context=context(tmp_path, stop)
    )
    item = record(first, second)
    assert stage.needs(item)
    done = await stage.process(item, never)
    assert done is not None
    one, two = done.outputs
    assert one.labels == LabelRecord("leaves/3", (LEAF,))
    assert one.flags == ()
    assert two.labels == LabelRecord("leaves/3", ())
    assert two.flags == ("no_detection",)
    assert not stage.needs(done)
    # the manifest form carries them, and reads back the same
    line = done.to_json()
    assert line["outputs"][0]["labels"] == {
        "model": "leaves/3",
        "predictions": [
            {"x": 10, "y": 10, "width": 4, "height": 4, "class": "leaf", "confidence": 0.9}
        ],
    }
    assert line["outputs"][1]["flags"] == ["no_detection"]
    assert ItemRecord.from_json(line) == done


async def test_a_failed_detection_is_recorded_and_asked_again_next_time(tmp_path: Path) -> None:
    stop = RunStop()
    output, _data = stored(tmp_path, "k-0.png", (1, 2, 3))
    detector = FakeDetector(fail_with=PermanentError("bad image", kind="http_status", status=400))
    stage = LabelStage(
        LabelSettings(model="leaves/3"),
        client=detector,
        calls=calls(stop, "label"),
        context=context(tmp_path, stop),
    )
    done = await stage.process(record(output), never)
    assert done is not None
    labels = done.outputs[0].labels
    assert labels is not None
    assert labels.error is not None
    assert not labels.done
    assert stage.failed == 1
    assert stage.needs(done)  # the next run asks again


async def test_a_refused_key_stops_the_run(tmp_path: Path) -> None:
    stop = RunStop()
    output, _data = stored(tmp_path, "k-0.png", (1, 2, 3))
    detector = FakeDetector(fail_with=FatalError("refused", kind="http_status", status=401))
    stage = LabelStage(
        LabelSettings(model="leaves/3"),
        client=detector,
        calls=calls(stop, "label"),
        context=context(tmp_path, stop),
    )
    assert await stage.process(record(output), never) is None
    assert stop.reason == "fatal"


def upload_stage(
    tmp_path: Path, project: FakeProject, *, annotate: bool = True, **settings: Any
) -> tuple[UploadStage, RunStop]:
    stop = RunStop()
    stage = UploadStage(
        UploadSettings(project="leaves", **settings),
        job="job",
        client=project,
        calls=calls(stop, "upload"),
        context=context(tmp_path, stop),
        annotate=annotate,
    )
    return stage, stop


def labelled(
    output: OutputFile, *predictions: Prediction, flags: tuple[str, ...] = ()
) -> OutputFile:
    return OutputFile(
        output.path,
        output.sha256,
        output.width,
        output.height,
        flags=flags,
        labels=LabelRecord("leaves/3", predictions),
    )


async def test_each_uploaded_image_gets_its_annotation_once(tmp_path: Path) -> None:
    project = FakeProject()
    stage, _stop = upload_stage(tmp_path, project)
    output, _data = stored(tmp_path, "3f2a-0.png", (1, 2, 3))
    item = record(labelled(output, LEAF, ROCK))
    done = await stage.process(item, never)
    assert done is not None
    upload = done.outputs[0].upload
    assert upload == UploadRecord("leaves", id="id-3f2a-0.png", annotated=True)
    [(image_id, name, text, prediction)] = project.annotations
    assert (image_id, name, prediction) == ("id-3f2a-0.png", "3f2a-0.xml", True)
    root = ElementTree.fromstring(text)
    assert root.findtext("filename") == "3f2a-0.png"
    assert [o.findtext("name") for o in root.findall("object")] == ["leaf", "rock"]
    assert done.to_json()["outputs"][0]["upload"]["annotated"] is True
    assert not stage.needs(done)
    assert await stage.process(done, never) is None
    assert project.uploads == ["3f2a-0.png"]


async def test_as_ground_truth_sends_prediction_false(tmp_path: Path) -> None:
    project = FakeProject()
    stage, _stop = upload_stage(tmp_path, project, as_ground_truth=True)
    output, _data = stored(tmp_path, "a-0.png", (1, 2, 3))
    await stage.process(record(labelled(output, LEAF)), never)
    assert [a[3] for a in project.annotations] == [False]


async def test_flagged_outputs_are_held_back_unless_include_flagged(tmp_path: Path) -> None:
    output, _data = stored(tmp_path, "a-0.png", (1, 2, 3))
    flagged = record(labelled(output, LEAF, flags=("unchanged",)))
    held = FakeProject()
    stage, _stop = upload_stage(tmp_path, held)
    assert not stage.needs(flagged)
    sent_anyway = FakeProject()
    stage, _stop = upload_stage(tmp_path, sent_anyway, include_flagged=True)
    assert stage.needs(flagged)
    await stage.process(flagged, never)
    assert sent_anyway.uploads == ["a-0.png"]


async def test_an_unlabelled_output_waits_for_its_labels(tmp_path: Path) -> None:
    output, _data = stored(tmp_path, "a-0.png", (1, 2, 3))
    stage, _stop = upload_stage(tmp_path, FakeProject())
    assert not stage.needs(record(output))
    assert stage.needs(record(labelled(output)))  # labelled, no boxes: a negative example
    without_label_block, _stop = upload_stage(tmp_path, FakeProject(), annotate=False)
    assert without_label_block.needs(record(output))


async def test_a_failed_annotation_keeps_the_upload_and_is_tried_again(tmp_path: Path) -> None:
    project = FakeProject(
        annotate_error=PermanentError("Invalid annotation", kind="http_status", status=400)
    )
    stage, _stop = upload_stage(tmp_path, project)
    output, _data = stored(tmp_path, "a-0.png", (1, 2, 3))
    done = await stage.process(record(labelled(output, LEAF)), never)
    assert done is not None
    upload = done.outputs[0].upload
    assert upload is not None
    assert upload.id == "id-a-0.png"
    assert upload.annotated is False
    assert upload.annotation_error is not None
    assert stage.failed == 1
    assert stage.needs(done)
    project.annotate_error = None
    again = await stage.process(done, never)
    assert again is not None
    assert again.outputs[0].upload is not None
    assert again.outputs[0].upload.annotated is True
    assert project.uploads == ["a-0.png"]  # the image was not sent twice


@pytest.mark.parametrize(("kept", "loud"), [(0, True), (1, True), (2, False)])
async def test_read_back_says_loudly_when_roboflow_dropped_the_boxes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kept: int, loud: bool
) -> None:
    project = FakeProject(kept=kept)
    stage, _stop = upload_stage(tmp_path, project, workspace="ws")
    first, _ = stored(tmp_path, "a-0.png", (1, 2, 3))
    second, _ = stored(tmp_path, "b-0.png", (4, 5, 6))
    await stage.process(record(labelled(first, LEAF, ROCK)), never)
    await stage.process(record(labelled(second, LEAF)), never)
    check = stage.summary()["annotation_check"]
    assert check == {
        "image_id": "id-a-0.png",
        "sent": 2,
        "kept": kept,
        "ok": not loud,
        "error": None,
    }
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert bool(errors) == loud
    assert (stage.failed == 1) == loud


@pytest.mark.parametrize(
    ("value", "message"),
    [(40, "looks like a percentage: write it as a fraction 0-1 (0.4)"), (-1, "between 0 and 1")],
)
def test_a_threshold_outside_0_1_says_how_to_write_it(
    tmp_path: Path, value: float, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "version: 1\nname: t\nbackend: {kind: mock}\nsources:\n  - {name: s, prompt: a cat}\n"
        f"label:\n  model: leaves/3\n  confidence: {value}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(path)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "spec.yaml:8 label.confidence" in line
    assert message in line
