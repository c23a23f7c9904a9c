"""The server's HTTP contract, against a live uvicorn on loopback and the fake engine (tests/server_fake_engine.py).

The fake forces what the real engine makes hard to reach: a full queue, a failure mid-stream, slow steps for
disconnects and deadlines, a model that is still loading. Clients: the official ``openai`` SDK and raw ``httpx``.
End-to-end behaviour on a real tiny checkpoint is in test_server_e2e.py.
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

from fastllava.server import MediaPolicy, ServerSettings, create_app
from server_fake_engine import IMAGE_TOKENS, FakeEngine, FakeProcessor, LiveServer

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


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def assert_error(response: httpx.Response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# ------------------------------------------------------------------------------------------ the OpenAI surface


def test_chat_with_image_streamed_and_not_give_same_text_and_usage(client):
    messages = image_message()
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 6
    assert plain.usage.prompt_tokens == 1 + 3 + 3 + IMAGE_TOKENS  # bos, template, 3 words, the image
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].message.content and finishes == ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=3, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_n_logprobs_stop_and_seed(client, server):
    messages = [{"role": "user", "content": "count"}]
    many = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, n=2, temperature=0.9, seed=3,
                                          logprobs=True, top_logprobs=2)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].message.content != many.choices[1].message.content
    assert many.usage.completion_tokens == 8
    entries = many.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries) == many.choices[0].message.content
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, n=2, temperature=0.9, seed=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in many.choices]
    # the sampling parameters reach the engine as SamplingParams
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    word = greedy.choices[0].message.content.split()[2]
    stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                             stop=[" " + word])
    assert stopped.choices[0].finish_reason == "stop"
    assert greedy.choices[0].message.content.startswith(stopped.choices[0].message.content)
    assert word not in stopped.choices[0].message.content


def test_streamed_n2_and_logprobs(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, n=2, temperature=0, stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           n=2, temperature=0)
    assert texts == {c.index: c.message.content for c in plain.choices}
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 6


def test_completions_endpoint(client):
    plain = client.completions.create(model=MODEL, prompt="one two three", max_tokens=4, temperature=0, logprobs=2)
    assert plain.object == "text_completion" and plain.usage.prompt_tokens == 4
    assert plain.choices[0].logprobs.tokens and len(plain.choices[0].logprobs.token_logprobs) == 4
    streamed = list(client.completions.create(model=MODEL, prompt="one two three", max_tokens=4, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text
    assert streamed[-1].usage.model_dump() == plain.usage.model_dump()


def test_models_health_tokenize_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert HTTP.get(server.url + "/health").json() == {"status": "ok"}
    counted = HTTP.post(server.url + "/tokenize", json={"messages": image_message()}).json()
    chat = client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=1)
    assert counted["count"] == chat.usage.prompt_tokens == len(counted["tokens"])
    assert HTTP.post(server.url + "/tokenize", json={"prompt": "a b c"}).json()["count"] == 4
    metrics = HTTP.get(server.url + "/metrics").text
    for name in ("fastllava_http_requests_total", "fastllava_generation_tokens_total", "fastllava_prompt_tokens_total",
                 "fastllava_time_to_first_token_seconds_bucket", "fastllava_requests_in_flight",
                 "fastllava_client_disconnects_total", "fastllava_engine_num_running", "fastllava_engine_num_waiting",
                 "fastllava_engine_prefix_cache_hits_total", "fastllava_engine_kv_cache_used_bytes",
                 "fastllava_engine_prefix_cache_hit_rate 0.75", "fastllava_e2e_request_latency_seconds_count"):
        assert name in metrics, name
    assert 'fastllava_http_requests_total{endpoint="chat",status="200"}' in metrics


# ---------------------------------------------------------------------------------------------------- errors


def test_malformed_json_is_a_bounded_400(server):
    huge = b'{"model": "tiny", "messages": [' + b'"x' * 500_000  # 1 MB of broken JSON
    error = assert_error(HTTP.post(server.url + "/v1/chat/completions", content=huge,
                                    headers={"content-type": "application/json"}), 400, "invalid_json")
    assert len(error["message"]) < 300 and "xxxx" not in error["message"]


def test_invalid_fields_are_400_with_param_and_no_echo(server):
    url = server.url + "/v1/chat/completions"
    error = assert_error(HTTP.post(url, json={"model": MODEL, "messages": image_message(), "temperature": "hot"}),
                         400, "invalid_request")
    assert error["param"] == "temperature" and "hot" not in error["message"]
    many = {"model": MODEL, "messages": [{"role": "robot", "content": "y" * 5000}] * 2000}
    error = assert_error(HTTP.post(url, json=many), 400)
    assert len(error["message"]) <= 1000 and "yyyy" not in error["message"]
    assert_error(HTTP.post(url, json={"model": MODEL, "messages": []}), 400)
    assert_error(HTTP.post(url, json=[1, 2]), 400)
    error = assert_error(HTTP.post(url, json={"model": MODEL, "messages": image_message(),
                                               "response_format": {"type": "json_object"}}), 400)
    assert "response_format" in error["message"]
    assert_error(HTTP.post(url, json={"model": MODEL, "messages": image_message(), "n": 99}), 400)


def test_unknown_model_and_unknown_route(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=image_message())
    assert info.value.body["code"] == "model_not_found"
    assert_error(HTTP.get(server.url + "/v2/nothing"), 404)


def test_too_many_images_refused_before_any_fetch(server, client):
    hits = []
    url = _counting_image_server(hits)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=image_message(urls=[url] * 9))
    assert info.value.body["code"] == "too_many_images" and hits == []
    assert client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=1).choices


def test_undecodable_and_blocked_media_are_422(server):
    url = server.url + "/v1/chat/completions"
    bad = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    error = assert_error(HTTP.post(url, json={"model": MODEL, "messages": image_message(urls=[bad])}), 422,
                         "invalid_image")
    assert error["param"] == "messages[0].content[1].image_url.url"
    hits = []
    local = _counting_image_server(hits)
    assert_error(HTTP.post(url, json={"model": MODEL, "messages": image_message(urls=[local])}), 422,
                 "media_url_forbidden")
    assert hits == []  # the loopback server was never contacted
    assert_error(HTTP.post(url, json={"model": MODEL, "messages": image_message(urls=["ftp://example.com/a.png"])}),
                 400, "invalid_image_url")
    assert HTTP.get(server.url + "/health").status_code == 200


def test_context_length_exceeded_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=100_000)
    assert info.value.body["code"] == "context_length_exceeded"


def test_api_key():
    with serve(api_key="sekrit") as live:
        live.wait_ready()  # /health needs no key
        bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for path in ("/v1/models", "/metrics"):
            assert_error(HTTP.get(live.url + path), 401, "invalid_api_key")
        assert_error(HTTP.post(live.url + "/tokenize", json={"prompt": "a"}), 401, "invalid_api_key")
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=2).choices
        assert HTTP.get(live.url + "/").status_code == 200  # the page itself is public; it asks for the key


def test_body_too_large_is_413_declared_or_streamed():
    with serve(max_body_bytes=10_000) as live:
        live.wait_ready()
        url = live.url + "/v1/chat/completions"
        body = json.dumps({"model": MODEL, "messages": image_message(urls=[png_data_url((100, 100), noise=True)])}).encode()
        assert len(body) > 10_000
        assert_error(HTTP.post(url, content=body, headers={"content-type": "application/json"}), 413,
                     "request_too_large")
        sent = []

        def chunks():  # chunked upload, no Content-Length: refused once 10 kB have arrived
            for _ in range(1000):
                sent.append(1)
                yield b" " * 4096

        try:
            response = HTTP.post(url, content=chunks(), headers={"content-type": "application/json"})
            assert_error(response, 413, "request_too_large")
        except httpx.HTTPError:
            pass  # the server may close before the client finishes writing
        assert len(sent) < 1000
        assert HTTP.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 1}).status_code == 200


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


# ------------------------------------------------------------------------------------------------- helpers


def _counting_image_server(hits: list) -> str:
    """A loopback HTTP server that would serve a PNG and records every hit; returns its URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, "PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(buf.getvalue())))
            self.end_headers()
            self.wfile.write(buf.getvalue())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
