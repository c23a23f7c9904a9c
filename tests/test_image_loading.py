"""load_image: every accepted source, transformers-equal RGB conversion, and a clear ImageLoadError for each bad
input (never a hang). HTTP tests talk only to servers this test starts on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava.image_loading import ImageLoadError, load_image

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402


def photo(size=(40, 30)) -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize(size)


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def mode_images() -> dict[str, Image.Image]:
    base = photo()
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    palette_transparent = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_transparent.info["transparency"] = 3
    gray16 = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    return {
        "RGB": base,
        "L": base.convert("L"),
        "LA": rgba.convert("LA"),
        "RGBA": rgba,
        "P": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "P+transparency": palette_transparent,
        "CMYK": base.convert("CMYK"),
        "1": base.convert("1"),
        "I;16": Image.open(io.BytesIO(png_bytes(Image.fromarray(gray16), "TIFF"))),
        "I": Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 3),
        "F": Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) * 1.5),
    }


@pytest.mark.parametrize("mode", list(mode_images()))
def test_every_mode_converts_like_transformers(mode):
    image = mode_images()[mode]
    ours = load_image(image)
    assert ours.mode == "RGB" and ours.size == image.size
    np.testing.assert_array_equal(np.asarray(ours), hf_convert_to_rgb(image, return_numpy=True))


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    assert np.all(np.asarray(load_image(clear)) == 255)


def test_files_bytes_urls_and_base64_give_the_same_image(tmp_path):
    image = photo()
    data = png_bytes(image)
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    expected = np.asarray(image)
    b64 = base64.b64encode(data).decode()
    for source in (str(path), path, data, bytearray(data), memoryview(data), io.BytesIO(data),
                   f"data:image/png;base64,{b64}", b64):
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), np.asarray(hf_load_image(str(path))))


def test_arrays_and_tensors():
    image = np.asarray(photo())
    expected = image
    sources = [
        image,  # HWC uint8
        image.transpose(2, 0, 1),  # CHW uint8
        image.astype(np.float32) / 255,  # HWC float in [0, 1] (truncated to uint8 like transformers)
        torch.from_numpy(image.transpose(2, 0, 1).copy()),
        torch.from_numpy(image.copy()),
    ]
    for source in sources:
        out = np.asarray(load_image(source))
        assert out.shape == expected.shape
        assert np.abs(out.astype(int) - expected).max() <= 1
    gray = np.asarray(photo().convert("L"))
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=-1))
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), image)


def test_exif_orientation_is_applied_like_transformers(tmp_path):
    image = photo((40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    ours = load_image(str(path))
    assert ours.size == (30, 40)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))


# --- bad inputs ----------------------------------------------------------------------------------------------


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize(
    "source, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognised image"),
        (png_bytes(Image.new("RGB", (64, 64), "red"))[:80], "corrupt or truncated"),
        (huge_png_header(50_000, 50_000), "decompression bomb"),
        (huge_png_header(20_000, 20_000), "decompression bomb"),
        (Image.new("RGB", (0, 0)), "zero size"),
        ("/definitely/not/here.png", "no such file"),
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        (12345, "unsupported image source"),
        (np.zeros((5, 6, 7), np.uint8), "not an image"),
    ],
)
def test_bad_inputs_raise_clear_errors(source, message):
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=message):
        load_image(source)
    assert time.monotonic() - start < 5


def test_empty_file_and_directory(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def test_pixel_and_byte_limits(tmp_path):
    data = png_bytes(photo((100, 100)))
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(data, max_pixels=100 * 99)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(data, max_bytes=100)
    assert load_image(data, max_pixels=None, max_bytes=None).size == (100, 100)


def test_errors_are_value_errors():
    assert issubclass(ImageLoadError, ValueError)


# --- URLs against a local server -----------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        status, content_type, body, delay = route
        if delay:
            time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    image = png_bytes(photo())
    _Handler.routes = {
        "/photo.png": (200, "image/png", image, 0),
        "/mislabelled": (200, "application/octet-stream", image, 0),
        "/page.html": (200, "text/html; charset=utf-8", b"<html><body>hello</body></html>", 0),
        "/big.png": (200, "image/png", image * 20, 0),
        "/slow.png": (200, "image/png", image, 3),
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_loads(server):
    expected = np.asarray(photo())
    np.testing.assert_array_equal(np.asarray(load_image(f"{server}/photo.png")), expected)
    np.testing.assert_array_equal(np.asarray(load_image(f"{server}/mislabelled")), expected)


@pytest.mark.parametrize(
    "path, kwargs, message",
    [
        ("/page.html", {}, "text/html"),
        ("/missing.png", {}, "HTTP 404"),
        ("/big.png", {"max_bytes": 10_000}, "over the limit"),
        ("/slow.png", {"timeout": 0.5}, "timed out"),
    ],
)
def test_url_errors(server, path, kwargs, message):
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=message):
        load_image(server + path, **kwargs)
    assert time.monotonic() - start < 5


def test_unreachable_host_fails_fast():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="cannot reach"):
        load_image(f"http://127.0.0.1:{port}/x.png", timeout=2)
    assert time.monotonic() - start < 5


def test_path_objects_and_strings_agree(tmp_path):
    path = tmp_path / "p.gif"
    photo().convert("P").save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(str(Path(path)))))
