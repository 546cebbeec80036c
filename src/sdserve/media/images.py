"""Input images (URL, data URL or raw base64) decoded safely, and PNG encoding of outputs."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from sdserve.errors import BadImage
from sdserve.settings import Settings


async def load_image_input(value: str, field: str, settings: Settings) -> Image.Image:
    """An RGB image from what a client sent; every failure is a BadImage naming the field."""
    return decode_image(await read_input_bytes(value, field, settings), field, settings)


async def read_input_bytes(value: str, field: str, settings: Settings) -> bytes:
    """The bytes behind an http(s) URL, a data URL or raw base64, within the size limit."""
    value = value.strip()
    if "://" in value[:16]:
        data = await _download(value, field, settings)
    else:
        data = _decode_base64(value, field)
    if len(data) > settings.max_image_bytes:
        raise BadImage(field, f"{field} is larger than {_mb(settings.max_image_bytes)} MB")
    return data


def decode_image(data: bytes, field: str, settings: Settings) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            width, height = probe.size
            if width * height > settings.max_image_pixels:
                raise BadImage(field, f"{field} is larger than {settings.max_image_pixels} pixels")
            probe.verify()  # catches truncated and corrupt files before the full decode
            image = Image.open(io.BytesIO(data))
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise BadImage(field, f"{field} is not a valid image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(
            field, f"{field} is larger than {settings.max_image_pixels} pixels"
        ) from None


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_base64(value: str, field: str) -> bytes:
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise BadImage(field, f"{field} is not valid base64: data URLs must be base64-encoded")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(field, f"{field} is not valid base64 and not an http or https URL") from None


async def _download(url: str, field: str, settings: Settings) -> bytes:
    if not url.lower().startswith(("http://", "https://")):
        raise BadImage(field, f"{field} URL scheme must be http or https")
    limit = settings.max_image_bytes
    try:
        async with (
            httpx.AsyncClient(
                timeout=settings.image_fetch_timeout, follow_redirects=True
            ) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise BadImage(
                    field, f"{field} could not be downloaded: HTTP {response.status_code}"
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise BadImage(field, f"{field} is larger than {_mb(limit)} MB")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise BadImage(field, f"{field} is larger than {_mb(limit)} MB")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc)
        raise BadImage(field, f"{field} could not be downloaded: {reason}") from None


def _mb(limit: int) -> int:
    return limit // (1024 * 1024)
