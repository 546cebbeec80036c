"""Input images from URLs, data URLs and raw base64: decoded to RGB, or a clear BadImage."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from sdserve.errors import BadImage
from sdserve.media.images import (
    decode_base64_image,
    decode_image,
    encode_png,
    load_image_input,
    read_input_bytes,
)
from sdserve.settings import Settings

# The test servers are on loopback, which the private-address guard refuses by default.
SETTINGS = Settings(
    max_image_bytes=100_000,
    max_image_pixels=1_000_000,
    image_fetch_timeout=0.5,
    allow_private_urls=True,
)
DEFAULTS = Settings(allow_private_urls=True)  # 15 MB, 4096x4096, 15 s
GUARDED = Settings()


def image_bytes(fmt="PNG", size=(64, 48), mode="RGB", color=(200, 30, 30), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def load(value, settings=SETTINGS, field="init_image") -> Image.Image:
    return asyncio.run(load_image_input(value, field, settings))


def fails(value, fragment: str, settings=SETTINGS, field="init_image") -> str:
    with pytest.raises(BadImage) as info:
        load(value, settings, field)
    assert info.value.field == field
    assert fragment in info.value.message, info.value.message
    return info.value.message


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_bomb(width: int, height: int, with_pixels: bool = True) -> bytes:
    """A real grayscale PNG of `width` x `height` zeros: kilobytes on the wire, huge decoded."""
    pixels = b""
    if with_pixels:
        compressor = zlib.compressobj(9)
        row = b"\x00" * (width + 1)  # filter byte + one byte a pixel
        pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self):
        if self.path == "/drip":  # a byte every 0.1 s: never idle long enough for a read timeout
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            return
        if self.path == "/hang":  # accepts, then says nothing
            time.sleep(3)
            return
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        headers = {"content-length": str(len(body)), **headers}
        for name, value in headers.items():
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up early, as it should for oversized bodies

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files():
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display
    _Handler.routes = {
        "/ok.png": (200, {"content-type": "image/png"}, image_bytes()),
        "/rotated.jpg": (200, {}, image_bytes("JPEG", size=(60, 40), exif=rotated)),
        "/text": (200, {"content-type": "text/plain"}, b"hello, not an image"),
        "/error": (500, {}, b"boom"),
        "/big": (200, {}, b"\0" * 200_000),
        # no length declared: only the streamed count can stop it
        "/big-undeclared": (200, {"content-length": None}, b"\0" * 200_000),
        # declares more than the default 15 MB limit; refused before the body is read
        "/huge-declared": (200, {"content-length": str(16 * 1024 * 1024)}, b"\0" * 1000),
        "/redirect": (302, {"location": "/ok.png"}, b""),
        "/loop": (302, {"location": "/loop"}, b""),
        "/to-ftp": (302, {"location": "ftp://127.0.0.1/x.png"}, b""),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_image_is_fetched_and_decoded(files):
    image = load(f"{files}/ok.png")
    assert image.mode == "RGB" and image.size == (64, 48)
    assert image.getpixel((0, 0)) == (200, 30, 30)
    assert load(f"{files}/redirect").size == (64, 48)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",
        "http://localhost/x.png",
        "http://10.1.2.3/x.png",
        "http://192.168.0.1/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x.png",
        "http://0.0.0.0/x.png",
    ],
)
def test_private_addresses_are_refused_by_default(url):
    fails(url, "private or local address", settings=GUARDED)


def test_exif_orientation_is_applied(files):
    assert load(f"{files}/rotated.jpg").size == (40, 60)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/missing.png", "init_image could not be downloaded: HTTP 404"),
        ("/error", "init_image could not be downloaded: HTTP 500"),
        ("/text", "init_image is not a valid image"),
        ("/big", "init_image is larger than 97.7 KB"),
        ("/big-undeclared", "init_image is larger than 97.7 KB"),
        ("/loop", "init_image could not be downloaded: more than 5 redirects"),
        ("/to-ftp", "not http or https"),
    ],
)
def test_url_failures_are_bad_images(files, path, fragment):
    fails(f"{files}{path}", fragment)


def test_size_limit_message_in_megabytes(files):
    assert (
        fails(f"{files}/huge-declared", "larger than", DEFAULTS)
        == "init_image is larger than 15 MB"
    )


@pytest.mark.parametrize("path", ["/drip", "/hang"])
def test_slow_servers_time_out(files, path):
    started = time.monotonic()
    fails(f"{files}{path}", "init_image could not be downloaded: timed out after 0.5 seconds")
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("http://127.0.0.1:9/none.png", "could not be downloaded: connection failed"),
        ("file:///etc/passwd", "init_image URL scheme must be http or https"),
        ("ftp://127.0.0.1/x.png", "init_image URL scheme must be http or https"),
        ("http://", "init_image is not a valid URL"),
        ("http://[::1", "init_image is not a valid URL"),
        ("http://127.0.0.1:99999/x.png", "init_image is not a valid URL"),
        ("https://xn--/x.png", "init_image is not a valid URL"),
    ],
)
def test_bad_urls(value, fragment):
    fails(value, fragment)


def test_data_url_and_raw_base64():
    png = image_bytes(size=(20, 10), mode="RGBA", color=(1, 2, 3, 0))
    for value in (
        f"data:image/png;base64,{b64(png)}",
        f"DATA:image/png;BASE64,{b64(png)}",
        b64(png),
        base64.encodebytes(png).decode(),  # wrapped at 76 columns
        f"  {b64(png)}\n",
        base64.urlsafe_b64encode(png).decode().rstrip("="),  # URL-safe alphabet, no padding
    ):
        image = load(value)
        assert image.mode == "RGB" and image.size == (20, 10)
        assert image.getpixel((0, 0)) == (1, 2, 3)  # alpha dropped, not composited
    assert decode_base64_image(b64(png), "mask_image", SETTINGS).size == (20, 10)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("data:image/png;base64,!!!notbase64!!!", "init_image is not valid base64"),
        ("data:image/png,%89PNG", "data URLs must be base64-encoded"),
        ("data:image/png;base64", "data URLs must be base64-encoded"),
        ("not base64 at all!", "init_image is not valid base64 and not an http or https URL"),
        ("abcde", "init_image is not valid base64"),
        (b64(b"plain bytes, not an image"), "init_image is not a valid image"),
        ("", "init_image is empty"),
        ("   \n", "init_image is empty"),
        (b64(b"\0" * 200_000), "init_image is larger than 97.7 KB"),
        (None, "must be an image URL or a base64 string"),
        (12345, "must be an image URL or a base64 string"),
    ],
)
def test_bad_base64(value, fragment):
    fails(value, fragment)


def test_field_name_is_reported():
    fails("nope!", "mask_image is not valid base64", field="mask_image")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_bomb(5000, 5000)  # 25 megapixels in about 25 KB
    assert len(bomb) < 100_000
    message = fails(b64(bomb), "larger than", DEFAULTS)
    assert message == "init_image is larger than 16777216 pixels (5000x5000)"
    # Past twice Pillow's own limit, Pillow refuses at open; still the same kind of answer.
    fails(b64(png_bomb(30_000, 30_000, with_pixels=False)), "init_image is larger than", DEFAULTS)
    # Under the limit the same construction decodes: the guard is about size, not format.
    assert load(b64(png_bomb(500, 400))).size == (500, 400)


def test_damaged_and_disallowed_images_are_bad_images():
    png, jpeg = image_bytes(size=(128, 128)), image_bytes("JPEG", size=(128, 128))
    corrupt_crc = bytearray(png)
    corrupt_crc[30] ^= 0xFF  # inside IHDR, so its CRC no longer matches
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # would run Ghostscript
    for data in (png[: len(png) // 2], jpeg[: len(jpeg) // 2], bytes(corrupt_crc), eps):
        fails(b64(data), "init_image is not a valid image")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF EXIF
def test_garbage_after_a_valid_magic_number_never_escapes_as_another_error():
    rng = random.Random(0)
    magics = [
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0",
        b"GIF89a",
        b"BM",
        b"RIFF\0\0\0\0WEBPVP8 ",
        b"II*\0",
    ]
    for magic in magics:
        for _ in range(5):
            data = magic + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            with pytest.raises(BadImage):
                decode_image(data, "init_image", SETTINGS)


def test_modes_are_converted_to_rgb():
    for mode, color in (
        ("L", 128),
        ("P", 3),
        ("RGBA", (9, 8, 7, 6)),
        ("CMYK", (0, 0, 0, 0)),
        ("1", 1),
    ):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        assert load(b64(image_bytes(fmt, mode=mode, color=color))).mode == "RGB"
    gif = image_bytes("GIF", mode="P", color=5)
    assert load(b64(gif)).mode == "RGB"


def test_read_input_bytes_returns_the_raw_bytes(files):
    png = image_bytes()
    assert asyncio.run(read_input_bytes(b64(png), "init_video", SETTINGS)) == png
    assert asyncio.run(read_input_bytes(f"{files}/text", "init_video", SETTINGS)) == (
        b"hello, not an image"
    )


def test_encode_png_round_trips():
    image = Image.new("RGB", (7, 5), (10, 20, 30))
    data = encode_png(image)
    assert data.startswith(b"\x89PNG")
    decoded = decode_image(data, "x", SETTINGS)
    assert decoded.size == (7, 5) and decoded.getpixel((3, 2)) == (10, 20, 30)
