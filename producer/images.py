"""Getting image bytes from what callers pass, and decoding them safely into RGB.

Every failure is an :class:`~producer.errors.InvalidImage` (URL failures are its subclass
:class:`~producer.errors.ImageFetchError`); no raw Pillow, OS or value error escapes.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image, ImageOps, UnidentifiedImageError

from producer.errors import ImageFetchError, InvalidImage
from producer.protocol import Limits

#: What :func:`read_image_source` accepts.
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image

_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK_BYTES = 64 * 1024
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def read_image_source(
    source: ImageSource,
    *,
    limits: Limits,
    allow_private_urls: bool = False,
    timeout_s: float = 10.0,
) -> bytes:
    """Return the encoded image bytes of ``source``, at most ``limits.max_image_bytes``.

    ``source`` is a file path (``str`` or ``os.PathLike``), the bytes themselves (``bytes``,
    ``bytearray``, ``memoryview``), a ``PIL.Image.Image`` (sent as an RGB PNG), or an
    ``http://`` / ``https://`` URL. A URL is fetched without proxies, following redirects, and
    only from public addresses unless ``allow_private_urls``; ``timeout_s`` bounds the
    connection, each read, and the whole download.

    Raises:
        InvalidImage: unreadable path, too many bytes, or a type that is not an image source.
        ImageFetchError: the URL is not allowed or cannot be fetched within the limits.
    """
    if isinstance(source, Image.Image):
        return _encode_png(source, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_bytes(len(data), limits)
        return data
    if isinstance(source, str) and _URL_SCHEME.match(source):
        return _fetch(source, limits, allow_private_urls, timeout_s)
    if isinstance(source, (str, os.PathLike)):
        return _read_file(source, limits)
    raise InvalidImage(
        "an image must be a path, an http(s) URL, bytes or a PIL.Image.Image, "
        f"got {type(source).__name__}"
    )


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode ``data`` into a loaded RGB image, checking the limits before decoding pixels.

    Animated images give their first frame; the EXIF orientation is applied; transparency
    is composited on white; 16-bit and float images are scaled to 8 bits; CMYK, grey and
    palette images are converted.

    Raises:
        InvalidImage: empty, too many bytes or pixels, not an image, or truncated/corrupt.
    """
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    _check_bytes(len(data), limits)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage("the bytes are not an image in any format Pillow reads") from None
    except Image.DecompressionBombError as exc:
        raise InvalidImage(
            f"the image has too many pixels ({exc}); vlmq allows at most "
            f"{limits.max_image_pixels:,} (VLMQ_MAX_IMAGE_PIXELS)"
        ) from None
    # Hostile files make Pillow's format plugins raise nearly any exception type.
    except Exception as exc:
        raise InvalidImage(f"the image header cannot be read: {exc}") from exc
    with image:
        _check_pixels(image.size, limits)
        try:
            image.load()
            return _to_rgb(image)
        except Exception as exc:
            raise InvalidImage(
                f"the {image.format or 'image'} data cannot be decoded "
                f"(truncated or corrupt?): {exc}"
            ) from exc


def _check_bytes(size: int, limits: Limits) -> None:
    if size > limits.max_image_bytes:
        raise InvalidImage(
            f"the image is {size:,} bytes; at most {limits.max_image_bytes:,} are allowed "
            "(VLMQ_MAX_IMAGE_BYTES)"
        )


