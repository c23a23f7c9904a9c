"""Serving benchmark: ``fastllava serve`` under 1, 4 and 16 concurrent streaming clients.

Model: the real llava-interleave-qwen-0.5b architecture with random bf16 weights (benchmarks/common.py builds the
checkpoint once under bench_out/, the same one bench_engine.py uses), served by ``python -m fastllava.server`` (what
``fastllava serve`` runs) in a subprocess on a free loopback port. Each client sends its requests one after another
over HTTP, streamed (SSE, ``stream_options.include_usage``): a chat message with an image as a data URL (a 640x480
JPEG, resized by the processor to 384x384: 729 image tokens) and a distinct question of ``--prompt-words`` words,
greedy, EOS ignored so every answer is exactly ``--new-tokens`` tokens. Per concurrency level:

* throughput: generated tokens / wall time from the first request sent to the last answer complete (and requests/s);
* TTFT: request sent -> first content chunk, p50 / p95 over the level's requests;
* inter-token latency: the gaps between successive content chunks of a stream, p50 / p95 over all of them, and the
  mean time per output token after the first (TPOT);
* mean batch: the engine's generated tokens / engine steps during the level (from /metrics).

``--image shared`` (default) gives every request the same image: the server still receives, decodes and preprocesses
it each time, but the engine's image and prefix caches serve its features and KV after the warm-up request, so the
figures are those of follow-up questions about one picture. ``--image unique`` gives every request its own image (the
vision tower and a ~780-token prefill per request: ~30 s each in fp32 on 2 CPU cores), ``--image none`` text only.

The processor files. The random checkpoint has none, and the real tokenizer (Qwen1.5's 151643-token byte-level BPE)
cannot be downloaded here. ``make_serving_dir`` writes the hub layout of llava-hf/llava-interleave-qwen-0.5b-hf
(tokenizer.json + tokenizer_config.json + special_tokens_map.json, preprocessor_config.json for SigLIP at 384 px,
processor_config.json with patch 14 and the "full" strategy, the interleave chat template in chat_template.json)
beside symlinks to the checkpoint's files. Its tokenizer is the tiny Qwen2-style byte-level BPE of
tests/tiny_tokenizers.py (500 trained tokens, the real pre-tokenizer, normalizer and decoder) with its ids laid out
like the real one: the vocabulary is padded with filler words (" abc", " abd", ... never produced by encoding, each
decoding to a short word) up to id 151642, so that ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and ``<image>``
get their real ids 151643-151646 (the model config's image_token_index and eos). Every id the model can emit up to
151646 therefore decodes to text, as with the real tokenizer (ids 151647-151999 of the padded embedding decode to
nothing, also as with the real one). Prompts tokenize into more pieces than with the real vocabulary (fewer merges);
the prompt lengths reported are the server's own counts.

    python benchmarks/bench_server.py [--concurrency 1 4 16] [--requests N] [--new-tokens 32] [--image shared]
                                      [--dtype float32] [--device cpu] [--out bench_out]

Defaults keep a run to a few minutes on a small CPU: per level max(4, concurrency) requests of 32 new tokens.
``--threads N`` sets the server's intra-op threads: on a CPU shared with other jobs, 2 threads per op on 2 cores
made a 4-row fp32 GEMM (1024 -> 2816) 10x slower than 1 thread (19 ms vs 2 ms; each parallel region waits for both
threads to be scheduled), so a busy machine can measure faster with ``--threads 1``.
``--dtype float32`` is the default for the same reason as in bench_engine.py (this machine's AVX2 CPU has no bf16
arithmetic: a bf16 prefill of one image prompt takes minutes); on a GPU pass ``--device cuda --dtype bfloat16``.
One JSON line per level (``"bench": "server"``) and a table; the server's log is kept in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (  # noqa: E402
    REPO_ROOT,
    emit_json,
    llava_interleave_qwen_0_5b_config,
    make_random_checkpoint,
    print_table,
    toy_llava_interleave_config,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")  # the last is the image token
WORDS = ("red blue green small large square circle left right top bottom car dog cat tree house street sky person "
         "table window light dark bright picture image colour shape behind front near far many few two three").split()


# ---------------------------------------------------------------------------------------------- processor files


def filler_tokens(count: int, taken: set[str]) -> list[str]:
    """``count`` distinct byte-level tokens that decode to " xyz"-like words and are not in ``taken``."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: list[str] = []
    length = 3
    while len(out) < count:
        for index in range(len(letters) ** length):
            word = ""
            for _ in range(length):
                index, digit = divmod(index, len(letters))
                word = letters[digit] + word
            token = "\u0120" + word  # byte-level BPE writes a leading space as "Ġ"
            if token not in taken:
                out.append(token)
                if len(out) == count:
                    break
        length += 1
    return out


