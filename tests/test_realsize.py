"""Real-size answers: the mock's photo-like images, and jobs that store them whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from checks import assert_outputs_valid, run_spec, write_job_spec

from pipeline.manifest.log import read_latest
from pipeline.mockapi.config import PhotoFormat, ResponseShape
from pipeline.mockapi.image import photo
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.store.image_check import check_image


@pytest.mark.parametrize(("fmt", "ext"), [("png", "png"), ("jpeg", "jpg")])
def test_photo_images_weigh_what_a_photo_does(fmt: str, ext: str) -> None:
    """A photo-like image is a whole image of the asked size, far from a flat colour."""
    data = photo(0, 128, 96, fmt)
    info = check_image(data)
    assert (info.format, info.width, info.height) == (ext, 128, 96)
    assert len(data) > 128 * 96 // (2 if fmt == "png" else 8)


@pytest.mark.parametrize(
    ("fmt", "shape"),
    [
        pytest.param("png", "b64_json", id="png-base64"),
        pytest.param("png", "data", id="png-url"),
        pytest.param("jpeg", "b64_json", id="jpeg-base64"),
        pytest.param("jpeg", "data", id="jpeg-url"),
    ],
)
async def test_a_job_of_photo_answers_stores_every_image_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: PhotoFormat, shape: ResponseShape
) -> None:
    """Large answers (parsed off the loop) end ok, with the format's extension and size."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", "sk-realsize")
    config = MockConfig(photo_format=fmt, response_shape=shape, max_px=256)
    async with MockServer(config) as server:
        spec = write_job_spec(tmp_path, server.base_url, prompts=3, size="256x256")
        result = await run_spec(spec)
    assert result.exit_code == 0
    records = list(read_latest(tmp_path / "out" / "manifest.jsonl").values())
    assert [r["status"] for r in records] == ["ok"] * 3
    outputs = [o for r in records for o in r["outputs"]]
    ext = "jpg" if fmt == "jpeg" else "png"
    assert all(o["path"].endswith("." + ext) for o in outputs)
    assert all((o["width"], o["height"]) == (256, 256) for o in outputs)
    assert_outputs_valid(tmp_path / "out")
