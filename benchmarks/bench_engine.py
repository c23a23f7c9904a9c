"""Serving benchmark: the fastllava engine vs transformers' batched generate on the same concurrent requests.

Model: the real llava-interleave-qwen-0.5b architecture with random weights (benchmarks/common.py builds the
checkpoint once under bench_out/), one 384x384 image per request (729 image tokens) in the interleave chat
prompt, greedy decoding of exactly ``--new-tokens`` tokens (EOS ignored / suppressed so both do the same work).
Sections (``--only`` picks some):

* ``kv-layout``: the measurement behind engine/kv_pool.py - SDPA of one decode query over a contiguous
  per-sequence cache vs over blocks gathered from a paged pool, fp32 and bf16 (one layer, 16 heads x 64).
* ``decode-attention``: the measurement behind fastllava/kernels/attention.cpp and the KV cache dtype
  (models/half_matmul.py resolve_kv_dtype): one decode query over 256/800 cached tokens (16/16 and 14/2 heads),
  the C++ kernel over bf16 and fp32 caches vs SDPA and the PyTorch single-query path, in cache and cold; and SDPA
  of a 750-token prefill chunk over fp32 vs bf16 caches.
* ``throughput``: N concurrent requests with distinct images, all arriving at once: transformers' batched
  ``generate`` (left-padded) vs the engine. Generated tok/s, p50/p95 time to first token and inter-token latency
  (transformers' per-step times are taken by a logits processor), the engine's prefill phase against the compute
  floor (prefill FLOPs / this run's measured GEMM rate), and how many outputs are identical.
* ``shared-images``: N requests asking different questions about N/4 images (the caches at work), same measures.
* ``repeat``: time to first token of a second question about an image already seen, with the caches and
  without, against the first question's; and of a chat's second turn against its first.

Every comparison runs both libraries in this process; ratios are ours over theirs (tok/s: higher is better,
times: lower is better). One JSON line per result, plus a table; peak RSS at the end.

    python benchmarks/bench_engine.py [--dtype float32] [--concurrency 4] [--new-tokens 32] [--only ...]

``--dtype float32`` is the default because on this machine's AVX2 CPU (no bf16 arithmetic) transformers' bf16
GEMMs run at ~6-8 GFLOP/s (the ``gemm`` line of each run): its bf16 prefill of one image prompt takes about two
minutes, so a bf16 run is long. fastllava computes those products in float32 (fastllava/models/half_matmul.py),
which is why its bf16 prefill can beat the printed bf16 "floor". ``--dtype bfloat16`` runs the same benchmark in
bf16. On a shared, busy machine use ``--threads 1``: with two OpenMP threads and other processes on the two
cores, every small parallel region waits for a descheduled thread (a 4-sequence decode step measured 4.7 s with
2 threads against 0.9 s with 1).

2026-12-06 (session 12), after decode steps moved to the lean C++ decoder (one request alone or several each over
its own cache), bf16 both sides, two threads, ``--dtype bfloat16 --concurrency 1 4 --new-tokens 64 --only
throughput``: 1 request: 11.70 vs 5.86 tok/s (2.00x; 64 tokens after a 3.9 s image prefill), TTFT 3.91 vs 4.06 s,
ITL p50 0.023 vs 0.107 s; 4 distinct images: 14.49 vs 8.86 tok/s (1.64x), TTFT p50 11.9 vs 17.1 s (0.69x), ITL
p50 0.037 vs 0.186 s, outputs identical 4/4.

Measured 2026-12-04 (session 5) on a Zen 4 EPYC with AVX512-BF16 (PyTorch's bf16 GEMMs native there: 210
GFLOP/s one thread, so transformers' bf16 prefill is fast too), bf16 both sides, ``--threads 1 --concurrency 16
--new-tokens 64 256 --shared-requests 16 --only throughput shared-images repeat``, the 2 cores shared with a
training run and other benchmarks (load 2-5; transformers' runs went first, at the lower load):
16 questions about 4 images: 5.25x transformers' tok/s at 64 tokens (12.79 vs 2.44), 5.44x at 256 (27.4 vs
5.04); TTFT p50 56.3 s vs 300.5 s (0.19x); ITL p50 0.35 vs 2.0 s. 16 distinct images: 0.96x at 64 tokens (2.97
vs 3.09 tok/s: prefill-bound, our prefill phase 312 s against their 191 s, ours run under the heavier load;
one prompt's prefill measured alone equals generate()'s), 2.26x at 256 (8.83 vs 3.91); TTFT p50 143.7 s vs 190.6
s (0.75x); ITL p50 0.63 vs 2.14 s. A repeated image's TTFT 0.44 s against 9.99 s first (0.044x); a second chat
turn 0.40 s (0.040x); peak RSS 6.1 GiB. Re-run with one training job on the other core for both libraries
(load 1.4-2, ``--concurrency 16 --new-tokens 64 --only throughput``): 16 distinct images 1.46x transformers' tok/s
(7.19 vs 4.93; target 1.3x met), TTFT p50 72.7 s vs 147.6 s (0.49x), our prefill 128.3 s = 0.87x theirs and 1.54x
the 83.2 s compute floor (GEMM 204 GFLOP/s), ITL p50 0.26 vs 0.94 s, outputs identical 16/16, peak RSS 5.8 GiB.
Same conditions, ``--concurrency 1 4 --new-tokens 64 256``: 1 request 1.80x at 64 tokens, 2.55x at 256 (TTFT 0.94x,
ITL p50 0.063 vs 0.220 s); 4 requests 1.55x at 64, 2.47x at 256 (TTFT p50 0.71x, ITL p50 0.094 vs 0.404 s).
In the first run greedy outputs were identical in 15/16 and 14/16 requests at 64 tokens, fewer
at 256: both sides run native bf16 products here, which round differently in a 16-row batch than in the engine's
chunks; the engine's equality with generate() is shown in float32 by tests/test_engine.py.

Earlier, on an AVX2 EPYC without bf16 arithmetic (bf16 both sides, 2 cores shared with a training run, load average 1.3-3, ``--threads 1 --concurrency 1 4
--new-tokens 64 256 --shared-requests 4 --only throughput shared-images repeat``, 2026-11-25, with the C++ GEMV
kernels and huge-page weights): distinct images, 1 request: 4.26x transformers' tok/s at 64 tokens, 3.27x at 256
(TTFT 20.5 s vs 107.1 s = 0.19x; inter-token p50 0.108 s vs 0.203 s); 4 requests: 5.58x at 64, 4.41x at 256 (TTFT
p50 57.4 s vs 473.3 s = 0.12x, p95 74.1 s; ITL p50 0.28 s vs 0.69 s a step), outputs identical 4/4; 4 questions
about one image: 14.6x at 64, 7.68x at 256 (TTFT 0.041x; 2160 prompt tokens from the prefix cache, 3 image-cache
hits), identical 4/4; a repeated image's TTFT 1.12 s against 18.6 s uncached and 23.0 s first (0.049x); a second
chat turn 0.98 s (0.042x); peak RSS 4.6 GiB. 16 distinct images (``--concurrency 16 --theirs-dtype float32``:
transformers' bf16 prefill of 16 image prompts would take ~30 min here, so it ran in float32, its fastest on this
CPU): 1.52x transformers' tok/s at 64 tokens, 1.96x at 256; TTFT p50 148 s vs 332 s (0.45x), p95 259 s; prefill
0.79x theirs; ITL p50 1.37 s vs 3.06 s a 16-sequence step. 16 questions about 4 images (``--threads 2
--new-tokens 64 --shared-requests 16 --theirs-dtype float32``): 2.39x tok/s, TTFT p50 0.28x (8640 prompt tokens
from the prefix cache); our 16-row decode steps (1.05 s, float32 products) are now the larger share of the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (  # noqa: E402
    emit_json,
    llava_interleave_qwen_0_5b_config,
    make_random_checkpoint,
    memory_status,
    print_table,
    toy_llava_interleave_config,
)

# Qwen chat-template ids of the interleave prompt around the image: "<|im_start|>user\n" ... "<|im_end|>\n<|im_start|>assistant\n"
IM_START, IM_END, USER, ASSISTANT, NEWLINE, PAD = 151644, 151645, 872, 77091, 198, 151643


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------------- kv layout


def best_time(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_kv_layout(lengths: tuple[int, ...] = (256, 800), repeats: int = 20) -> list[dict[str, Any]]:
    """SDPA of one decode query: contiguous per-sequence cache (strided view) vs gathered blocks / slots."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    heads, dim, block, pool_blocks = 16, 64, 16, 1024  # a pool of 16k tokens
    rows = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for length in lengths:
                g = torch.Generator().manual_seed(0)
                q = torch.randn(1, heads, 1, dim, generator=g).to(dtype)
                own = torch.randn(2, heads, length + 64, dim, generator=g).to(dtype)  # a sequence's own storage
                pool = torch.randn(2, pool_blocks, heads, block, dim, generator=g).to(dtype)
                ids = torch.randperm(pool_blocks, generator=g)[: -(-length // block)]
                slots_pool = pool.permute(0, 2, 1, 3, 4).reshape(2, heads, pool_blocks * block, dim)
                slots = (ids[:, None] * block + torch.arange(block)).reshape(-1)[:length]

                def contiguous():
                    return F.scaled_dot_product_attention(q, own[0, :, :length][None], own[1, :, :length][None])

                def blocks():
                    k = pool[0].index_select(0, ids).permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, :length]
                    v = pool[1].index_select(0, ids).permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, :length]
                    return F.scaled_dot_product_attention(q, k[None], v[None])

                def gathered_slots():
                    k, v = slots_pool[0].index_select(1, slots), slots_pool[1].index_select(1, slots)
                    return F.scaled_dot_product_attention(q, k[None], v[None])

                times = {name: best_time(fn, repeats) * 1e3 for name, fn in
                         (("contiguous", contiguous), ("paged_blocks", blocks), ("paged_slots", gathered_slots))}
                rows.append({"bench": "kv-layout", "dtype": str(dtype).replace("torch.", ""), "cached_tokens": length,
                             "contiguous_ms": times["contiguous"], "paged_blocks_ms": times["paged_blocks"],
                             "paged_slots_ms": times["paged_slots"],
                             "ratio_blocks_over_contiguous": times["paged_blocks"] / times["contiguous"]})
    finally:
        torch.set_num_threads(threads)
    return rows


