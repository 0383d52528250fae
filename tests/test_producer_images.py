"""Reading image sources and decoding hostile or unusual images into RGB."""

import contextlib
import io
import os
import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from producer.errors import ImageFetchError, InvalidImage
from producer.images import decode_image, read_image_source
from producer.protocol import Limits

LIMITS = Limits()
WHITE = (255, 255, 255)
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels and has no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 8) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- decode_image: modes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "pixel"),
    [
        pytest.param(encode(Image.new("RGB", (3, 2), RED), "PNG"), RED, id="RGB"),
        pytest.param(encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), WHITE, id="CMYK"),
        pytest.param(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF"), RED, id="CMYK"),
        pytest.param(encode(Image.new("I;16", (4, 4), 65535), "PNG"), WHITE, id="I;16"),
        pytest.param(encode(Image.new("I;16", (4, 4), 0), "PNG"), (0, 0, 0), id="I;16-black"),
        pytest.param(encode(Image.new("I", (4, 4), 70_000), "TIFF"), WHITE, id="I-clamped"),
        pytest.param(encode(Image.new("F", (4, 4), -3.0), "TIFF"), (0, 0, 0), id="F-clamped"),
        pytest.param(encode(Image.new("L", (4, 4), 128), "PNG"), (128, 128, 128), id="L"),
        pytest.param(encode(Image.new("1", (4, 4), 1), "PNG"), WHITE, id="1"),
        pytest.param(encode(Image.new("LA", (4, 4), (0, 0)), "PNG"), WHITE, id="LA-clear"),
        pytest.param(encode(Image.new("LA", (4, 4), (0, 255)), "PNG"), (0, 0, 0), id="LA"),
        pytest.param(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"), WHITE, id="RGBA"),
        pytest.param(encode(Image.new("RGBA", (4, 4), (*BLUE, 255)), "PNG"), BLUE, id="RGBA"),
        pytest.param(
            encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"), (127, 127, 127), id="half"
        ),
    ],
)
def test_modes_become_rgb(data: bytes, pixel: tuple[int, int, int]) -> None:
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB"
    assert close(image.getpixel((0, 0)), pixel, tolerance=2)


def test_sixteen_bit_and_float_are_scaled_not_clipped() -> None:
    sixteen = Image.new("I;16", (2, 1))
    sixteen.putpixel((0, 0), 32768)
    assert close(decode_image(encode(sixteen, "PNG"), LIMITS).getpixel((0, 0)), (128,) * 3, 1)

    wide = Image.new("I", (2, 1))
    wide.putpixel((1, 0), 1000)
    assert [decode_image(encode(wide, "TIFF"), LIMITS).getpixel((x, 0)) for x in (0, 1)] == [
        (0, 0, 0),
        WHITE,
    ]

    unit = Image.new("F", (2, 1))
    unit.putpixel((1, 0), 1.0)
    assert decode_image(encode(unit, "TIFF"), LIMITS).getpixel((1, 0)) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_composites_on_white(fmt: str) -> None:
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([*RED, *BLUE])
    palette.putpixel((1, 0), 1)
    image = decode_image(encode(palette, fmt, transparency=0), LIMITS)
    assert [image.getpixel((x, 0)) for x in (0, 1)] == [WHITE, BLUE]


def test_exif_orientation_is_applied() -> None:
    landscape = Image.new("RGB", (40, 20), RED)
    landscape.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode_image(encode(landscape, "JPEG", exif=exif, quality=95), LIMITS)
    assert image.size == (20, 40)
    assert close(image.getpixel((10, 5)), RED, 30)
    assert close(image.getpixel((10, 35)), BLUE, 30)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],
    ids=["GIF", "WebP", "APNG"],
)
def test_animation_gives_first_frame(fmt: str, options: dict) -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **options)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB"
    assert close(image.getpixel((4, 4)), RED)


def test_one_pixel() -> None:
    image = decode_image(encode(Image.new("RGB", (1, 1), BLUE), "PNG"), LIMITS)
    assert image.size == (1, 1)
    assert image.getpixel((0, 0)) == BLUE


