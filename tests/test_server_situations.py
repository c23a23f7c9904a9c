"""Situations the real engine makes hard to reach, forced with the fake engine (tests/server_fake_engine.py) behind
a live uvicorn on loopback: the server's admission full (503 + Retry-After) and the engine's queue full (503, also
for a stream, before any byte of it); a failure after streaming began (an SSE error event, then [DONE]); the
request deadline (504, engine request aborted); a client leaving, streaming or not (engine.abort called, the
generation stopped within one step, its state freed, the disconnect metered); /health 503 while the model loads
(blocked on purpose) then 200, and a failed load reported; the page's JS-free contract (HTML, assets, no CDN).
Everything a real model can show is in test_server_e2e.py (real engine, tiny checkpoint, subprocess server).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from fastllava.server import ServerSettings, create_app
from server_fake_engine import FakeEngine, FakeProcessor, LiveServer

MODEL = "tiny"
HTTP = httpx.Client(timeout=30)  # one client: creating one per call costs ~0.1 s of TLS setup


def png_data_url(size=(20, 10), color="red", noise=False) -> str:
    buf = io.BytesIO()
    image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size, color)
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text="what is it", urls=None):
    urls = urls if urls is not None else [png_data_url()]
    return [{"role": "user", "content": [{"type": "text", "text": text}]
             + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def serve(engine=None, loader=None, **settings):
    engine = engine or FakeEngine()
    settings.setdefault("model_name", MODEL)
    app = create_app(ServerSettings(**settings), loader or (lambda: (engine, FakeProcessor())))
    return LiveServer(app)


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    with serve(engine) as live:
        live.wait_ready()
        live.engine = engine
        yield live


def assert_error(response: httpx.Response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# ------------------------------------------------------------------------------------- overload and failures


def test_full_queue_is_503_with_retry_after():
    engine = FakeEngine(step_delay=0.05)
    with serve(engine, max_running_requests=1, max_queued_requests=1) as live:
        live.wait_ready()
        url = live.url + "/v1/chat/completions"
        slow = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True}
        with HTTP.stream("POST", url, json=slow) as r1, HTTP.stream("POST", url, json=slow) as r2:
            assert r1.status_code == r2.status_code == 200
            response = HTTP.post(url, json={**slow, "stream": False})
            error = assert_error(response, 503, "server_overloaded")
            assert response.headers["retry-after"] == "1" and "capacity" in error["message"]
            r1.read(), r2.read()
        assert HTTP.post(url, json={**slow, "stream": False, "max_tokens": 1}).status_code == 200


def test_concurrent_uploads_are_bounded_before_reading_bodies():
    engine = FakeEngine(step_delay=0.05)
    with serve(engine, max_concurrent_bodies=1) as live:
        live.wait_ready()
        url = live.url + "/v1/chat/completions"
        slow = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10, "stream": True}
        with HTTP.stream("POST", url, json=slow) as first:
            assert first.status_code == 200
            response = HTTP.post(url, content=b"{" * 1000, headers={"content-type": "application/json"})
            assert_error(response, 503, "server_overloaded")
            assert response.headers["retry-after"]
            assert HTTP.get(live.url + "/health").status_code == 200  # GETs are not bounded
            first.read()
        assert HTTP.post(url, json={**slow, "stream": False, "max_tokens": 1}).status_code == 200


def test_cross_site_requests_are_refused():
    """Another web page can neither reach a loopback server through DNS rebinding (Host check) nor make a browser
    post a form or text/plain body to it (only JSON is accepted, which a browser sends cross-origin only after a
    CORS preflight this server never grants)."""
    engine = FakeEngine()
    with serve(engine, trusted_hosts=frozenset({"localhost", "127.0.0.1", "::1"})) as live:
        live.wait_ready()
        url = live.url + "/v1/chat/completions"
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert_error(HTTP.post(url, content=body, headers={"host": "evil.example:8000",
                                                            "content-type": "application/json"}), 400, "invalid_host")
        assert_error(HTTP.get(live.url + "/", headers={"host": "rebound.example"}), 400, "invalid_host")
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            assert_error(HTTP.post(url, content=body, headers={"content-type": content_type}), 415,
                         "unsupported_media_type")
        assert HTTP.options(url, headers={"origin": "https://evil.example",
                                          "access-control-request-method": "POST"}).status_code >= 400
        assert not engine.conversations
        for host in ("localhost", f"127.0.0.1:{live.port}", f"[::1]:{live.port}"):
            response = HTTP.post(url, content=body, headers={"host": host, "content-type": "application/json"})
            assert response.status_code == 200, (host, response.text)
            assert "access-control-allow-origin" not in response.headers


def test_engine_queue_full_is_503():
    with serve(FakeEngine(capacity=0)) as live:
        live.wait_ready()
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MODEL, messages=image_message())
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"]
        assert info.value.body["code"] == "server_overloaded"
        with pytest.raises(openai.InternalServerError):  # also when streaming: before any byte of the stream
            list(client.chat.completions.create(model=MODEL, messages=image_message(), stream=True))


def test_error_after_streaming_began_is_an_sse_error_event():
    with serve(FakeEngine(fail_after=2)) as live:
        live.wait_ready()
        with HTTP.stream("POST", live.url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": image_message(), "stream": True, "max_tokens": 10}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "internal_error" and "simulated engine failure" in error["message"]
        assert json.loads(events[1])["choices"][0]["delta"]["content"]  # tokens came before the error
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="simulated engine failure"):
            list(client.chat.completions.create(model=MODEL, messages=image_message(), stream=True))
        assert HTTP.get(live.url + "/health").status_code == 200


def test_request_timeout_aborts_and_answers_504():
    engine = FakeEngine(step_delay=0.05)
    with serve(engine, request_timeout=0.3) as live:
        live.wait_ready()
        response = HTTP.post(live.url + "/v1/chat/completions",
                              json={"model": MODEL, "messages": image_message(), "max_tokens": 100})
        assert_error(response, 504, "request_timeout")
        assert len(engine.aborted) == 1 and _wait(lambda: not engine.live)


# --------------------------------------------------------------------------------------- disconnects, loading


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_generation_within_one_step(stream):
    engine = FakeEngine(step_delay=0.05)
    with serve(engine) as live:
        live.wait_ready()
        body = {"model": MODEL, "messages": image_message(), "max_tokens": 400, "stream": stream}
        if stream:
            with HTTP.stream("POST", live.url + "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                while "content" not in next(lines):
                    pass
                assert engine.live  # generating
        else:
            with pytest.raises(httpx.ReadTimeout):
                HTTP.post(live.url + "/v1/chat/completions", json=body, timeout=0.3)
        assert _wait(lambda: engine.aborted and not engine.live), "the generation was not aborted"
        request_id = engine.aborted[0]
        assert engine.steps_after_abort.get(request_id, 0) <= 1  # stopped within one engine step
        assert engine.tokens_generated < 100
        assert _wait(lambda: 'fastllava_client_disconnects_total 1.0' in HTTP.get(live.url + "/metrics").text)
        assert _wait(lambda: "fastllava_requests_in_flight 0.0" in HTTP.get(live.url + "/metrics").text)


def test_health_is_503_while_loading_then_200():
    release = threading.Event()

    def loader():
        release.wait(10)
        return FakeEngine(), FakeProcessor()

    with serve(loader=loader) as live:
        error = assert_error(HTTP.get(live.url + "/health"), 503, "model_loading")
        assert "loading" in error["message"]
        response = HTTP.post(live.url + "/v1/chat/completions", json={"model": MODEL, "messages": image_message()})
        assert_error(response, 503, "model_loading")
        assert response.headers["retry-after"]
        release.set()
        live.wait_ready(5)
        assert HTTP.get(live.url + "/health").json() == {"status": "ok"}


def test_failed_load_is_reported():
    def loader():
        raise FileNotFoundError("no such checkpoint")

    with serve(loader=loader) as live:
        assert _wait(lambda: "no such checkpoint" in HTTP.get(live.url + "/health").text)
        assert_error(HTTP.get(live.url + "/health"), 503, "model_load_failed")


# ------------------------------------------------------------------------------------------------- the page


def test_page_and_its_assets_are_served_offline(server):
    page = HTTP.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    html = page.text
    assert "/static/app.js" in html and "/static/style.css" in html
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(link.startswith("/static/") or link == "data:," for link in links), links  # no CDN
    for asset in ("/static/app.js", "/static/style.css", "/static/markdown.js"):
        response = HTTP.get(server.url + asset)
        assert response.status_code == 200, asset
        assert not re.search(r"(url\(|import |fetch\()\s*['\"]?(https?:)?//", response.text), asset
    script = HTTP.get(server.url + "/static/app.js").text
    assert "/v1/chat/completions" in script and "stream" in script
    config = HTTP.get(server.url + "/page-config.json").json()
    assert config["model"] == MODEL and config["needs_api_key"] is False
