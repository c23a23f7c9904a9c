"""Safe media fetching (fastllava/server/media.py) against local HTTP servers on 127.0.0.1; no internet.

SSRF: loopback and private addresses refused by default (in every spelling), allowed only when listed; the allow-list
is exclusive; redirects re-checked hop by hop (to private addresses, to unlisted hosts, more than 3); the address
checked is the one connected to. Limits: declared and streamed oversize bodies stopped early, slow headers and slow
bodies cut at the total timeout, decompression bombs refused from the header, data URLs checked before decoding,
file:// confined to the allowed directory. Through the server: the same failures are 422 in OpenAI's shape.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from fastllava.server import media
from fastllava.server.errors import APIError
from fastllava.server.media import MediaPolicy, fetch_bytes, is_public_address, load_media, parse_url

LOOPBACK = frozenset({"127.0.0.1"})


def png_bytes(size=(16, 12), color="green") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of width x height zero pixels: tiny on disk, width*height bytes once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, parts, row_block = zlib.compressobj(9), [], b"\x00" * ((width + 1) * 500)
    for _ in range(height // 500):
        parts.append(compressor.compress(row_block))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (10 Gpx here), with a little data that is never decoded."""
    full = png_bomb(1000, 500)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return full[:8] + chunk + full[8 + 25:]


class Recorder:
    def __init__(self):
        self.paths: list[str] = []
        self.streamed = 0  # bytes written by the endless endpoint before the client went away
        self.closed = threading.Event()


@pytest.fixture(scope="module")
def image_server():
    recorder = Recorder()
    image = png_bytes()
    bomb = png_bomb(4_000, 4_000)  # a real bomb: 16 Mpx of zeros in ~16 kB (tests use a 4 Mpx cap)
    header_only = _header_only_png(100_000, 100_000)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status, body=b"", headers=()):
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            recorder.paths.append(self.path)
            path, _, query = self.path.partition("?")
            if path == "/img.png":
                self._send(200, image, [("Content-Type", "image/png")])
            elif path == "/redirect":
                self._send(302, headers=[("Location", query)])
            elif path.startswith("/chain/"):
                left = int(path.rsplit("/", 1)[1])
                self._send(302, headers=[("Location", f"/chain/{left - 1}" if left else "/img.png")])
            elif path == "/declared-huge":
                self.send_response(200)
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.wfile.write(b"\x00" * 1024)
            elif path == "/endless":  # no Content-Length: the body ends when the connection does
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for _ in range(100_000):
                        self.wfile.write(b"\x00" * 65536)
                        recorder.streamed += 65536
                except OSError:
                    recorder.closed.set()
            elif path == "/slow-body":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"\x00")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass
            elif path == "/slow-headers":
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(200):
                        self.wfile.write(b"X-Slow: 1\r\n")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass
            elif path == "/bomb.png":
                self._send(200, bomb, [("Content-Type", "image/png")])
            elif path == "/huge-header.png":
                self._send(200, header_only, [("Content-Type", "image/png")])
            elif path == "/page.html":
                self._send(200, b"<html>not an image</html>", [("Content-Type", "text/html")])
            else:
                self._send(404, b"no")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, address: None  # clients hanging up mid-body is the point of some tests
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.port = httpd.server_address[1]
    httpd.recorder = recorder
    yield httpd
    httpd.shutdown()


def refused(code: str, call, *args, status: int = 422) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args)
    assert info.value.status == status and info.value.code == code, (info.value.status, info.value.code,
                                                                      info.value.message)
    return info.value