def bench_decode_attention(lengths: tuple[int, ...] = (256, 800),
                           head_configs: tuple[tuple[int, int], ...] = ((16, 16), (14, 2)),
                           repeats: int = 20, cold_bytes: int = 256 << 20) -> list[dict[str, Any]]:
    """One decode query over a sequence's cached K/V (a strided view of its own storage, as the engine reads it),
    per layer, one thread: fastllava's C++ kernel over bf16 and fp32 caches vs torch's SDPA (fp32, bf16) and vs
    the PyTorch single-query path (models/attention.py). ``warm``: the same layer again and again (in cache);
    ``cold``: a rotation through distinct layers totalling ``cold_bytes`` (> L3), as a real step reads them."""
    from fastllava.kernels.build import gemv_kernels_available
    from fastllava.models.attention import _single_query_torch

    kernel = gemv_kernels_available()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dim = 64
    rows = []
    try:
        for heads, kv_heads in head_configs:
            for length in lengths:
                row: dict[str, Any] = {"bench": "decode-attention", "heads": heads, "kv_heads": kv_heads,
                                       "head_dim": dim, "cached_tokens": length}
                for dtype in (torch.float32, torch.bfloat16):
                    name = "fp32" if dtype == torch.float32 else "bf16"
                    g = torch.Generator().manual_seed(0)
                    layer_bytes = 2 * kv_heads * (length + 64) * dim * dtype.itemsize
                    count = max(2, cold_bytes // layer_bytes)
                    storages = [torch.randn(2, kv_heads, length + 64, dim, generator=g).to(dtype) for _ in range(count)]
                    q = torch.randn(1, heads, 1, dim, generator=g).to(dtype)
                    views = [(s[0, :, :length][None], s[1, :, :length][None]) for s in storages]
                    candidates = {
                        f"sdpa_{name}": lambda k, v: F.scaled_dot_product_attention(q, k, v,
                                                                                    enable_gqa=heads != kv_heads),
                        f"torch_single_query_{name}": lambda k, v: _single_query_torch(q, k, v, None),
                    }
                    if kernel:
                        candidates[f"ours_{name}"] = lambda k, v: torch.ops.fastllava.decode_attention(
                            q[:, :, 0], k, v, None, dim ** -0.5)
                    for label, fn in candidates.items():
                        row[f"{label}_warm_ms"] = best_time(lambda: fn(*views[0]), repeats) * 1e3
                        for k, v in views[: min(4, count)]:
                            fn(k, v)
                        best = float("inf")
                        for _ in range(max(1, repeats // 10)):
                            start = time.perf_counter()
                            for k, v in views:
                                fn(k, v)
                            best = min(best, (time.perf_counter() - start) / count)
                        row[f"{label}_cold_ms"] = best * 1e3
                    del storages, views
                if kernel:
                    row["ours_bf16_over_sdpa_fp32_cold"] = row["ours_bf16_cold_ms"] / row["sdpa_fp32_cold_ms"]
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def bench_prefill_attention(chunk: int = 750, pasts: tuple[int, ...] = (0, 750),
                            repeats: int = 15) -> list[dict[str, Any]]:
    """SDPA of a prefill chunk over a sequence's cache (16 heads x 64, one thread), the cache in fp32 or bf16, and
    bf16 cast to fp32 first (the view's copy included): the other half of the KV-dtype decision."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    heads, dim = 16, 64
    rows = []
    try:
        for past in pasts:
            total = past + chunk
            g = torch.Generator().manual_seed(0)
            storage = torch.randn(2, heads, total + 64, dim, generator=g)
            q = torch.randn(1, heads, chunk, dim, generator=g)
            mask = None if past == 0 else (torch.arange(past, total)[:, None] - torch.arange(total)[None]) >= 0
            row: dict[str, Any] = {"bench": "prefill-attention", "heads": heads, "head_dim": dim, "chunk": chunk,
                                   "past": past}
            for label, dtype, cast in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                       ("bf16_cast_fp32", torch.bfloat16, True)):
                own = storage.to(dtype)
                query = q.to(dtype)

                def run():
                    k, v = own[0, :, :total][None], own[1, :, :total][None]
                    qq = query
                    if cast:
                        qq, k, v = query.float(), k.float(), v.float()
                    out = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, is_causal=mask is None)
                    return out.to(dtype)

                row[f"{label}_ms"] = best_time(run, repeats) * 1e3
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def gemm_gflops(dtype: torch.dtype) -> float:
    x, w = torch.randn(512, 1024).to(dtype), torch.randn(2816, 1024).to(dtype)
    return 2 * 512 * 1024 * 2816 / best_time(lambda: F.linear(x, w), 3) / 1e9


# ---------------------------------------------------------------------------------------------------- workloads


class Prompts:
    """Pre-tokenized interleave chat prompts: [im_start user \\n] image [question] [im_end \\n im_start assistant \\n]."""

    def __init__(self, config: dict, seed: int = 0):
        self.vocab = min(config["text_config"]["vocab_size"], 150000)
        # the real chat-template ids, or small stand-ins for a toy vocabulary
        self.ids = (IM_START, IM_END, USER, ASSISTANT, NEWLINE) if self.vocab >= 150000 else (3, 4, 5, 6, 7)
        self.pad = PAD if self.vocab >= 150000 else 1
        vision = config["vision_config"]
        self.image_size = vision["image_size"]
        self.image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
        self.image_token = config["image_token_index"]
        self.generator = torch.Generator().manual_seed(seed)

    def image(self) -> torch.Tensor:
        return torch.randn(1, 3, self.image_size, self.image_size, generator=self.generator)

    def question(self, length: int) -> list[int]:
        return torch.randint(10, self.vocab - 10, (length,), generator=self.generator).tolist()

    def user(self) -> list[int]:
        start, _, user, _, newline = self.ids
        return [start, user, newline]

    def assistant(self) -> list[int]:
        start, end, _, assistant, newline = self.ids
        return [end, newline, start, assistant, newline]

    def make(self, image: torch.Tensor, question: list[int]) -> dict[str, Any]:
        ids = self.user() + [self.image_token] * self.image_tokens + question + self.assistant()
        return {"prompt_token_ids": ids, "pixel_values": image}


class StepClock:
    """A logits processor that only records when transformers reaches each decoding step."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_transformers(model, prompts: list[dict], new_tokens: int, pad: int) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    longest = max(len(p["prompt_token_ids"]) for p in prompts)
    ids = torch.full((len(prompts), longest), pad)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as transformers wants for generation
        tokens = prompt["prompt_token_ids"]
        ids[row, longest - len(tokens):] = torch.tensor(tokens)
        mask[row, longest - len(tokens):] = 1
    pixels = torch.cat([p["pixel_values"] for p in prompts]).to(model.dtype)
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             pad_token_id=pad)
    # every row gets its tokens at the same steps
    return {"start": start, "stamps": [list(clock.times)] * len(prompts),
            "tokens": [row[longest:].tolist() for row in out]}


def run_engine(engine, prompts: list[dict], new_tokens: int, tag: str) -> dict[str, Any]:
    from fastllava.engine.types import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    stamps: dict[str, list[float]] = {f"{tag}-{i}": [] for i in range(len(prompts))}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            stamps[out.request_id].extend([now] * len(out.outputs[0].token_ids_delta))
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return {"start": start, "stamps": [stamps[f"{tag}-{i}"] for i in range(len(prompts))],
            "tokens": [tokens[f"{tag}-{i}"] for i in range(len(prompts))]}


def first_tokens_view(result: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    """The measures of a run that stopped after ``new_tokens`` tokens, read off a longer run's timestamps: with
    EOS ignored, every request's first N steps are the same work whether it goes on afterwards or not (in
    transformers' batched generate and in the engine, where no request finishes before step N either)."""
    start, stamps = result["start"], [s[:new_tokens] for s in result["stamps"]]
    ttft = [s[0] - start for s in stamps]
    return {"total_s": max(s[-1] for s in stamps) - start, "ttft": ttft, "prefill_s": max(ttft),
            "itl": [b - a for s in stamps for a, b in zip(s, s[1:])],
            "tokens": [t[:new_tokens] for t in result["tokens"]]}


def prefill_flops(model, prompts: list[dict], images: int, image_tokens: int) -> float:
    """2 x parameters x tokens for the text model (embeddings excluded) and the vision tower (+ projector)."""
    text = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed_tokens" not in n)
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    vision += sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    return 2 * text * tokens + 2 * vision * images * image_tokens


def compare(name: str, prompts: list[dict], lengths: list[int], ours, theirs, engine_kwargs: dict, floor: float,
            images: int, pad: int) -> list[dict[str, Any]]:
    """One run of each library to the longest of ``lengths``; rows for every length (first_tokens_view)."""
    from fastllava.engine import Engine

    longest = max(lengths)
    theirs_run = run_transformers(theirs, prompts, longest, pad)
    engine = Engine(ours, None, max_num_seqs=len(prompts), **engine_kwargs)
    ours_run = run_engine(engine, prompts, longest, name)
    stats = engine.stats()
    rows = []
    for new_tokens in sorted(lengths):
        rows += compare_rows(name, prompts, new_tokens, first_tokens_view(ours_run, new_tokens),
                             first_tokens_view(theirs_run, new_tokens), stats, floor, images, longest,
                             dtypes=(ours.dtype, theirs.dtype))
    return rows


def compare_rows(name: str, prompts: list[dict], new_tokens: int, ours_result: dict, theirs_result: dict,
                 stats: dict, floor: float, images: int, run_tokens: int, dtypes: tuple) -> list[dict[str, Any]]:
    generated = len(prompts) * new_tokens
    rows = []
    same_dtype = dtypes[0] == dtypes[1]
    for library, result, dtype in (("fastllava-engine", ours_result, dtypes[0]), ("transformers", theirs_result, dtypes[1])):
        rows.append({"bench": name, "library": library, "dtype": str(dtype).removeprefix("torch."),
                     "requests": len(prompts), "images": images,
                     "new_tokens": new_tokens, "prompt_tokens": len(prompts[0]["prompt_token_ids"]),
                     "total_s": result["total_s"], "tok_s": generated / result["total_s"],
                     "ttft_p50_s": statistics.median(result["ttft"]), "ttft_p95_s": quantile(result["ttft"], 0.95),
                     "itl_p50_s": quantile(result["itl"], 0.5), "itl_p95_s": quantile(result["itl"], 0.95),
                     "prefill_s": result["prefill_s"], "prefill_floor_s": floor, "run_new_tokens": run_tokens})
    same = sum(a == b for a, b in zip(ours_result["tokens"], theirs_result["tokens"]))
    rows.append({"bench": name, "library": "ratio", "requests": len(prompts), "images": images,
                 "new_tokens": new_tokens, "tok_s": rows[0]["tok_s"] / rows[1]["tok_s"],
                 "ttft_p50_s": rows[0]["ttft_p50_s"] / rows[1]["ttft_p50_s"],
                 "prefill_s": rows[0]["prefill_s"] / rows[1]["prefill_s"],
                 "prefill_over_floor": rows[0]["prefill_s"] / floor,
                 "identical_outputs": f"{same}/{len(prompts)}" if same_dtype else "not compared (dtypes differ)",
                 "prefix_hit_tokens": stats["prefix_cache"]["hit_tokens"],
                 "image_cache_hits": stats["image_cache"]["hits"], "preemptions": stats["preemptions"]})
    return rows


def ttft_of(engine, request_id: str, prompt: dict, new_tokens: int = 2) -> tuple[float, list[int], int]:
    from fastllava.engine.types import SamplingParams

    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    first, tokens, cached = None, [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs and out.outputs[0].token_ids:
                first = time.perf_counter() - start
            if out.finished:
                tokens, cached = out.outputs[0].token_ids, out.num_cached_tokens
    return first, tokens, cached


def bench_repeat(ours, factory: Prompts, engine_kwargs: dict, answer_tokens: int) -> list[dict[str, Any]]:
    from fastllava.engine import Engine

    image = factory.image()
    first_prompt = factory.make(image, factory.question(24))
    second_prompt = factory.make(image, factory.question(30))
    rows = []
    cached = Engine(ours, None, **engine_kwargs)
    ttft_of(cached, "warm-up", {"prompt_token_ids": factory.question(64)})  # allocator and kernels, not measured
    first, answer, _ = ttft_of(cached, "q1", first_prompt, answer_tokens)
    second, _, hit = ttft_of(cached, "q2", second_prompt)
    cold = Engine(ours, None, enable_prefix_caching=False, image_cache_bytes=0, **engine_kwargs)
    uncached, _, _ = ttft_of(cold, "q2", second_prompt)
    rows.append({"bench": "repeat-image-ttft", "first_s": first, "repeat_cached_s": second,
                 "repeat_uncached_s": uncached, "ratio_cached_over_first": second / first,
                 "ratio_uncached_over_first": uncached / first, "cached_tokens": hit,
                 "prompt_tokens": len(second_prompt["prompt_token_ids"]), "target_ratio": 0.3})
    # the chat's next turn: the conversation so far (prompt + answer) plus a new question
    turn2 = {"prompt_token_ids": first_prompt["prompt_token_ids"] + answer + factory.assistant()[:2] + factory.user()
             + factory.question(20) + factory.assistant(), "pixel_values": image}
    turn_ttft, _, hit = ttft_of(cached, "t2", turn2)
    rows.append({"bench": "second-turn-ttft", "first_turn_s": first, "second_turn_s": turn_ttft,
                 "ratio": turn_ttft / first, "cached_tokens": hit, "prompt_tokens": len(turn2["prompt_token_ids"]),
                 "target_ratio": 0.1})
    return rows


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--theirs-dtype", choices=["float32", "bfloat16"], default=None,
                        help="transformers' dtype when it differs from ours: float32 is its fastest on CPUs without bf16 "
                             "arithmetic (5x its bf16 prefill), so ours-bf16 against theirs-float32 is a lower bound on "
                             "the bf16-vs-bf16 ratio; outputs then differ by rounding and are not compared")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32])
    parser.add_argument("--shared-requests", type=int, default=4, help="requests in the shared-images workload")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--toy", action="store_true", help="the same architecture at toy size (tests of this script)")
    parser.add_argument("--only", nargs="+", default=["kv-layout", "throughput", "shared-images", "repeat"],
                        choices=["kv-layout", "decode-attention", "throughput", "shared-images", "repeat"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []

    def report(new_rows):
        for row in new_rows:
            emit_json(row)
        rows.extend(new_rows)

    if "kv-layout" in args.only:
        report(bench_kv_layout())
    if "decode-attention" in args.only:
        report(bench_decode_attention())
        report(bench_prefill_attention())
    if set(args.only) <= {"kv-layout", "decode-attention"}:
        return

    import transformers

    import fastllava

    dtype = getattr(torch, args.dtype)
    config = toy_llava_interleave_config() if args.toy else llava_interleave_qwen_0_5b_config()
    name = "llava-interleave-toy-random" if args.toy else "llava-interleave-qwen-0.5b-random"
    directory, _ = make_random_checkpoint(Path(args.out) / name, config)
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    gflops = gemm_gflops(dtype)
    report([{"bench": "gemm", "dtype": args.dtype, "gflops": gflops,
             "gflops_bf16": gemm_gflops(torch.bfloat16) if dtype != torch.bfloat16 else gflops}])
    engine_kwargs = {"max_num_batched_tokens": args.max_num_batched_tokens}
    factory = Prompts(config)
    if "repeat" in args.only:
        report(bench_repeat(ours, factory, engine_kwargs, answer_tokens=min(args.new_tokens)))
    theirs = None
    if {"throughput", "shared-images"} & set(args.only):
        theirs_dtype = getattr(torch, args.theirs_dtype or args.dtype)
        theirs = transformers.LlavaForConditionalGeneration.from_pretrained(directory, dtype=theirs_dtype).eval()
    lengths = sorted(set(args.new_tokens))  # one run per workload, to the longest; shorter ones read off it
    if "throughput" in args.only:
        for count in args.concurrency:
            prompts = [factory.make(factory.image(), factory.question(20 + 3 * i)) for i in range(count)]
            floor = prefill_flops(ours, prompts, count, factory.image_tokens) / (gflops * 1e9)
            report(compare("distinct-images", prompts, lengths, ours, theirs, engine_kwargs, floor, count, factory.pad))
    if "shared-images" in args.only:
        count = args.shared_requests
        images = [factory.image() for _ in range(max(1, count // 4))]
        prompts = [factory.make(images[i % len(images)], factory.question(20 + 3 * i)) for i in range(count)]
        floor = prefill_flops(ours, prompts, len(images), factory.image_tokens) / (gflops * 1e9)
        report(compare("shared-images", prompts, lengths, ours, theirs, engine_kwargs, floor, len(images), factory.pad))
    memory = memory_status()
    report([{"bench": "memory", "peak_rss_gib": memory.get("hwm", memory["ru_maxrss"]) / 2 ** 30}])
    columns = ["bench", "library", "requests", "new_tokens", "total_s", "tok_s", "ttft_p50_s", "ttft_p95_s",
               "itl_p50_s", "itl_p95_s", "prefill_s", "prefill_floor_s", "identical_outputs"]
    table = [r for r in rows if "library" in r]
    if table:
        print()
        print_table(table, columns)


if __name__ == "__main__":
    main()