def write_tokenizer_with_ids(directory: Path, image_token_id: int) -> None:
    """Rewrite the tiny interleave tokenizer in ``directory`` so that its four special tokens end at
    ``image_token_id`` (151643-151646 for the real model), filling the ids between with filler words."""
    from tokenizers import Tokenizer

    tokenizer_json = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    base = len(vocab)
    first_special = image_token_id - len(SPECIAL_TOKENS) + 1
    if first_special < base:
        raise ValueError(f"image token id {image_token_id} is below the tiny tokenizer's {base} base tokens")
    for offset, token in enumerate(filler_tokens(first_special - base, set(vocab))):
        vocab[token] = base + offset
    new_ids = {token: first_special + k for k, token in enumerate(SPECIAL_TOKENS)}
    for entry in tokenizer_json["added_tokens"]:
        entry["id"] = new_ids[entry["content"]]
    # round trip through the library: the file is what `tokenizers` itself writes, and it must load
    Tokenizer.from_str(json.dumps(tokenizer_json)).save(str(directory / "tokenizer.json"))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(new_ids[entry["content"]]): entry
                                      for entry in config["added_tokens_decoder"].values()}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_serving_dir(directory: str | os.PathLike, checkpoint: str | os.PathLike, config: dict[str, Any]) -> Path:
    """A servable model directory: symlinks to the checkpoint's config and weights + llava-interleave processor
    files (hub layout) whose tokenizer has the model's real special-token ids (see the module docstring)."""
    if str(REPO_ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_tokenizers import save_processor_files

    directory, checkpoint = Path(directory), Path(checkpoint).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for source in sorted(checkpoint.iterdir()):
        if source.suffix in (".json", ".safetensors") and source.name != "bench_config_fingerprint.txt":
            link = directory / source.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(source)
    vision = config["vision_config"]
    with tempfile.TemporaryDirectory() as tmp:
        save_processor_files(tmp, "interleave", patch_size=vision["patch_size"], image_size=vision["image_size"],
                             layout="hub", chat_template_in="json")
        write_tokenizer_with_ids(Path(tmp), config["image_token_index"])
        for path in Path(tmp).iterdir():
            (directory / path.name).write_bytes(path.read_bytes())
    return directory


def check_serving_dir(directory: str | os.PathLike, config: dict[str, Any]) -> dict[str, Any]:
    """Load the directory's processor with fastllava and tokenize one image prompt: ids and counts as expected."""
    from PIL import Image

    from fastllava.processing import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(directory))
    tokenizer = processor.tokenizer
    image_token = config["image_token_index"]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    expected = {token: image_token - len(SPECIAL_TOKENS) + 1 + k for k, token in enumerate(SPECIAL_TOKENS)}
    if ids != expected:
        raise RuntimeError(f"special token ids {ids}, expected {expected}")
    if len(tokenizer) > config["text_config"]["vocab_size"]:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary only "
                           f"{config['text_config']['vocab_size']}")
    conversation = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 48), "red")},
                                                 {"type": "text", "text": "What is in the picture?"}]}]
    input_ids = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
    input_ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    input_ids = input_ids[0] if input_ids and isinstance(input_ids[0], list) else input_ids
    vision = config["vision_config"]
    image_tokens = sum(1 for i in input_ids if i == image_token)
    if image_tokens != (vision["image_size"] // vision["patch_size"]) ** 2:
        raise RuntimeError(f"{image_tokens} image tokens in the prompt")
    return {"vocab": len(tokenizer), "image_tokens": image_tokens, "prompt_tokens": len(input_ids),
            "sample_decode": tokenizer.decode(list(range(image_token - 7, image_token - 3)))}


# ---------------------------------------------------------------------------------------------------- workload


def image_data_url(seed: int, size: tuple[int, int] = (640, 480)) -> str:
    """A photo-sized synthetic JPEG (gradient + coloured boxes, different per seed) as a data URL."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = rng.uniform(0, 255, 3)
    pixels = np.stack([(base[c] + 120 * np.sin(3 * x + 2 * y + c + seed)) % 255 for c in range(3)], -1)
    image = Image.fromarray(pixels.astype("uint8"), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(1, width // 3 + 2)), y0 + int(rng.integers(1, height // 3 + 2)))
        draw.rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def question(index: int, words: int) -> str:
    """A distinct question of ``words`` words (so that no two prompts share more than the image prefix)."""
    picked = [WORDS[(index * 7 + 3 * k + k * k) % len(WORDS)] for k in range(max(0, words - 4))]
    return f"Request {index}: describe the " + " ".join(picked) + "?"


def chat_body(model: str, text: str, image_url: str | None, new_tokens: int) -> dict[str, Any]:
    content: Any = text
    if image_url is not None:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


# ---------------------------------------------------------------------------------------------------- client


async def stream_one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one streamed chat request; the arrival time of each content chunk, usage, TTFT and end-to-end time."""
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(choice["delta"].get("content") for choice in chunk["choices"]):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if usage is None or not stamps:
        raise RuntimeError("the stream ended without content or usage")
    return {"ttft": stamps[0] - start, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "e2e": end - start,
            "completion_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0}


async def run_level(url: str, concurrency: int, requests: int, make_body: Callable[[int], dict[str, Any]],
                    headers: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], float]:
    """``concurrency`` clients share ``requests`` requests (bodies ``make_body(0..requests-1)``), each client sending
    its next one when its last is answered; (per-request results, wall seconds)."""
    import httpx

    pending = list(range(requests))
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), limits=limits, headers=headers) as client:
        async def worker() -> None:
            while pending:
                results.append(await stream_one(client, url, make_body(pending.pop(0))))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: list[dict[str, Any]], wall: float, concurrency: int) -> dict[str, Any]:
    """One row of the table: throughput, TTFT and inter-token latency percentiles of a level's requests."""
    tokens = sum(r["completion_tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [gap for r in results for gap in r["itl"]]
    tpot = [(r["e2e"] - r["ttft"]) / (r["completion_tokens"] - 1) for r in results if r["completion_tokens"] > 1]
    return {
        "concurrency": concurrency, "requests": len(results),
        "prompt_tokens": sum(r["prompt_tokens"] for r in results) / max(1, len(results)),
        "cached_tokens": sum(r["cached_tokens"] for r in results) / max(1, len(results)),
        "new_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall else float("nan"),
        "req_s": len(results) / wall if wall else float("nan"),
        "ttft_p50_s": quantile(ttft, 0.5), "ttft_p95_s": quantile(ttft, 0.95),
        "itl_p50_ms": quantile(itl, 0.5) * 1e3, "itl_p95_ms": quantile(itl, 0.95) * 1e3,
        "tpot_ms": sum(tpot) / len(tpot) * 1e3 if tpot else float("nan"),
        "e2e_p50_s": quantile([r["e2e"] for r in results], 0.5),
    }


# ---------------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_metrics(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Server:
    """``python -m fastllava.server`` in a subprocess on a free loopback port; ``with Server(...) as url:``."""

    def __init__(self, model_dir: Path, args: list[str], log_path: Path, startup_timeout: float = 1800,
                 threads: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "fastllava.server", "--model", str(model_dir), "--served-model-name",
                        "bench", "--port", str(self.port), "--log-level", "info", *args]
        self.log_path, self.startup_timeout, self.threads = log_path, startup_timeout, threads
        self.process: subprocess.Popen | None = None
        self.load_s = float("nan")

    def __enter__(self) -> str:
        import httpx

        self.log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("FASTLLAVA_API_KEY", None)
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        start = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    self.load_s = time.perf_counter() - start
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not start in {self.startup_timeout} s:\n{self.tail()}")

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def errors(self) -> int:
        """Lines of the server log that report an error or a traceback."""
        return len(re.findall(r"Traceback|\bERROR\b|\bCRITICAL\b", self.log_path.read_text(errors="replace")))


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="where the checkpoint, serving dir and server log go")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default: max(4, concurrency))")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=24, help="words in each question")
    parser.add_argument("--image", default="shared", choices=["shared", "unique", "none"])
    parser.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    parser.add_argument("--dtype", default="float32", help="the server's --dtype (float32, bfloat16, auto)")
    parser.add_argument("--device", default=None, help="the server's --device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the server's intra-op threads (OMP_NUM_THREADS; default: torch's, one per core)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest concurrency")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the server (repeatable), e.g. --server-arg=--no-prefix-caching")
    parser.add_argument("--toy", action="store_true", help="the same architecture at toy size (tests of this script)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    out = Path(args.out)
    config = toy_llava_interleave_config() if args.toy else llava_interleave_qwen_0_5b_config()
    name = "llava-interleave-toy-random" if args.toy else "llava-interleave-qwen-0.5b-random"
    checkpoint, _ = make_random_checkpoint(out / name, config)
    serving = make_serving_dir(out / f"{name}-serve", checkpoint, config)
    check = check_serving_dir(serving, config)
    print(f"serving dir {serving}: vocab {check['vocab']}, {check['image_tokens']} image tokens per image, the "
          f"last four filler ids decode to {check['sample_decode']!r}", file=sys.stderr)

    levels = sorted(set(args.concurrency))
    server_args = ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs or max(levels)),
                   "--max-queued-requests", "256", "--max-model-len", "2048", *args.server_arg]
    if args.device:
        server_args += ["--device", args.device]
    size = tuple(args.image_size)
    shared = image_data_url(0, size) if args.image == "shared" else None

    def make_body(index: int, new_tokens: int = args.new_tokens) -> dict[str, Any]:
        image = image_data_url(1 + index, size) if args.image == "unique" else shared  # None: text only
        return chat_body("bench", question(index, args.prompt_words), image, new_tokens)

    rows: list[dict[str, Any]] = []
    server = Server(serving, server_args, out / "bench_server.log", threads=args.threads)
    with server as url:
        warm_start = time.perf_counter()
        asyncio.run(run_level(url, 1, 1, lambda i: make_body(10**6, 2)))  # first use; primes the shared image
        warmup_s = time.perf_counter() - warm_start
        print(f"server up in {server.load_s:.1f} s, warm-up request {warmup_s:.1f} s", file=sys.stderr)
        offset = 0
        for concurrency in levels:
            requests = args.requests or max(4, concurrency)
            bodies = [make_body(offset + i) for i in range(requests)]  # made (images encoded) before the clock
            before = scrape_metrics(url)
            results, wall = asyncio.run(run_level(url, concurrency, requests, bodies.__getitem__))
            after = scrape_metrics(url)
            offset += requests
            steps = after["fastllava_engine_steps_total"] - before["fastllava_engine_steps_total"]
            generated = (after["fastllava_engine_tokens_generated_total"]
                         - before["fastllava_engine_tokens_generated_total"])
            row = {"bench": "server", "model": name, "dtype": args.dtype, "image": args.image,
                   "threads": args.threads or "default",
                   **summarize(results, wall, concurrency), "mean_batch": generated / steps if steps else 0.0}
            emit_json(row)
            rows.append(row)
        errors = server.errors()
    print()
    print_table(rows, ["concurrency", "requests", "prompt_tokens", "cached_tokens", "new_tokens", "wall_s", "tok_s",
                       "req_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_ms", "itl_p95_ms", "tpot_ms", "mean_batch"])
    print(f"\nserver ({args.dtype}, threads: {args.threads or 'default'}, image: {args.image}): load "
          f"{server.load_s:.1f} s, warm-up {warmup_s:.1f} s, {errors} error lines in "
          f"{server.log_path}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if errors:
        raise SystemExit(f"the server logged errors:\n{server.tail()}")
    return rows


if __name__ == "__main__":
    main()
