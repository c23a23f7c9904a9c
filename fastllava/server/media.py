"""Safe media fetching for the server: image URLs from clients in, decoded RGB PIL images out.

The server never hands a URL to the engine or the processor; every image goes through ``load_media`` here, under a
``MediaPolicy``. The rules (each one a past CVE of some inference server):

- One URL parser (``parse_url``, on ``urllib.parse.urlsplit``) decides what is checked *and* what is fetched: the
  request goes to the address resolved from that parse, with the Host header and path from that parse.
- Schemes: ``data:`` (base64 only; its length is checked before decoding), ``http``/``https``, and ``file://`` only
  under ``allowed_local_path`` (real path inside it, opened with O_NOFOLLOW, regular files only). URLs with user info,
  backslashes, control characters or percent signs in the host are refused.
- The host is resolved once; the connection goes to that IP (TLS still verifies the certificate for the host
  name). Loopback, private, link-local, CGNAT, multicast, reserved and unspecified addresses (also inside IPv4-mapped,
  6to4, Teredo and NAT64 IPv6 addresses) are refused unless ``allowed_domains`` names the host. When
  ``allowed_domains`` is given it is an allow-list: only those hosts are fetched.
- Redirects are followed by hand, at most ``max_redirects``, each hop parsed and checked again (no https -> http).
- A declared Content-Length over ``max_bytes`` is refused before reading; the body is read in chunks and the fetch
  stops as soon as it passes ``max_bytes``. Connect timeout ``connect_timeout``; a watchdog closes the socket at
  ``total_timeout`` whatever the server does (slow headers, a trickling body). No proxies from the environment.
- Decoding: only PNG, JPEG, GIF, WebP and BMP; width x height is read from the header and checked against
  ``max_pixels`` before any pixel is decoded (decompression bombs); EXIF orientation applied; converted to RGB as
  every other image path of fastllava converts (``image_loading.to_rgb``: transparency composited on white).

Failures raise ``APIError``: 400 for a malformed or unsupported URL, 422 for media that is refused, cannot be
fetched, is too large, or cannot be decoded. ``MediaFetcher`` runs loads on a bounded thread pool for the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urljoin, urlsplit

from fastllava.server.errors import APIError

MiB = 1 << 20
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: frozenset[str] | None = None  # None: any host with a public address
    allowed_local_path: Path | None = None  # None: file:// refused
    max_bytes: int = 20 * MiB  # per image, enforced while reading
    max_request_bytes: int = 64 * MiB  # all images of one request
    max_pixels: int = 8192 * 8192  # width * height, checked before decoding
    max_images: int = 8  # per request, checked before any fetch
    connect_timeout: float = 5.0
    total_timeout: float = 10.0
    max_redirects: int = 3
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def normalize_domains(domains: Sequence[str] | None) -> frozenset[str] | None:
        if domains is None:
            return None
        return frozenset(d.strip().lower().rstrip(".") for d in domains if d.strip())


def _unprocessable(message: str, code: str, param: str | None) -> APIError:
    return APIError(422, message, code=code, param=param)


def _invalid(message: str, param: str | None) -> APIError:
    return APIError(400, message, code="invalid_image_url", param=param)


# ----------------------------------------------------------------------------------------------- URL and addresses


@dataclass(frozen=True)
class ParsedURL:
    scheme: str  # "http" | "https"
    host: str  # lower case, no brackets, no trailing dot
    port: int
    target: str  # path + query, what goes on the request line
    host_header: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.target}"


def parse_url(url: str, param: str | None = None) -> ParsedURL:
    """The one parse of an http(s) URL that both the checks and the fetch use."""
    if any(ord(c) < 0x21 or c in "\\\x7f" for c in url):
        raise _invalid("image URL contains whitespace, control characters or a backslash", param)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise _invalid(f"malformed image URL ({error})", param) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _invalid(f"unsupported image URL scheme {scheme!r}", param)
    if "@" in parts.netloc:
        raise _invalid("image URLs with user information ('user@host') are not allowed", param)
    host = (parts.hostname or "").rstrip(".")
    if not host or "%" in host:
        raise _invalid("image URL has no valid host", param)
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _invalid("image URL host is not a valid domain name", param) from None
    port = port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    bracketed = f"[{host}]" if ":" in host else host
    default_port = 443 if scheme == "https" else 80
    host_header = bracketed if port == default_port else f"{bracketed}:{port}"
    return ParsedURL(scheme, host.lower(), port, target, host_header)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    """True only for globally routable unicast addresses (also checking IPv4 embedded in IPv6)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d
            return is_public_address(str(ip.ipv4_mapped))
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public_address(str(inner)):
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


