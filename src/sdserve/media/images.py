"""Input images sent as an http(s) URL, a data URL or raw base64, decoded safely; PNG encoding of outputs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import re
from typing import Protocol

import httpx
from PIL import Image, ImageOps

from sdserve.errors import BadImage
from sdserve.net import BlockedUrl, aguard_hooks, check_url_syntax
from sdserve.settings import Settings


class OwnOutputs(Protocol):
    """This server's own output files, by URL (api.chaining): read from storage, not fetched."""

    def read(self, url: str, field: str) -> bytes | None: ...

# Formats a client plausibly sends. Pillow can open many more, some through external programs
# (EPS runs Ghostscript); none of those are worth the risk for an init image. MPO (phone
# JPEGs) is its own format in older Pillows; AVIF needs a Pillow built with libavif.
_WANTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_MAX_REDIRECTS = 5
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")


async def load_image_input(
    value: str, field: str, settings: Settings, own: OwnOutputs | None = None
) -> Image.Image:
    """An RGB image from what a client sent; every failure is a BadImage naming the field."""
    data = await read_input_bytes(value, field, settings, own)
    # Decoding a large image takes a noticeable fraction of a second: keep it off the event loop.
    return await asyncio.to_thread(decode_image, data, field, settings)


async def read_input_bytes(
    value: str, field: str, settings: Settings, own: OwnOutputs | None = None
) -> bytes:
    """The bytes behind an http(s) URL, a data URL or raw base64, within the size limit.

    With `own`, a URL of this server's own outputs is read from storage (never fetched: the
    server's address is usually loopback or private, which the guard refuses).
    """
    if not isinstance(value, str):
        raise BadImage(field, f"{field} must be an image URL or a base64 string")
    value = value.strip()
    if not value:
        raise BadImage(field, f"{field} is empty")
    if _URL_SCHEME.match(value):
        if own is not None:
            data = await asyncio.to_thread(own.read, value, field)
            if data is not None:
                if len(data) > settings.max_image_bytes:
                    raise BadImage(
                        field, f"{field} is larger than {_format_bytes(settings.max_image_bytes)}"
                    )
                return data
        return await _download(value, field, settings)
    return _decode_base64(value, field, settings.max_image_bytes)


def decode_base64_image(value: str, field: str, settings: Settings) -> Image.Image:
    """An RGB image from a data URL or raw base64 (no network)."""
    value = value.strip() if isinstance(value, str) else ""
    if not value:
        raise BadImage(field, f"{field} is empty")
    return decode_image(_decode_base64(value, field, settings.max_image_bytes), field, settings)


def decode_image(data: bytes, field: str, settings: Settings) -> Image.Image:
    """Decode image bytes to RGB, upright per EXIF, refusing anything over the pixel limit."""
    limit = settings.max_image_pixels
    try:
        probe = Image.open(io.BytesIO(data), formats=_formats())
        # The header alone gives the size: check it before any pixel is decompressed.
        width, height = probe.size
        if width * height > limit:
            raise BadImage(field, f"{field} is larger than {limit} pixels ({width}x{height})")
        probe.verify()  # checksums and structure, before the full decode
        image = Image.open(io.BytesIO(data), formats=_formats())
        image.load()
    except BadImage:
        raise
    except Image.DecompressionBombError:
        # Pillow's own, larger limit triggers while opening, before our check can run.
        raise BadImage(field, f"{field} is larger than {limit} pixels") from None
    except Exception:
        # Pillow's format parsers raise assorted exception types on hostile or damaged input
        # (OSError, SyntaxError, struct.error, IndexError, ...); all mean the same to a client.
        raise BadImage(field, f"{field} is not a valid image") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass  # a broken EXIF block does not make the pixels unusable; keep them as stored
    # Alpha is dropped, not composited: a transparent-background mask must stay black there.
    return image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format this Pillow does not have, so offer only those
    # it has; init() registers every plugin, as Image.open itself would for a non-PNG file.
    Image.init()
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


def _decode_base64(value: str, field: str, limit: int) -> bytes:
    invalid = f"{field} is not valid base64 and not an http or https URL"
    if value[:5].lower() == "data:":
        header, comma, value = value.partition(",")
        if not comma or ";base64" not in header.lower():
            raise BadImage(field, f"{field} is not valid base64: data URLs must be base64-encoded")
        invalid = f"{field} is not valid base64"
    value = "".join(value.split())  # clients wrap long base64 at 76 columns
    if len(value) // 4 * 3 > limit:  # checked before decoding: no need to allocate it all
        raise BadImage(field, f"{field} is larger than {_format_bytes(limit)}")
    if not value or not _BASE64.fullmatch(value):
        raise BadImage(field, invalid)
    # Clients send both alphabets, and often drop the padding.
    value = value.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(field, f"{field} is not valid base64") from None
    if len(data) > limit:
        raise BadImage(field, f"{field} is larger than {_format_bytes(limit)}")
    return data


async def _download(url: str, field: str, settings: Settings) -> bytes:
    timeout = settings.image_fetch_timeout
    try:
        check_url_syntax(url)
        # httpx's timeout bounds each network wait; the outer one bounds the whole download,
        # so a server dripping one byte at a time cannot hold a request open.
        async with asyncio.timeout(timeout):
            return await _fetch(url, field, settings, timeout)
    except BadImage:
        raise
    except BlockedUrl as exc:
        raise BadImage(field, f"{field} {exc}") from None
    except (TimeoutError, httpx.TimeoutException):
        reason = f"timed out after {timeout:g} seconds"
    except httpx.TooManyRedirects:
        reason = f"more than {_MAX_REDIRECTS} redirects"
    except httpx.UnsupportedProtocol:
        reason = "redirected to a URL that is not http or https"
    except httpx.ConnectError as exc:
        reason = f"connection failed ({exc or type(exc).__name__})"
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
    except (httpx.InvalidURL, ValueError):  # e.g. a redirect to a malformed location
        reason = "invalid URL"
    except Exception as exc:
        # The transport can also surface OS and event-loop errors (an ExceptionGroup from
        # happy-eyeballs connects); a client still gets a 400, never a 500.
        reason = type(exc).__name__
    raise BadImage(field, f"{field} could not be downloaded: {reason}")


async def _fetch(url: str, field: str, settings: Settings, timeout: float) -> bytes:
    limit = settings.max_image_bytes
    too_large = f"{field} is larger than {_format_bytes(limit)}"
    async with (
        httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=True,
            max_redirects=_MAX_REDIRECTS,
            event_hooks=aguard_hooks(settings.allow_private_urls),  # every redirect hop too
        ) as client,
        # Images are compressed already; asking for no transfer compression also avoids
        # inflating a gzip bomb chunk by chunk before the size cap can see it.
        client.stream("GET", url, headers={"accept-encoding": "identity"}) as response,
    ):
        if not response.is_success:
            raise BadImage(field, f"{field} could not be downloaded: HTTP {response.status_code}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BadImage(field, too_large)
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:  # the declared length may be absent or false
                raise BadImage(field, too_large)
            chunks.append(chunk)
        return b"".join(chunks)


def _format_bytes(n: int) -> str:
    mib = 1024 * 1024
    if n >= mib:
        return f"{round(n / mib, 1):g} MB"
    if n >= 1024:
        return f"{round(n / 1024, 1):g} KB"
    return f"{n} bytes"
