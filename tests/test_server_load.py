"""The server under load, at the issue's full size, and a smoke test of benchmarks/bench_server.py's helpers.

``test_load_200_requests_32_clients``: ``python -m fastllava.server`` (what ``fastllava serve`` runs) in a subprocess
on a free loopback port, on the real engine with a tiny transformers-made llava-1.5 checkpoint, gets 200 chat
requests from 32 concurrent clients against a capacity of 12 (``--max-num-seqs 8`` running + ``--max-queued-requests
4``): the first burst alone overflows it. The requests come in 8 variants (a data-URL image or text only; greedy or
sampled with a seed; EOS ignored or not; 3-5 new tokens), each sent both streamed and not; every tenth request instead
asks for 192 tokens, streamed, and its client leaves after the first token. Each client has its own kept-alive
connection and, told 503, waits as Retry-After asks and sends the same request again. (With one 32-connection pool
shared by all clients, 2 of 30 runs got a connection reset while reading response headers: most likely a pooled
connection idle past uvicorn's 5 s keep-alive, closed by the server as it was reused; none in 40 runs like this.)
Shown:

* every request that was not left is answered completely: 200, a finish_reason of "stop" or "length" (exactly
  max_tokens when EOS is ignored), a streamed answer ends with its usage chunk and ``data: [DONE]``;
* identical requests give identical answers, streamed or not (text, finish reason, usage), whatever else was in the
  engine's batches with them (the engine ran several sequences per step on average: checked);
* overflow is answered at once with an OpenAI-shaped 503 + Retry-After (never a timeout; no request fails otherwise);
* each client that left aborted its engine request (engine and server counters agree), and afterwards the engine holds
  no live KV memory (the pool's used bytes minus the evictable prefix cache, from /metrics, back to the idle level),
  nothing running, nothing in flight;
* no error and no traceback in the server log.

The server runs with OMP_NUM_THREADS=1: the tiny model's ops are far too small for intra-op threads, and on 2 cores
shared with other jobs two threads per op (each parallel region waiting for both to be scheduled) made the same load
cost the server 10-20 s of CPU and 30-60 s instead of 2-3 s and 5-10 s (measured). Timing on 2 busy cores (load
average 3-8): 15-35 s for the server fixture (checkpoint ~12 s, server start ~12 s), 3-14 s for the load itself.

The bench_server.py smoke tests write the real-size processor files (no weights) and run the whole script at toy size.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

MODEL = "tiny-llava15"
KEY = "load-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
N_REQUESTS, N_CLIENTS = 200, 32
MAX_NUM_SEQS, MAX_QUEUED = 8, 4  # capacity 12 against 32 clients: overflow is certain
LEAVE_EVERY = 10  # request i leaves mid-stream when i % LEAVE_EVERY == LEAVE_EVERY - 1
N_VARIANTS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metrics_of(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def live_kv_bytes(metrics: dict[str, float]) -> float:
    """KV bytes held by live sequences: the pool's used bytes minus what the prefix cache keeps (evictable)."""
    return metrics["fastllava_engine_kv_cache_used_bytes"] - metrics["fastllava_engine_kv_cache_cached_bytes"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tiny_checkpoints import make_full_checkpoint

    t0 = time.monotonic()
    checkpoint = make_full_checkpoint(tmp_path_factory.mktemp("llava15"), "llava15")
    t1 = time.monotonic()
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "fastllava.server", "--model", str(checkpoint), "--served-model-name", MODEL,
               "--port", str(port), "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queued-requests", str(MAX_QUEUED),
               "--max-model-len", "256", "--log-level", "info"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTLLAVA_API_KEY": KEY, "OMP_NUM_THREADS": "1"}  # see above
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            else:
                pytest.fail(f"the server did not start:\n{log_path.read_text()[-3000:]}")
            print(f"\ncheckpoint {t1 - t0:.1f} s, server start {time.monotonic() - t1:.1f} s")
            yield url, log_path, process.pid
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[str, float]:
    response = httpx.get(url + "/metrics", headers=HEADERS, timeout=30)
    assert response.status_code == 200
    return metrics_of(response.text)


def request_body(i: int, images: list[str]) -> dict:
    """Request i: variant i % 8, streamed when (i // 8) is even (so every variant is sent both ways)."""
    v = i % N_VARIANTS
    text = f"Question {v}: what colour is it?"
    content: list | str = text
    if v % 2 == 0:  # half the variants carry an image (three distinct ones)
        content = [{"type": "image_url", "image_url": {"url": images[v % 3]}}, {"type": "text", "text": text}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3 + v % 3,
            "ignore_eos": v % 4 != 3, "stream": (i // N_VARIANTS) % 2 == 0,
            "stream_options": {"include_usage": True}}
    body.update({"temperature": 0} if v < 4 else {"temperature": 0.9, "top_p": 0.95, "seed": 1000 + v})
    if i % LEAVE_EVERY == LEAVE_EVERY - 1:  # this client will leave after the first token of a long answer
        body.update(max_tokens=192, ignore_eos=True, stream=True, temperature=0)  # long: must be aborted
    if not body["stream"]:
        del body["stream_options"]
    return body


def parse_sse(lines: list[str]) -> dict:
    """The SSE lines of a streamed chat answer -> text, finish reasons, usage; checks the framing."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", lines[-3:]
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("error" not in c for c in chunks), chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"], chunks[-1]  # the usage chunk comes last
    assert all(c.get("usage") is None for c in chunks[:-1])
    return {"text": text, "finish_reasons": reasons, "usage": chunks[-1]["usage"]}


def test_load_200_requests_32_clients(server):
    url, log_path, pid = server
    chat = url + "/v1/chat/completions"
    images = [data_url(color) for color in ((200, 40, 40), (40, 160, 60), (30, 60, 220))]
    before = scrape(url)
    assert live_kv_bytes(before) == 0 and before["fastllava_requests_in_flight"] == 0
    answers: dict[int, dict] = {}
    left: list[int] = []
    overloads: list[float] = []  # seconds each 503 took to arrive
    attempts = {"n": 0}
    cpu, server_cpu = time.process_time(), cpu_seconds(pid)

    async def attempt(client: httpx.AsyncClient, i: int, last: dict) -> float | None:
        """Send request i once: None when it was answered (or left), else the Retry-After of its 503."""
        body = request_body(i, images)
        attempts["n"] += 1
        start = time.monotonic()
        async with client.stream("POST", chat, json=body) as response:
            last.update(request=i, status=response.status_code, connection=response.headers.get("connection"),
                        stream=body["stream"], sent=start)
            if response.status_code == 503:
                overloads.append(time.monotonic() - start)
                error = json.loads(await response.aread())["error"]
                assert error["code"] == "server_overloaded" and set(error) == {"message", "type", "param", "code"}
                retry_after = int(response.headers["retry-after"])
                assert retry_after >= 1
                return retry_after
            assert response.status_code == 200, (i, response.status_code, (await response.aread())[:500])
            if not body["stream"]:
                answer = json.loads(await response.aread())
                choice = answer["choices"][0]
                answers[i] = {"text": choice["message"]["content"], "finish_reasons": [choice["finish_reason"]],
                              "usage": answer["usage"]}
                return None
            if i % LEAVE_EVERY == LEAVE_EVERY - 1:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        left.append(i)
                        return None  # leaves the block: the connection is closed mid-stream
                raise AssertionError(f"request {i} ended before its first token")
            answers[i] = parse_sse([line async for line in response.aiter_lines()])
            return None

    async def main() -> None:
        pending = list(range(N_REQUESTS))

        async def client_task(worker: int) -> None:  # one client, one connection (kept alive between requests)
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            last: dict = {}  # what this client's previous request got, for the message of a transport error
            async with httpx.AsyncClient(timeout=60, limits=limits, headers=HEADERS) as client:
                while pending:
                    i = pending.pop(0)
                    while True:
                        started = time.monotonic()
                        try:
                            retry_after = await attempt(client, i, last)
                        except httpx.TransportError as error:
                            previous = {**last, "sent": round(started - last.get("sent", started), 3)}
                            raise AssertionError(f"request {i} (client {worker}) failed after "
                                                 f"{time.monotonic() - started:.3f} s: {error!r}; this client's "
                                                 f"previous request: {previous}") from error
                        if retry_after is None:
                            break
                        await asyncio.sleep(retry_after + 0.02 * worker)  # as Retry-After asks, staggered

        await asyncio.gather(*(client_task(w) for w in range(N_CLIENTS)))

    start = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - start
    cpu, server_cpu = time.process_time() - cpu, cpu_seconds(pid) - server_cpu

    leavers = [i for i in range(N_REQUESTS) if i % LEAVE_EVERY == LEAVE_EVERY - 1]
    assert sorted(left) == leavers
    assert sorted(answers) == sorted(set(range(N_REQUESTS)) - set(leavers))
    # complete answers; identical requests (same variant) give identical answers, streamed or not
    by_variant: dict[int, list[tuple[bool, dict]]] = {}
    for i, answer in answers.items():
        body = request_body(i, images)
        assert answer["finish_reasons"] in (["stop"], ["length"]), (i, answer)
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        if body["ignore_eos"]:
            assert answer["finish_reasons"] == ["length"] and usage["completion_tokens"] == body["max_tokens"], i
        else:
            assert 1 <= usage["completion_tokens"] <= body["max_tokens"]
        by_variant.setdefault(i % N_VARIANTS, []).append((body["stream"], answer))
    for v, group in sorted(by_variant.items()):
        assert {stream for stream, _ in group} == {True, False}, v
        reference = group[0][1]
        for stream, answer in group:
            assert answer["text"] == reference["text"], (v, stream, answer["text"], reference["text"])
            assert answer["finish_reasons"] == reference["finish_reasons"], v
            for field in ("prompt_tokens", "completion_tokens"):
                assert answer["usage"][field] == reference["usage"][field], (v, field)
            if v % 2 == 0:
                assert answer["usage"]["prompt_tokens_details"]["image_tokens"] == 16
    # overflow: 503s, fast, counted by the server; nothing else went wrong
    assert overloads, f"{N_CLIENTS} clients against a capacity of {MAX_NUM_SEQS + MAX_QUEUED} saw no 503"
    assert attempts["n"] == N_REQUESTS + len(overloads)
    assert statistics.median(overloads) < 2 and max(overloads) < 15, sorted(overloads)[-5:]  # client timeout: 60 s

    # the clients that left: aborted, and all memory back to the idle level
    def settled() -> dict[str, float] | None:
        m = scrape(url)
        idle = (live_kv_bytes(m) == live_kv_bytes(before) and m["fastllava_engine_num_running"] == 0
                and m["fastllava_engine_num_requests"] == 0 and m["fastllava_requests_in_flight"] == 0)
        return m if idle else None

    deadline = time.monotonic() + 15
    while (after := settled()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after is not None, f"not back to idle: {scrape(url)}"

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    counts = {name: delta(name) for name in (
        "fastllava_engine_requests_aborted_total", "fastllava_client_disconnects_total",
        'fastllava_requests_rejected_total{reason="server_overloaded"}',
        'fastllava_http_requests_total{endpoint="chat",status="200"}', "fastllava_engine_requests_failed_total")}
    assert list(counts.values()) == [len(leavers), len(leavers), len(overloads), len(answers), 0], counts
    assert after["fastllava_engine_kv_cache_peak_bytes"] > 0
    # requests really shared engine steps (one token per sequence and step: more than one per step on average
    # means batches of several), so the identical answers above held across different batch compositions
    per_step = delta("fastllava_engine_tokens_generated_total") / delta("fastllava_engine_steps_total")
    assert per_step > 1.3, per_step
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    log = Path(log_path).read_text()
    assert not re.search(r"Traceback|\bERROR\b|\bCRITICAL\b|Exception", log), log[-3000:]
    print(f"\nload: {N_REQUESTS} requests ({len(leavers)} left mid-stream), {N_CLIENTS} clients, "
          f"{len(overloads)} 503s (median {statistics.median(overloads) * 1e3:.0f} ms), {per_step:.1f} tokens per "
          f"engine step, {elapsed:.1f} s (CPU: server {server_cpu:.1f} s, clients {cpu:.1f} s)")


# ------------------------------------------------------------------------------- benchmarks/bench_server.py smoke


def load_bench_server():
    """benchmarks/bench_server.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    import importlib.util

    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(benchmarks) not in sys.path:
        sys.path.insert(0, str(benchmarks))
    spec = importlib.util.spec_from_file_location("bench_server_script", benchmarks / "bench_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_server_processor_files_have_the_real_ids(tmp_path):
    """The processor directory the benchmark serves the random llava-interleave-qwen-0.5b checkpoint with: the real
    special-token ids (151643-151646), 729 image tokens per image, and transformers reads it the same way."""
    bench = load_bench_server()
    from common import llava_interleave_qwen_0_5b_config
    from transformers import AutoProcessor as HFAutoProcessor

    config = llava_interleave_qwen_0_5b_config()
    checkpoint = tmp_path / "checkpoint"  # no weights needed: only the files to link
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "model.safetensors").write_bytes(b"")
    serving = bench.make_serving_dir(tmp_path / "serve", checkpoint, config)
    assert (serving / "model.safetensors").is_symlink() and (serving / "config.json").resolve() == \
        (checkpoint / "config.json").resolve()
    check = bench.check_serving_dir(serving, config)
    assert check["vocab"] == 151647 and check["image_tokens"] == 729
    assert re.fullmatch(r"( [a-z]{3,4}){4}", check["sample_decode"]), check  # fillers decode to short words
    theirs = HFAutoProcessor.from_pretrained(str(serving)).tokenizer
    from fastllava.processing import AutoProcessor

    ours = AutoProcessor.from_pretrained(str(serving)).tokenizer
    text = "<|im_start|>user <image>\nWhat colour is the car?<|im_end|><|im_start|>assistant\n"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert theirs.convert_tokens_to_ids("<image>") == 151646 and theirs.eos_token_id == 151645
    fillers = bench.filler_tokens(30, {"\u0120aab"})
    assert len(set(fillers)) == 30 and "\u0120aab" not in fillers


def test_bench_server_runs_at_toy_size(tmp_path):
    """The whole script at toy size (same architecture, a few MB): serving dir, server, 1 and 2 streaming clients."""
    bench = load_bench_server()
    rows = bench.main(["--toy", "--out", str(tmp_path), "--concurrency", "1", "2", "--requests", "3",
                       "--new-tokens", "3", "--prompt-words", "6", "--image-size", "64", "48"])
    assert [row["concurrency"] for row in rows] == [1, 2]
    for row in rows:
        assert row["requests"] == 3 and row["new_tokens"] == 9 and row["tok_s"] > 0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] and row["itl_p50_ms"] <= row["itl_p95_ms"]
        assert row["prompt_tokens"] > 16 and row["cached_tokens"] >= 16  # the shared image's prefix is cached
        assert row["mean_batch"] >= 1
    summary = bench.summarize([{"ttft": 0.1, "itl": [0.01, 0.03], "e2e": 0.2, "completion_tokens": 3,
                                "prompt_tokens": 10, "cached_tokens": 0}], 0.5, 1)
    assert summary["tok_s"] == 6 and summary["itl_p50_ms"] == pytest.approx(20) and summary["tpot_ms"] == \
        pytest.approx(50)
    assert bench.quantile([1, 2, 3, 4], 0.5) == 2.5 and bench.quantile([5], 0.95) == 5