# --- decode_image: refusals --------------------------------------------------------------


def test_huge_header_bomb_is_refused() -> None:
    with pytest.raises(InvalidImage, match="too many pixels"):
        decode_image(png_header_only(100_000, 100_000), LIMITS)


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # Over vlmq's limit, under Pillow's own; there is no pixel data to decode.
    with pytest.raises(InvalidImage, match=r"10000x5000 = 50,000,000 pixels.*40,000,000"):
        decode_image(png_header_only(10_000, 5_000), LIMITS)


def test_pixel_limit_from_limits() -> None:
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    with pytest.raises(InvalidImage, match="VLMQ_MAX_IMAGE_PIXELS"):
        decode_image(data, Limits(max_image_pixels=399))
    assert decode_image(data, Limits(max_image_pixels=400)).size == (20, 20)


def test_byte_limit() -> None:
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    with pytest.raises(InvalidImage, match="VLMQ_MAX_IMAGE_BYTES"):
        decode_image(data, Limits(max_image_bytes=len(data) - 1))


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "empty"),
        (bytes(random.Random(0).randrange(256) for _ in range(4096)), "not an image"),
        (b"GIF89a", "image"),
        (encode(Image.new("RGB", (64, 64), RED), "PNG")[:60], "(?i)truncated"),
        (encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:400], "(?i)truncated"),
    ],
    ids=["empty", "random", "gif-signature-only", "truncated-png", "truncated-jpeg"],
)
def test_garbage_is_invalid_image(data: bytes, says: str) -> None:
    with pytest.raises(InvalidImage, match=says):
        decode_image(data, LIMITS)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupted_files_only_ever_raise_invalid_image() -> None:
    rng = random.Random(1)
    noise = Image.effect_noise((24, 24), 60)
    originals = [
        encode(noise.convert("RGB"), "PNG"),
        encode(noise.convert("RGB"), "JPEG"),
        encode(noise.convert("P"), "GIF"),
        encode(noise.convert("RGBA"), "WEBP"),
        encode(noise.convert("CMYK"), "TIFF"),
        encode(noise.convert("RGB"), "BMP"),
    ]
    for original in originals:
        for _ in range(40):
            data = bytearray(original)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            with contextlib.suppress(InvalidImage):
                assert decode_image(bytes(data), LIMITS).mode == "RGB"


# --- read_image_source: local sources -------------------------------------------------------

PNG = encode(Image.new("RGB", (4, 4), RED), "PNG")


def test_path_and_pathlike(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(PNG)
    assert read_image_source(path, limits=LIMITS) == PNG
    assert read_image_source(str(path), limits=LIMITS) == PNG


@pytest.mark.parametrize("name", ["missing.png", "."])
def test_unreadable_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidImage, match="cannot read image file"):
        read_image_source(str(tmp_path / name), limits=LIMITS)


def test_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)  # nobody writes: reading it would wait forever
    with pytest.raises(InvalidImage, match="not a regular file"):
        read_image_source(fifo, limits=LIMITS)


def test_file_over_the_byte_limit(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(PNG)
    with pytest.raises(InvalidImage, match="VLMQ_MAX_IMAGE_BYTES"):
        read_image_source(path, limits=Limits(max_image_bytes=len(PNG) - 1))


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like(wrap: type) -> None:
    assert read_image_source(wrap(PNG), limits=LIMITS) == PNG
    with pytest.raises(InvalidImage, match="VLMQ_MAX_IMAGE_BYTES"):
        read_image_source(wrap(PNG), limits=Limits(max_image_bytes=10))


def test_pil_image_is_sent_as_rgb_png() -> None:
    data = read_image_source(Image.new("RGBA", (5, 3), (0, 0, 255, 0)), limits=LIMITS)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (5, 3))
    assert image.getpixel((0, 0)) == WHITE
    with pytest.raises(InvalidImage, match="pixels"):
        read_image_source(Image.new("L", (5, 3)), limits=Limits(max_image_pixels=14))