def _check_pixels(size: tuple[int, int], limits: Limits) -> None:
    width, height = size
    if width * height > limits.max_image_pixels:
        raise InvalidImage(
            f"the image is {width}x{height} = {width * height:,} pixels; at most "
            f"{limits.max_image_pixels:,} are allowed (VLMQ_MAX_IMAGE_PIXELS)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a loaded ``image``, upright according to its EXIF orientation."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _to_8_bit(image.convert("I"), 0, 65535)
    elif image.mode in ("I", "F"):
        # No nominal range for 32-bit int or float pixels: stretch what is there.
        image = _to_8_bit(image, *image.getextrema())
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bit(image: Image.Image, low: float, high: float) -> Image.Image:
    """Map pixel values ``low..high`` of an ``I`` or ``F`` image linearly onto ``L`` 0..255."""
    if high > low:
        scale = 255 / (high - low)
        offset = -low * scale
    else:
        scale, offset = 0.0, min(max(low, 0), 255)
    return image.point(lambda v: v * scale + offset).convert("L")


def _encode_png(image: Image.Image, limits: Limits) -> bytes:
    _check_pixels(image.size, limits)
    buffer = io.BytesIO()
    try:
        _to_rgb(image).save(buffer, format="PNG")
    except Exception as exc:
        raise InvalidImage(f"the PIL image cannot be encoded as PNG: {exc}") from exc
    _check_bytes(buffer.tell(), limits)
    return buffer.getvalue()


def _read_file(path: str | os.PathLike[str], limits: Limits) -> bytes:
    shown = os.fsdecode(path)
    try:
        # Non-blocking: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidImage(
                    f"cannot read image file {shown!r}: not a regular file (a directory, FIFO, "
                    "socket or device)"
                )
            data = file.read(limits.max_image_bytes + 1)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidImage(f"cannot read image file {shown!r}: {reason}") from exc
    _check_bytes(len(data), limits)
    return data


def _shown(url: str) -> str:
    """``url`` without credentials, query or fragment, which may be secrets."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _fetch(url: str, limits: Limits, allow_private_urls: bool, timeout_s: float) -> bytes:
    shown = _shown(url)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageFetchError(f"only http:// and https:// image URLs are allowed, got {shown}")
    request = urllib.request.Request(url, headers={"User-Agent": "vlmq", "Accept": "image/*"})
    deadline = time.monotonic() + timeout_s
    try:
        with _opener(allow_private_urls).open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise ImageFetchError(
                    f"{shown} is {int(declared):,} bytes; at most "
                    f"{limits.max_image_bytes:,} are allowed (VLMQ_MAX_IMAGE_BYTES)"
                )
            data = bytearray()
            while chunk := response.read1(_CHUNK_BYTES):
                data += chunk
                if len(data) > limits.max_image_bytes:
                    raise ImageFetchError(
                        f"{shown} sent more than {limits.max_image_bytes:,} bytes "
                        "(VLMQ_MAX_IMAGE_BYTES)"
                    )
                if time.monotonic() > deadline:
                    raise ImageFetchError(f"{shown} took longer than {timeout_s:g} s to download")
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ImageFetchError(f"{shown} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ImageFetchError(f"cannot fetch {shown}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ImageFetchError(f"cannot fetch {shown}: {str(exc) or type(exc).__name__}") from exc
    return bytes(data)


def _opener(allow_private_urls: bool) -> urllib.request.OpenerDirector:
    """http(s) only (redirects to other schemes fail), no proxies, no cookies."""
    if allow_private_urls:
        transports = [urllib.request.HTTPHandler(), urllib.request.HTTPSHandler()]
    else:
        transports = [_PublicHTTPHandler(), _PublicHTTPSHandler()]
    opener = urllib.request.OpenerDirector()
    for handler in (
        *transports,
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


def _connect_public(host: str, port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to ``host`` that refuses if any of its addresses is not public.

    The check is made on the very addresses dialled, so DNS rebinding and redirects to
    private hosts are refused too.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global:
            raise ImageFetchError(
                f"refusing to fetch from {host}: it resolves to {address}, a "
                f"{_address_kind(address)} address; pass allow_private_urls=True to allow it"
            )
    error: OSError = OSError(f"no address found for {host}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
        else:
            return sock
    raise error


def _address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for kind in ("loopback", "link_local", "private", "reserved", "multicast", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


class _PublicHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = _connect_public(self.host, self.port, self.timeout)


# HTTPSConnection.connect calls super().connect() (ours, via the MRO) and then starts TLS.
class _PublicHTTPSConnection(http.client.HTTPSConnection, _PublicHTTPConnection):
    pass


class _PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_PublicHTTPConnection, req)


class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_PublicHTTPSConnection, req)
