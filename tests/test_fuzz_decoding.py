"""Fuzz request decoding and image loading: over 100,000 hypothesis cases in all, and nothing
may come out but a valid request or image, or a named error.

``AnalysisRequest.from_message`` gets arbitrary JSON and mutated valid messages;
``decode_image`` gets random bytes and mutated PNG, JPEG, GIF, WebP, BMP and TIFF files. The
cases are derandomized (the same every run, so CI is reproducible); set ``VLMQ_FUZZ_SCALE``
to run more (e.g. 10) with a random seed.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from producer.errors import InvalidImage, InvalidRequest
from producer.images import decode_image
from producer.protocol import AnalysisRequest, Limits

SCALE = float(os.environ.get("VLMQ_FUZZ_SCALE", "1"))
BUDGETS = {  # cases per test
    "messages": 45_000,
    "random_bytes": 15_000,
    "mutated_images": 45_000,
}
assert sum(BUDGETS.values()) >= 100_000

# A smaller pixel limit than the default keeps each case fast; the checks are the same code.
LIMITS = Limits(max_image_pixels=1_000_000, max_question_chars=4000, max_new_tokens=2048)


def fuzz(budget: str) -> Callable[[Callable[..., Any]], Any]:
    return settings(
        max_examples=int(BUDGETS[budget] * SCALE),
        deadline=None,
        derandomize=SCALE == 1,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def run_counted(test: Any, budget: str) -> None:
    """Run a hypothesis test and check that it ran its whole budget of cases."""
    test.calls = 0
    test()
    assert test.calls >= int(BUDGETS[budget] * SCALE) * 0.99, f"only {test.calls} cases"


# -- request decoding ---------------------------------------------------------------------
#
# Each case is built from hypothesis' bytes by a small interpreter (as atheris'
# FuzzedDataProvider does): cheap per case, so 100,000 cases fit in CI, and hypothesis still
# steers and shrinks the bytes.


class Provider:
    """Turns fuzz bytes into choices; once the bytes run out every choice is 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, size: int = 4, signed: bool = True) -> int:
        raw = bytes(self.byte() for _ in range(size))
        return int.from_bytes(raw, "little", signed=signed)

    def pick(self, options: list[Any]) -> Any:
        return options[self.byte() % len(options)]

    def bytes(self, most: int) -> bytes:
        n = self.byte() % (most + 1)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def text(self, most: int = 40) -> str:
        return self.bytes(most).decode("utf-8", errors="replace")

    def float(self) -> float:
        special = [0.0, -0.0, 1.0, 0.5, 2.0, 2.0000001, -1.0, math.inf, -math.inf, math.nan, 1e308]
        if self.byte() % 2:
            return self.pick(special)
        return struct.unpack("<d", bytes(self.byte() for _ in range(8)))[0]

    def json(self, depth: int = 0) -> Any:
        kind = self.byte() % (9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.byte() % 2)
        if kind == 2:
            return self.int(self.pick([1, 2, 4, 9]))
        if kind == 3:
            return self.float()
        if kind in (4, 5):
            return self.text()
        if kind in (6, 7):
            return [self.json(depth + 1) for _ in range(self.byte() % 4)]
        return {self.text(10): self.json(depth + 1) for _ in range(self.byte() % 4)}


VALID = AnalysisRequest(
    image_key="vlmq:image:" + "ab" * 32, question="What is in this picture?"
).to_message()


def field_value(p: Provider, name: str) -> Any:
    """A value for field ``name``: near the edges of what it allows, or anything."""
    near = {
        "image_key": lambda: p.pick(
            [VALID["image_key"], "vlmq:image:" + "AB" * 32, "vlmq:image:", "vlmq:image:" + "a" * 63]
        ),
        "question": lambda: p.pick(["", " ", "\x00", "?" * 4000, "?" * 4001, p.text(200)]),
        "max_new_tokens": lambda: p.pick([0, 1, 2048, 2049, -1, True, 2.0, "7", p.int(2)]),
        "temperature": lambda: p.pick([0, 2, 2.0001, -0.0, p.float()]),
        "top_p": lambda: p.pick([0, 1, 1.0001, 1e-300, p.float()]),
        "submitted_at": lambda: p.pick([0, -1, 2**63, p.float(), p.int(8)]),
        "model": lambda: p.pick([None, "tiny.fp32", "Tiny", "a" * 129, "-x", p.text(20)]),
    }
    return near[name]() if p.byte() % 2 else p.json()


