"""Large answers: base64 images decoded straight from the raw body, parsed off the loop."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from checks import run_spec, write_job_spec

from pipeline.backends import inline
from pipeline.backends.base import elide_images, parse_images
from pipeline.backends.inline import load_answer
from pipeline.errors import TransientError
from pipeline.mockapi.server import MockConfig, MockServer

IMAGE = bytes(range(256)) * 41 + b"end"  # 10,499 bytes: the base64 ends in padding
B64 = base64.b64encode(IMAGE).decode()


def _answer(entries: str, extra: str = "") -> bytes:
    return ('{"data": [' + entries + "]" + extra + "}").encode()


ANSWERS = {
    "plain": _answer(f'{{"b64_json": "{B64}", "id": "a"}}'),
    "spaces around the colon": _answer(f'{{"b64_json" :\n "{B64}"}}'),
    "two images": _answer(f'{{"b64_json": "{B64}"}}, {{"b64_json": "{B64[:-4]}"}}'),
    "escaped slashes": _answer('{"b64_json": "' + B64.replace("/", "\\/") + '"}'),
    "line breaks": _answer('{"b64_json": "' + B64[:76] + "\\n" + B64[76:] + '"}'),
    "key quoted inside a prompt": _answer(
        f'{{"b64_json": "{B64}", "revised_prompt": "say \\"b64_json\\": \\"QUJD\\""}}'
    ),
    "usage after the images": _answer(
        f'{{"b64_json": "{B64}"}}', ', "usage": {"output_tokens": 1056}'
    ),
    "a list at the top": f'[{{"b64_json": "{B64}"}}]'.encode(),
    "a url next to the data": _answer(f'{{"url": "http://x/y.png", "b64_json": "{B64}"}}'),
}


@pytest.mark.parametrize("raw", ANSWERS.values(), ids=ANSWERS.keys())
@pytest.mark.parametrize("chunk", [inline.INLINE_CHUNK_CHARS, 8])
def test_an_answer_gives_the_images_and_record_a_full_parse_gives(
    raw: bytes, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images and the manifest's elided answer are those of parsing the whole JSON."""
    monkeypatch.setattr(inline, "INLINE_CHUNK_CHARS", chunk)
    expected: Any = json.loads(raw)
    payload = load_answer(raw)
    assert parse_images(payload) == parse_images(expected)
    assert elide_images(payload) == elide_images(expected)


def test_an_image_decoded_in_pieces_is_the_image_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding a few characters at a time gives back every byte of the image."""
    monkeypatch.setattr(inline, "INLINE_CHUNK_CHARS", 12)
    (image,) = parse_images(load_answer(ANSWERS["plain"]))
    assert image.data == IMAGE


@pytest.mark.parametrize(
    "raw",
    [
        _answer(f'{{"b64_json": "{B64}"}}', ", oops"),  # invalid after the image
        _answer(f'{{"b64_json": "{B64}"'),  # truncated
        f'{{"data": [{{"b64_json": "{B64}"}}]}} trailing'.encode(),
    ],
    ids=["garbage after the image", "truncated", "text after the JSON"],
)
def test_invalid_json_around_a_valid_image_is_refused(raw: bytes) -> None:
    """A good image does not make a broken answer pass: the JSON is still checked whole."""
    with pytest.raises(json.JSONDecodeError):
        load_answer(raw)


@pytest.mark.parametrize(
    "value",
    [B64[:-1] + "!", B64 + "=", "=" + B64[1:], B64[:100] + "=" + B64[101:], ""],
    ids=["bad character", "excess padding", "padding first", "padding inside", "empty"],
)
def test_invalid_base64_is_a_bad_image(value: str) -> None:
    """Image data that is not base64 fails the item as bad_image, as before."""
    payload = load_answer(_answer(f'{{"b64_json": "{value}"}}'))
    with pytest.raises(TransientError) as caught:
        parse_images(payload)
    assert caught.value.kind == "bad_image"


async def test_a_job_of_large_answers_leaves_no_thread_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The threads that parse answers and store images end with the run."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", "sk-large")
    config = MockConfig(photo_format="png", response_shape="b64_json", max_px=256)
    async with MockServer(config) as server:
        spec = write_job_spec(tmp_path, server.base_url, prompts=3, size="256x256")
        result = await run_spec(spec)
    assert result.exit_code == 0
    assert result.summary["ok"] == 3
    assert [t.name for t in threading.enumerate() if t.name.startswith("synthaug-")] == []
