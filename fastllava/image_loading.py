"""load_image: turn any image source into an RGB ``PIL.Image``, or raise one clear ``ImageLoadError``.

Contract: ``load_image(source, *, timeout=10.0, max_bytes=20 MiB, max_pixels=64 Mpx)`` accepts a PIL image (any
mode), a numpy array or torch tensor (HWC or CHW with 1, 3 or 4 channels, or 2-D grayscale; uint8, bool, integer
or float in [0, 1] / [0, 255]), a file path (str or ``pathlib.Path``), an http(s) URL, raw bytes or a file object,
a ``data:image/...;base64,`` URL, or a bare base64 string. It returns an RGB image converted the way transformers'
image processors convert (``convert_to_rgb``): images with an alpha band or a transparency key are composited on
white, every other mode goes through ``Image.convert("RGB")``; EXIF orientation is applied as transformers'
``load_image`` does. Every failure a user can cause (missing or empty file, corrupt or truncated bytes, zero-size
image, image over ``max_pixels`` -- a decompression bomb --, download over ``max_bytes`` or ``timeout``, unreachable
host, HTTP error, non-image content) raises ``ImageLoadError`` (a ``ValueError``) whose message names the problem
and the source. Downloads use only the standard library and enforce the size cap while streaming.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageLoadError", "load_image", "to_rgb", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 8192 * 8192  # below Pillow's own warning threshold (~89 Mpx), far above any photo
_CHUNK = 64 * 1024


class ImageLoadError(ValueError):
    """An image could not be loaded; the message says which source and why."""


def _describe(source: Any) -> str:
    text = str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"
    return text if len(text) <= 120 else text[:117] + "..."


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion as transformers' ``convert_to_rgb``: transparency is composited on white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageLoadError(f"cannot convert an image of mode {image.mode!r} to RGB: {error}") from error


def _check_size(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{what} has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb; raise max_pixels to allow it)"
        )


def _decode(data: bytes, what: str, max_pixels: int | None) -> Image.Image:
    """Decode bytes fully (no lazy file handles left behind), refusing huge or broken images."""
    if not data:
        raise ImageLoadError(f"{what}: empty input (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow's bomb warning becomes an error; its own hard limit raises DecompressionBombError.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.width, image.height, max_pixels, what)  # header only: nothing decoded yet
            image.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(f"{what} is too large to decode safely (decompression bomb): {error}") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(f"{what} is not a recognised image format ({len(data)} bytes)") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"{what} is corrupt or truncated: {error}") from error
    return image


def _read_capped(stream: Any, max_bytes: int | None, what: str, deadline: float | None = None) -> bytes:
    chunks, total = [], 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise ImageLoadError(f"{what}: download timed out")
        chunk = stream.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise ImageLoadError(f"{what} is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)


def _fetch(url: str, timeout: float | None, max_bytes: int | None) -> tuple[bytes, str]:
    """Download with a total deadline and a streaming size cap; returns (body, content type)."""
    what = f"URL {_describe(url)}"
    request = urllib.request.Request(url, headers={"User-Agent": "fastllava", "Accept": "image/*"})
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(f"{what} is {length} bytes, over the limit of {max_bytes}")
            body = _read_capped(response, max_bytes, what, deadline)
            return body, response.headers.get("Content-Type", "")
    except ImageLoadError:
        raise
    except urllib.error.HTTPError as error:
        raise ImageLoadError(f"{what} returned HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise ImageLoadError(f"{what} timed out after {timeout} s") from error
        raise ImageLoadError(f"cannot reach {what}: {reason}") from error
    except (socket.timeout, TimeoutError) as error:
        raise ImageLoadError(f"{what} timed out after {timeout} s") from error
    except (OSError, ValueError) as error:  # connection reset, bad URL, ...
        raise ImageLoadError(f"cannot download {what}: {error}") from error


def _from_data_url(url: str, max_bytes: int | None) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageLoadError("data URL has no ',' separating header and payload")
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes:
        raise ImageLoadError(f"data URL payload is larger than the limit of {max_bytes} bytes")
    if header.endswith(";base64"):
        return _b64decode(payload, "data URL")
    return urllib.parse.unquote_to_bytes(payload)


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageLoadError(f"{what} is not valid base64: {error}") from error


def _array_to_image(array: np.ndarray) -> Image.Image:
    """HWC/CHW/2-D arrays to PIL with transformers' to_pil_image value rules (floats in [0, 1] are scaled)."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # ambiguous: channels first, as transformers assumes
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(f"array of shape {array.shape} is not an image (HWC/CHW with 1, 3 or 4 channels, or HxW)")
    if array.size == 0:
        raise ImageLoadError(f"array image has zero size {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if not np.all(np.isfinite(array)):
            raise ImageLoadError("array image contains NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if np.issubdtype(array.dtype, np.floating) and lo >= 0 and hi <= 1 and not np.allclose(array, array.astype(int)):
            array = (array.astype(np.float64) * 255).astype(np.uint8)  # transformers truncates, so do we
        elif lo >= 0 and hi <= 255:
            array = array.astype(np.uint8)
        else:
            raise ImageLoadError(f"array values span [{lo}, {hi}]; expected [0, 1] floats or [0, 255]")
    return Image.fromarray(np.ascontiguousarray(array))


def load_image(
    source: Any,
    *,
    timeout: float | None = 10.0,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load ``source`` as an RGB PIL image (see the module docstring for the accepted sources and errors)."""
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, max_pixels, "image")
        image = source
    elif isinstance(source, np.ndarray) or type(source).__module__.startswith("torch"):
        if not isinstance(source, np.ndarray):
            source = source.detach().cpu().numpy()
        image = _array_to_image(source)
        _check_size(image.width, image.height, max_pixels, "array image")
        return to_rgb(image)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if max_bytes is not None and len(source) > max_bytes:
            raise ImageLoadError(f"image bytes are {len(source)} bytes, over the limit of {max_bytes}")
        image = _decode(bytes(source), "image bytes", max_pixels)
    elif hasattr(source, "read"):
        image = _decode(_read_capped(source, max_bytes, "file object"), "file object", max_pixels)
    elif isinstance(source, (str, Path, os.PathLike)):
        image = _load_path_or_url(source, timeout, max_bytes, max_pixels)
    else:
        raise ImageLoadError(
            f"unsupported image source of type {type(source).__name__}: expected a PIL image, array, tensor, "
            "path, URL, data URL, base64 string or bytes"
        )
    try:
        image = ImageOps.exif_transpose(image)  # as transformers' load_image: the upright image
    except Exception:  # a broken EXIF block must not make a viewable image unloadable
        pass
    return to_rgb(image)


def _load_path_or_url(source: Any, timeout: float | None, max_bytes: int | None, max_pixels: int | None):
    text = os.fspath(source)
    lowered = text[:16].lower()
    if isinstance(source, str) and lowered.startswith(("http://", "https://")):
        body, content_type = _fetch(text, timeout, max_bytes)
        try:
            return _decode(body, f"URL {_describe(text)}", max_pixels)
        except ImageLoadError as error:
            if content_type and not content_type.lower().startswith("image/"):
                raise ImageLoadError(
                    f"URL {_describe(text)} returned {content_type!r} content, not an image"
                ) from error
            raise
    if isinstance(source, str) and lowered.startswith("data:"):
        return _decode(_from_data_url(text, max_bytes), "data URL", max_pixels)
    path = Path(text)
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError:  # e.g. a base64 string longer than a file name may be
        is_file = exists = False
    if is_file:
        size = path.stat().st_size
        if size == 0:
            raise ImageLoadError(f"file {_describe(text)} is empty (0 bytes)")
        if max_bytes is not None and size > max_bytes:
            raise ImageLoadError(f"file {_describe(text)} is {size} bytes, over the limit of {max_bytes}")
        return _decode(path.read_bytes(), f"file {_describe(text)}", max_pixels)
    if exists:
        raise ImageLoadError(f"{_describe(text)} is not a regular file")
    # transformers also accepts a bare base64 string; try it only for text that cannot be a path
    if isinstance(source, str) and len(text) > 64:
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if data:
            return _decode(data, "base64 string", max_pixels)
    raise ImageLoadError(f"no such file: {_describe(text)} (and not an http(s) URL, data URL or base64 image)")