@pytest.mark.parametrize("source", [None, 42, ["a.png"], {"path": "a.png"}])
def test_wrong_type(source: object) -> None:
    with pytest.raises(InvalidImage, match="must be a path, an http\\(s\\) URL, bytes"):
        read_image_source(source, limits=LIMITS)  # type: ignore[arg-type]


# --- read_image_source: URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("file:///etc/passwd", "only http:// and https://"),
        ("ftp://example.com/cat.png", "only http:// and https://"),
        ("http://127.0.0.1:9/cat.png", "loopback"),
        ("http://localhost:9/cat.png", "loopback"),
        ("http://[::1]:9/cat.png", "loopback"),
        ("http://[::ffff:127.0.0.1]:9/cat.png", "loopback"),
        ("https://10.1.2.3/cat.png", "private"),
        ("http://192.168.0.1/cat.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://0.0.0.0:9/", "allow_private_urls"),
        ("http://100.64.0.1/", "non-public"),
    ],
)
def test_urls_refused_by_default(url: str, says: str) -> None:
    with pytest.raises(ImageFetchError, match=says):
        read_image_source(url, limits=LIMITS)


def test_credentials_and_query_stay_out_of_messages() -> None:
    with pytest.raises(ImageFetchError) as caught:
        read_image_source("ftp://user:secret@example.com/a.png?token=t0ps3cret", limits=LIMITS)
    assert "secret" not in str(caught.value)
    assert "t0ps3cret" not in str(caught.value)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/image.png":
            self._send(200, PNG, {"Content-Length": str(len(PNG))})
        elif self.path == "/declared-huge":
            self._send(200, b"x" * 10, {"Content-Length": str(10**9)})
        elif self.path == "/undeclared-huge":
            self._send(200, b"x" * 300_000, {})
        elif self.path == "/moved":
            self._send(302, b"", {"Location": "/image.png", "Content-Length": "0"})
        elif self.path == "/to-file":
            self._send(302, b"", {"Location": "file:///etc/passwd", "Content-Length": "0"})
        elif self.path == "/to-ftp":
            self._send(302, b"", {"Location": "ftp://127.0.0.1/x.png", "Content-Length": "0"})
        elif self.path == "/slow":
            time.sleep(1.0)
            self._send(200, PNG, {})
        elif self.path == "/trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self._send(404, b"not here", {"Content-Length": "8"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out leave broken pipes behind


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fetch(url: str, limits: Limits = LIMITS, timeout_s: float = 5.0) -> bytes:
    return read_image_source(url, limits=limits, allow_private_urls=True, timeout_s=timeout_s)


def test_fetch(server: str) -> None:
    assert fetch(f"{server}/image.png") == PNG
    assert fetch(f"{server}/moved") == PNG


def test_local_server_refused_by_default(server: str) -> None:
    with pytest.raises(ImageFetchError, match="loopback"):
        read_image_source(f"{server}/image.png", limits=LIMITS)


def test_fetch_byte_limit(server: str) -> None:
    small = Limits(max_image_bytes=100_000)
    with pytest.raises(ImageFetchError, match="1,000,000,000 bytes"):
        fetch(f"{server}/declared-huge", small)
    with pytest.raises(ImageFetchError, match="more than 100,000 bytes"):
        fetch(f"{server}/undeclared-huge", small)
    assert fetch(f"{server}/image.png", Limits(max_image_bytes=len(PNG))) == PNG


@pytest.mark.parametrize(("path", "says"), [("/nothing", "HTTP 404"), ("/to-file", "file")])
def test_fetch_errors(server: str, path: str, says: str) -> None:
    with pytest.raises(ImageFetchError, match=says):
        fetch(f"{server}{path}")


def test_redirect_to_other_scheme_is_not_followed(server: str) -> None:
    with pytest.raises(ImageFetchError, match="ftp"):
        fetch(f"{server}/to-ftp")


def test_fetch_timeouts(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out"):
        fetch(f"{server}/slow", timeout_s=0.2)
    with pytest.raises(ImageFetchError, match=r"longer than 0\.5 s"):
        fetch(f"{server}/trickle", timeout_s=0.5)
    assert time.monotonic() - started < 2.0