# ------------------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "255.255.255.255", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
])
def test_non_public_addresses_are_refused(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert is_public_address(address)


def test_loopback_refused_by_default_in_every_spelling(image_server):
    policy = MediaPolicy()
    port = image_server.port
    for url in (f"http://127.0.0.1:{port}/img.png", f"http://localhost:{port}/img.png",
                f"http://2130706433:{port}/img.png", f"http://0x7f.1:{port}/img.png", f"http://[::1]:{port}/img.png",
                f"http://[::ffff:127.0.0.1]:{port}/img.png", f"http://127.1:{port}/img.png",
                f"http://LOCALHOST.:{port}/img.png"):
        before = len(image_server.recorder.paths)
        refused("media_url_forbidden", fetch_bytes, url, policy)
        assert len(image_server.recorder.paths) == before, url  # never contacted


@pytest.mark.parametrize("url", [
    "http://evil.example@127.0.0.1/img.png",  # user info
    "http://127.0.0.1\\@evil.example/img.png",  # backslash confusion between parsers
    "http://exa mple.com/a.png", "http://%31%32%37.0.0.1/a.png", "gopher://127.0.0.1:70/x", "ftp://host/a.png",
    "http://[::1/a.png", "http://host:99999/a.png", "javascript:alert(1)", "/etc/passwd", "data:image/png,rawbytes",
])
def test_malformed_or_unsupported_urls_are_400(url):
    refused("invalid_image_url", fetch_bytes, url, MediaPolicy(), status=400)


def test_allow_list_permits_listed_host_only(image_server):
    listed = MediaPolicy(allowed_domains=LOOPBACK)
    image, size = load_media(image_server.base + "/img.png", listed)
    assert image.size == (16, 12) and image.mode == "RGB" and size == len(png_bytes())
    # the allow-list is exclusive, and is compared on the parsed host
    refused("media_url_forbidden", fetch_bytes, f"http://localhost:{image_server.port}/img.png", listed)
    refused("media_url_forbidden", fetch_bytes, "http://93.184.216.34/img.png", listed)
    normalized = MediaPolicy(allowed_domains=MediaPolicy.normalize_domains([" 127.0.0.1. "]))
    assert load_media(image_server.base + "/img.png", normalized)[0].size == (16, 12)


def test_host_header_and_path_come_from_the_same_parse(image_server):
    parsed = parse_url("http://Example.COM:8080/a/b.png?x=1#frag")
    assert (parsed.host, parsed.port, parsed.target, parsed.host_header) == ("example.com", 8080, "/a/b.png?x=1",
                                                                             "example.com:8080")


# ------------------------------------------------------------------------------------------------- redirects


def test_redirects_are_rechecked_each_hop(image_server):
    listed = MediaPolicy(allowed_domains=LOOPBACK)
    base = image_server.base
    assert fetch_bytes(f"{base}/chain/2", listed) == png_bytes()  # 3 redirects: allowed
    refused("media_fetch_failed", fetch_bytes, f"{base}/chain/3", listed)  # 4: refused
    # to a private address or an unlisted host: refused before any connection is made
    for target in ("http://10.255.255.1/img.png", "http://169.254.169.254/latest/meta-data/",
                   f"http://localhost:{image_server.port}/img.png"):
        refused("media_url_forbidden", fetch_bytes, f"{base}/redirect?{target}", listed)
    refused("invalid_image_url", fetch_bytes, f"{base}/redirect?file:///etc/passwd", listed, status=400)


def test_redirect_from_a_public_host_to_a_private_one_is_refused(image_server, monkeypatch):
    """Default policy (no allow-list): pretend 'public.test' is a public host served by our loopback server."""
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        if host == "public.test":
            return real_getaddrinfo("127.0.0.1", port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(media.socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(media, "is_public_address", lambda address: address == "127.0.0.1")
    policy = MediaPolicy()
    public = f"http://public.test:{image_server.port}"
    assert fetch_bytes(f"{public}/img.png", policy) == png_bytes()
    # resolved once; the connection went to that address (create_connection only parses the numeric IP)
    assert lookups[0] == "public.test" and set(lookups[1:]) <= {"127.0.0.1"}
    for private in (f"http://127.0.0.2:{image_server.port}/img.png", "http://10.0.0.7/x.png",
                    "http://[::1]/x.png", "http://169.254.169.254/"):
        before = len(image_server.recorder.paths)
        refused("media_url_forbidden", fetch_bytes, f"{public}/redirect?{private}", policy)
        assert len(image_server.recorder.paths) == before + 1  # only the redirecting hop was fetched


# ------------------------------------------------------------------------------------------------- limits


def test_declared_oversize_is_refused_before_reading(image_server):
    refused("media_too_large", fetch_bytes, image_server.base + "/declared-huge",
            MediaPolicy(allowed_domains=LOOPBACK, max_bytes=1 << 20))


def test_streamed_oversize_is_stopped_early(image_server):
    started = time.monotonic()
    refused("media_too_large", fetch_bytes, image_server.base + "/endless",
            MediaPolicy(allowed_domains=LOOPBACK, max_bytes=1 << 20))
    assert time.monotonic() - started < 3
    assert image_server.recorder.closed.wait(5)  # the server saw the connection closed under it
    assert image_server.recorder.streamed < 64 << 20  # it never got to send its 6 GB


@pytest.mark.parametrize("path", ["/slow-body", "/slow-headers"])
def test_slow_servers_are_cut_at_the_total_timeout(image_server, path):
    policy = MediaPolicy(allowed_domains=LOOPBACK, total_timeout=0.6)
    started = time.monotonic()
    refused("media_fetch_timeout", fetch_bytes, image_server.base + path, policy)
    assert time.monotonic() - started < 2.0


def test_connect_timeout_to_a_blackhole(monkeypatch):
    policy = MediaPolicy(allowed_domains=frozenset({"10.255.255.1"}), connect_timeout=0.3, total_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(APIError) as info:
        fetch_bytes("http://10.255.255.1:81/x.png", policy)
    assert info.value.status == 422 and time.monotonic() - started < 2.0


def test_decompression_bomb_is_refused_from_the_header(image_server):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    small_cap = MediaPolicy(allowed_domains=LOOPBACK, max_pixels=4_000_000)
    error = refused("image_too_large", load_media, image_server.base + "/bomb.png", small_cap)
    assert "4000x4000" in error.message and time.monotonic() - started < 2
    # the default cap (8192 x 8192), on a header that claims 10 gigapixels
    error = refused("image_too_large", load_media, image_server.base + "/huge-header.png",
                    MediaPolicy(allowed_domains=LOOPBACK))
    assert "10000000000 pixels" in error.message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing was decoded


def test_undecodable_content_is_422(image_server):
    listed = MediaPolicy(allowed_domains=LOOPBACK)
    refused("invalid_image", load_media, image_server.base + "/page.html", listed)
    refused("media_fetch_failed", load_media, image_server.base + "/missing.png", listed)
    truncated = "data:image/png;base64," + base64.b64encode(png_bytes((64, 64))[:60]).decode()
    refused("invalid_image", load_media, truncated, listed)
    svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
    refused("invalid_image", load_media, svg, listed)


def test_data_urls(image_server):
    policy = MediaPolicy(max_bytes=10_000)
    good = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert load_media(good, policy)[0].size == (16, 12)
    refused("invalid_image", load_media, "data:image/png;base64,@@@not base64@@@", policy)
    huge = "data:image/png;base64," + "A" * 1_000_000  # refused on its length, before decoding
    refused("media_too_large", load_media, huge, policy)


def test_file_urls_only_under_the_allowed_path(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png_bytes())
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    (allowed / "link.png").symlink_to(secret)
    refused("media_url_forbidden", load_media, f"file://{allowed}/ok.png", MediaPolicy())  # off by default
    policy = MediaPolicy(allowed_local_path=allowed)
    assert load_media(f"file://{allowed}/ok.png", policy)[0].size == (16, 12)
    refused("media_url_forbidden", load_media, f"file://{allowed}/../secret.png", policy)
    refused("media_url_forbidden", load_media, f"file://{allowed}/link.png", policy)  # symlink out of the dir
    refused("media_url_forbidden", load_media, "file:///etc/passwd", policy)
    refused("invalid_image_url", load_media, f"file://otherhost{allowed}/ok.png", policy, status=400)
    fifo = allowed / "fifo.png"
    os.mkfifo(fifo)
    refused("media_fetch_failed", load_media, f"file://{fifo}", policy)  # not a regular file: never blocks


# ------------------------------------------------------------------------------------------ through the server


def test_media_errors_through_the_api(image_server):
    import httpx

    HTTP = httpx.Client(timeout=30)
    from server_fake_engine import FakeEngine, FakeProcessor, LiveServer

    from fastllava.server import ServerSettings, create_app

    def ask(live, url):
        return HTTP.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 2})

    default = create_app(ServerSettings(), lambda: (FakeEngine(), FakeProcessor()))
    listed = create_app(ServerSettings(media=MediaPolicy(allowed_domains=LOOPBACK)),
                        lambda: (FakeEngine(), FakeProcessor()))
    with LiveServer(default) as live:
        live.wait_ready()
        response = ask(live, image_server.base + "/img.png")
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "media_url_forbidden"
    with LiveServer(listed) as live:
        live.wait_ready()
        assert ask(live, image_server.base + "/img.png").status_code == 200
        for path, code in (("/huge-header.png", "image_too_large"),
                           ("/redirect?http://10.0.0.1/", "media_url_forbidden"), ("/page.html", "invalid_image")):
            response = ask(live, image_server.base + path)
            assert response.status_code == 422 and response.json()["error"]["code"] == code, response.text
        before = len(image_server.recorder.paths)
        response = HTTP.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_server.base + "/img.png"}}] * 9}]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_images"
        assert len(image_server.recorder.paths) == before  # the count is checked before any fetch
        assert HTTP.get(live.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------------- https


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS image server on 127.0.0.1 with a self-signed certificate for the name 'localhost' only."""
    import shutil
    import ssl

    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    image = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda request, address: None  # refused handshakes are the point of the test
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.port, httpd.cafile = httpd.server_address[1], str(cert)
    yield httpd
    httpd.shutdown()


def test_https_connects_to_the_checked_address_and_verifies_the_host_name(tls_server):
    import ssl

    trust = ssl.create_default_context(cafile=tls_server.cafile)
    # 'localhost' may resolve to ::1 first (nothing listens there): the next checked address is tried
    policy = MediaPolicy(allowed_domains=frozenset({"localhost"}), ssl_context=trust)
    assert fetch_bytes(f"https://localhost:{tls_server.port}/img.png", policy) == png_bytes()
    # the certificate names 'localhost', not the address: verification fails, the image is not fetched
    by_address = MediaPolicy(allowed_domains=LOOPBACK, ssl_context=trust)
    error = refused("media_fetch_failed", fetch_bytes, f"https://127.0.0.1:{tls_server.port}/img.png", by_address)
    assert "TLS" in error.message
    # an untrusted certificate (the system store does not know it) is refused too
    refused("media_fetch_failed", fetch_bytes, f"https://localhost:{tls_server.port}/img.png",
            MediaPolicy(allowed_domains=frozenset({"localhost"})))