def _resolve(url: ParsedURL, policy: MediaPolicy, param: str | None) -> list[str]:
    """The addresses this fetch may connect to (checked here, once), in the resolver's order."""
    listed = policy.allowed_domains is not None and url.host in policy.allowed_domains
    if policy.allowed_domains is not None and not listed:
        raise _unprocessable(f"image host {url.host!r} is not in the server's allowed media domains",
                             "media_url_forbidden", param)
    try:
        infos = socket.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        raise _unprocessable(f"cannot resolve image host {url.host!r}", "media_fetch_failed", param) from None
    allowed = []
    for info in infos:
        address = info[4][0]
        if (listed or is_public_address(address)) and address not in allowed:
            allowed.append(address)
    if not allowed:
        raise _unprocessable(
            f"image host {url.host!r} resolves to a loopback, private, link-local or reserved address; such hosts "
            "are fetched only when the server lists them in --allowed-media-domains", "media_url_forbidden", param)
    return allowed


# ------------------------------------------------------------------------------------------------------ fetching


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed IP, verifying the certificate (and sending SNI) for the URL's host name."""

    def __init__(self, address: str, port: int, server_name: str, timeout: float, context: ssl.SSLContext):
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)


class _Watchdog:
    """Shuts the connection's socket down at the deadline, breaking any blocking read (slow servers)."""

    def __init__(self, deadline: float):
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired and sock is not None:
                self._shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                self._shutdown(self._sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def _connect(parsed: ParsedURL, addresses: list[str], policy: MediaPolicy,
             deadline: float) -> http.client.HTTPConnection:
    """A connection to the first of the checked addresses that answers (no other lookup happens)."""
    error: OSError | None = None
    for address in addresses:
        timeout = min(policy.connect_timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise TimeoutError
        if parsed.scheme == "https":
            context = policy.ssl_context or ssl.create_default_context()
            conn: http.client.HTTPConnection = _PinnedHTTPSConnection(address, parsed.port, parsed.host, timeout,
                                                                      context)
        else:
            conn = http.client.HTTPConnection(address, parsed.port, timeout=timeout)
        try:
            conn.connect()
            return conn
        except ssl.SSLError:
            conn.close()
            raise
        except OSError as failure:
            conn.close()
            error = failure
    assert error is not None
    raise error


def _fetch_http(url: str, policy: MediaPolicy, param: str | None, deadline: float) -> bytes:
    parsed = parse_url(url, param)
    for hop in range(policy.max_redirects + 1):
        addresses = _resolve(parsed, policy, param)
        if deadline - time.monotonic() <= 0:
            raise _unprocessable("timed out fetching the image", "media_fetch_timeout", param)
        watchdog = _Watchdog(deadline)
        conn: http.client.HTTPConnection | None = None
        response: http.client.HTTPResponse | None = None
        try:
            conn = _connect(parsed, addresses, policy, deadline)
            sock = conn.sock  # kept: http.client hands it to the response (and drops it) on Connection: close
            watchdog.watch(sock)
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            conn.putrequest("GET", parsed.target, skip_host=True)
            conn.putheader("Host", parsed.host_header)
            conn.putheader("User-Agent", "fastllava-media-fetcher")
            conn.putheader("Accept", "image/*")
            conn.endheaders()
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise _unprocessable(f"image URL redirected ({response.status}) without a Location",
                                         "media_fetch_failed", param)
                if hop == policy.max_redirects:
                    raise _unprocessable(f"image URL redirected more than {policy.max_redirects} times",
                                         "media_fetch_failed", param)
                following = parse_url(urljoin(parsed.url, location), param)
                if parsed.scheme == "https" and following.scheme != "https":
                    raise _unprocessable("image URL redirected from https to http", "media_url_forbidden", param)
                parsed = following
                continue
            if response.status != 200:
                raise _unprocessable(f"fetching the image failed: HTTP {response.status}", "media_fetch_failed", param)
            declared = response.getheader("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_bytes:
                raise _unprocessable(f"image is larger than the server's limit of {policy.max_bytes} bytes",
                                     "media_too_large", param)
            chunks, total = [], 0
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > policy.max_bytes:
                    raise _unprocessable(f"image is larger than the server's limit of {policy.max_bytes} bytes",
                                         "media_too_large", param)
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError
            if watchdog.fired:
                raise TimeoutError
            return b"".join(chunks)
        except APIError:
            raise
        except ssl.SSLError as error:
            raise _unprocessable(f"TLS error fetching the image: {error.reason or error}", "media_fetch_failed",
                                 param) from None
        except (TimeoutError, socket.timeout):
            raise _unprocessable(f"timed out fetching the image (limit {policy.total_timeout:g} s)",
                                 "media_fetch_timeout", param) from None
        except (OSError, http.client.HTTPException) as error:
            if watchdog.fired or time.monotonic() >= deadline:
                raise _unprocessable(f"timed out fetching the image (limit {policy.total_timeout:g} s)",
                                     "media_fetch_timeout", param) from None
            raise _unprocessable(f"fetching the image failed: {type(error).__name__}", "media_fetch_failed",
                                 param) from None
        finally:
            watchdog.cancel()
            if response is not None:
                response.close()  # on Connection: close the response owns the socket; this closes it now
            if conn is not None:
                conn.close()
    raise AssertionError("unreachable")


def _decode_data_url(url: str, policy: MediaPolicy, param: str | None) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise _invalid("malformed data URL (no ',')", param)
    if not header.lower().endswith(";base64"):
        raise _invalid("data URLs must be base64 encoded ('data:image/png;base64,...')", param)
    # Checked on the encoded length, before decoding anything.
    if len(payload) > (policy.max_bytes + 2) // 3 * 4 + 1024:
        raise _unprocessable(f"image is larger than the server's limit of {policy.max_bytes} bytes",
                             "media_too_large", param)
    try:
        data = base64.b64decode(payload.translate({10: None, 13: None, 32: None}), validate=True)
    except (binascii.Error, ValueError):
        raise _unprocessable("the data URL is not valid base64", "invalid_image", param) from None
    if len(data) > policy.max_bytes:
        raise _unprocessable(f"image is larger than the server's limit of {policy.max_bytes} bytes",
                             "media_too_large", param)
    return data


def _read_local_file(url: str, policy: MediaPolicy, param: str | None) -> bytes:
    if policy.allowed_local_path is None:
        raise _unprocessable("file:// image URLs are disabled (see --allowed-local-media-path)",
                             "media_url_forbidden", param)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _invalid("file URLs must look like file:///absolute/path", param)
    path = unquote(parts.path)
    if "\x00" in path or not os.path.isabs(path):
        raise _invalid("file URLs must name an absolute path", param)
    root = os.path.realpath(policy.allowed_local_path)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise _unprocessable("the file is outside the server's allowed local media path", "media_url_forbidden", param)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise _unprocessable("cannot open the image file", "media_fetch_failed", param) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _unprocessable("the image path is not a regular file", "media_fetch_failed", param)
        if info.st_size > policy.max_bytes:
            raise _unprocessable(f"image is larger than the server's limit of {policy.max_bytes} bytes",
                                 "media_too_large", param)
        data = file.read(policy.max_bytes + 1)
    if len(data) > policy.max_bytes:
        raise _unprocessable(f"image is larger than the server's limit of {policy.max_bytes} bytes",
                             "media_too_large", param)
    return data


def fetch_bytes(url: str, policy: MediaPolicy, param: str | None = None) -> bytes:
    """The raw bytes behind an image URL, under ``policy`` (blocking; call from a worker thread)."""
    scheme = url[: url.find(":")].lower() if ":" in url[:16] else ""
    if scheme == "data":
        return _decode_data_url(url, policy, param)
    if scheme == "file":
        return _read_local_file(url, policy, param)
    if scheme in ("http", "https"):
        return _fetch_http(url, policy, param, time.monotonic() + policy.total_timeout)
    raise _invalid("image_url must be an http(s) URL or a data:image/...;base64 URL", param)


def decode_image(data: bytes, policy: MediaPolicy, param: str | None = None) -> Any:
    """RGB PIL image from encoded bytes; the pixel count is checked from the header before decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as error:
            raise _unprocessable(f"image has too many pixels: {error}", "image_too_large", param) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise _unprocessable(f"cannot decode the image (supported: {', '.join(ALLOWED_FORMATS)})",
                                 "invalid_image", param) from None
        width, height = image.size
        if width < 1 or height < 1 or width * height > policy.max_pixels:
            raise _unprocessable(f"image is {width}x{height} pixels; the server accepts at most "
                                 f"{policy.max_pixels} pixels", "image_too_large", param)
        try:
            from fastllava.image_loading import to_rgb  # the same RGB conversion as every other image path

            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError:
            raise _unprocessable("image has too many pixels", "image_too_large", param) from None
        except Exception:  # noqa: BLE001 - any decoder failure on client data is the client's error
            raise _unprocessable("cannot decode the image (corrupt or truncated)", "invalid_image", param) from None


def load_media(url: str, policy: MediaPolicy, param: str | None = None) -> tuple[Any, int]:
    """(RGB PIL image, number of encoded bytes) for an image URL under ``policy``."""
    data = fetch_bytes(url, policy, param)
    return decode_image(data, policy, param), len(data)


class MediaFetcher:
    """Loads the images of a request on a bounded thread pool, after checking how many there are."""

    def __init__(self, policy: MediaPolicy, max_workers: int = 8):
        self.policy = policy
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fastllava-media")

    def check_count(self, count: int) -> None:
        if count > self.policy.max_images:
            raise APIError(400, f"At most {self.policy.max_images} image(s) may be given in one request; got {count}. "
                           "Set --limit-images-per-prompt to change the limit.", code="too_many_images",
                           param="messages")

    async def load_all(self, items: list[tuple[str, str | None]]) -> list[Any]:
        """Images for [(url, param)], in order; the first failure is raised (the others are not awaited)."""
        self.check_count(len(items))
        if not items:
            return []
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, load_media, url, self.policy, param) for url, param in items]
        try:
            results = [await future for future in futures]
        finally:
            for future in futures:
                future.cancel()
        total = sum(size for _, size in results)
        if total > self.policy.max_request_bytes:
            raise _unprocessable(f"the request's images add up to {total} bytes; the limit is "
                                 f"{self.policy.max_request_bytes}", "media_too_large", "messages")
        return [image for image, _ in results]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