def message_from(data: bytes) -> Any:
    """A mutated valid message (mostly), or any JSON value."""
    p = Provider(data)
    if p.byte() % 8 == 0:
        return p.json()
    message = dict(VALID)
    for name in VALID:
        action = p.byte() % 6
        if action == 0:
            message[name] = field_value(p, name)
        elif action == 1:
            del message[name]
    if p.byte() % 8 == 0:
        message[p.pick([p.text(10), "Image_key", "", "question "])] = p.json()
    return message


def check_message(kwargs: Any) -> None:
    try:
        request = AnalysisRequest.from_message(kwargs, LIMITS)
    except InvalidRequest as exc:
        assert str(exc)
        return
    # Accepted: it must really be within the limits.
    assert isinstance(request.question, str) and request.question.strip()
    assert len(request.question) <= LIMITS.max_question_chars
    assert 1 <= request.max_new_tokens <= LIMITS.max_new_tokens
    assert 0 <= request.temperature <= 2 and 0 < request.top_p <= 1
    assert math.isfinite(request.submitted_at)


def test_fuzz_messages() -> None:
    @fuzz("messages")
    @given(st.binary(max_size=300))
    def one(data: bytes) -> None:
        one.calls += 1
        check_message(message_from(data))

    run_counted(one, "messages")


# -- image loading ------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    rgb = Image.new("RGB", (24, 16), (200, 30, 90))
    rgb.putpixel((3, 4), (0, 255, 0))
    frames = [Image.new("P", (12, 12), i) for i in (1, 2)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return [
        _encode(rgb, "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(rgb.convert("P"), "PNG", transparency=0),
        _encode(Image.new("I;16", (8, 8), 40000), "PNG"),
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "JPEG", progressive=True),
        _encode(rgb.convert("CMYK"), "JPEG"),
        animated.getvalue(),
        _encode(rgb, "WEBP", quality=70),
        _encode(rgb, "WEBP", lossless=True),
        _encode(rgb, "BMP"),
        _encode(rgb, "TIFF"),
    ]


SEEDS = _seeds()


def image_from(data: bytes) -> bytes:
    """A valid image of some format, mutated: bytes flipped, cut, inserted, spliced."""
    p = Provider(data)
    image = bytearray(p.pick(SEEDS))
    for _ in range(p.byte() % 7):
        action = p.byte() % 5
        position = p.int(2, signed=False) % (len(image) + 1)
        if action == 0 and position < len(image):  # flip a byte, headers and sizes included
            image[position] = p.byte()
        elif action == 1:  # cut
            del image[position:]
        elif action == 2:  # insert junk
            image[position:position] = p.bytes(16) or b"\xff"
        elif action == 3:  # a big 32-bit value (dimensions, chunk lengths)
            image[position : position + 4] = p.int(4).to_bytes(4, "little", signed=True)
        else:  # splice another format's bytes in
            other = p.pick(SEEDS)
            image[position:] = other[p.int(2, signed=False) % (len(other) + 1) :]
    return bytes(image)


def check_image(data: bytes) -> None:
    try:
        image = decode_image(data, LIMITS)
    except InvalidImage as exc:
        assert str(exc)
        return
    assert image.mode == "RGB"
    assert image.width * image.height <= LIMITS.max_image_pixels


def test_fuzz_random_bytes_as_images() -> None:
    @fuzz("random_bytes")
    @given(st.binary(max_size=512))
    def one(data: bytes) -> None:
        one.calls += 1
        check_image(data)

    run_counted(one, "random_bytes")


def test_fuzz_mutated_images() -> None:
    @fuzz("mutated_images")
    @given(st.binary(max_size=120))
    def one(data: bytes) -> None:
        one.calls += 1
        check_image(image_from(data))

    run_counted(one, "mutated_images")


def test_seeds_decode() -> None:
    assert all(decode_image(seed, LIMITS).mode == "RGB" for seed in SEEDS)
