"""Side-by-side generation speed: fastllava vs transformers on the llava-interleave-qwen-0.5b and llava-1.5-7b
architectures.

A bf16 random-weight checkpoint of the real architecture (made by transformers in bf16 from the start, never an
fp32 copy; cached under bench_out/), one image per sequence in the architecture's chat prompt (interleave: a
384x384 image, 729 image tokens, 757 prompt tokens; llava-1.5: 336x336 through CLIP ViT-L/14-336, 576 image tokens
in "USER: <image>\nWhat is shown in this image? ASSISTANT:", 594 prompt tokens), greedy decoding of exactly
``--new-tokens`` tokens (EOS suppressed by min_new_tokens so both libraries do the same work), batch 1 and 8 (the
7b: batch 1). Reports per library: time to first token and decode tokens/s, both from per-token timestamps of one
generate() (a streamer), the ratios ours/theirs, the decode bandwidth achieved (decoder layers + final norm +
lm_head weight bytes x tok/s) against this machine's read bandwidth measured in the same run, and (0.5b) a
multi-turn check: the second turn's time to first token with the conversation's KV cache reused, against the
first turn's. One JSON line per result.

``--separate-processes`` (the default for ``--arch llava-1.5-7b``: the two 14 GB models do not fit in 24 GiB
together) runs each library in its own fresh interpreter, one after the other: the checkpoint is made by a third
process, so the parent never holds a model; each worker imports its library, loads (``load_s``), warms up,
generates, records its peak RSS (VmHWM), frees the model and measures the read bandwidth in that same process.

    python benchmarks/bench_generate.py [--new-tokens 64] [--batches 1 8] [--repeats 2]
    python benchmarks/bench_generate.py --arch llava-1.5-7b --threads 1 --new-tokens 32 --repeats 1

llava-1.5-7b, 2026-12-05 (session 7, with the prefill attention kernel), ``--arch llava-1.5-7b --threads 1 --batches 1
--repeats 1``, separate processes, quiet: 128 new tokens: TTFT 40.4 vs 43.4 s (0.931x), decode 1.81 vs 0.589 tok/s
(3.07x), 23.9 GB/s = 0.987 of the 24.2 GB/s probe in fastllava's process (transformers 7.8 GB/s, 0.23 of 34.2 in
its own), peak RSS 13.63 vs 13.85 GiB (0.984x), load 20.2 vs 0.9 s; 32 new tokens: TTFT 41.0 vs 44.5 s (0.923x),
decode 1.74 vs 0.60 tok/s (2.88x), 0.872 of 26.4 GB/s, peak RSS 13.67 vs 13.84 GiB. The random checkpoint took 109 s.

llava-interleave-qwen-0.5b, 2026-12-05 (session 7), same Zen 4 machine, ``--threads 1 --batches 1 --new-tokens 128
--repeats 1``, quiet (load ~1). Before the prefill attention kernel: TTFT 7.18 vs 7.24 s (0.992x), decode 23.35 vs 6.01
tok/s (3.89x), 0.789 of a 27.5 GB/s probe. With fastllava/kernels/prefill_attention.cpp (AVX512-BF16 flash-style
attention for the vision tower and the causal prompt): TTFT 6.59 vs 7.18 s (0.918x) and 6.70 vs 7.28 s (0.921x) in two
runs; decode 24.82 vs 6.46 tok/s (3.84x), 0.738 of a 31.2 GB/s probe, and 22.03 vs 6.08 (3.63x), 0.615 of a 33.2 GB/s
probe: the probe and our decode move by 10-20% between runs minutes apart on this shared machine, so the 0.75
bandwidth target is met in some runs and not others. ``--threads 2``: TTFT 3.50 vs 3.74 s (0.935x), decode 28.98 vs
10.60 tok/s (2.73x), 0.484 of a 55.6 GB/s two-thread probe (the GEMVs alone measured 28-35 GB/s on two threads
minutes later, against a 33.9 GB/s probe then).
Session 8 (2026-12-05), after the one-pass decode attention for heads with their own K/V, same command, a noisy
machine (our bf16 and transformers both ~15% below the session-7 runs): TTFT 6.81 vs 7.46 s (0.914x), decode 19.51
vs 5.40 tok/s (3.61x), 0.531 of a 34.1 GB/s probe. Per decode-attention call inside this run's steps (757 cached
tokens, 16 x 64 heads): 145-150 us against 189-193 before.
Session 9 (2026-12-05), after the batch-1 VNNI loops' shared row sums and the one-op attention half of the lean decode
step (kernels/attention_step.cpp, ~0.3 ms a token less Python): ``--threads 1``, same command: TTFT 6.52 vs 7.18 s
(0.907x), decode 24.06 vs 6.37 tok/s (3.78x), 0.682 of a 32.7 GB/s probe; a second run TTFT 0.891x, decode 22.85 vs
6.33 (3.61x), 0.645 of 32.9 GB/s. Both cores (the default, ``--batches 1 --new-tokens 128 --repeats 1``): TTFT 3.76
vs 4.26 s (0.883x), decode 37.02 vs 9.15 tok/s (4.04x), 34.4 GB/s = 1.02 of the 33.6 GB/s two-thread probe (the
probe itself ranged 32.5-55.6 GB/s across sessions on this shared machine).
Session 10 (2026-12-05), after the decode step's layers, final norm and lm_head became one C++ call
(kernels/decoder_layers.cpp, ~1.5 ms a token less on two threads), same command: two threads (default), two runs:
TTFT 3.62 vs 4.09 s (0.884x), decode 41.15 vs 9.74 tok/s (4.23x), 38.2 GB/s = 0.566 of a 67.4 GB/s probe (a probe
of 35.4 GB/s just before it, 45.9 just after the next run); TTFT 3.63 vs 3.94 s (0.923x), decode 43.68 vs 9.51
(4.59x), 40.5 GB/s = 1.185 of a 34.2 GB/s probe. One thread: TTFT 6.29 vs 7.18 s (0.875x), decode 24.13 vs 6.47
(3.73x), 0.718 of a 31.2 GB/s probe.
Session 11 (2026-12-05), after the KV cache moved into huge pages (+13% a token at 757 cached tokens in interleaved
runs) and ~0.4 ms a token less Python and op overhead around the step, two threads, ``--batches 1 --new-tokens 128
--repeats 2 --no-multi-turn``: TTFT 3.41 vs 4.10 s (0.830x), decode 50.07 vs 9.42 tok/s (5.31x), 46.5 GB/s = 1.22 of
a 38.0 GB/s probe.
Session 12 (2026-12-05), same command: TTFT 3.56 vs 4.01 s (0.888x), decode 47.73 vs 9.89 tok/s (4.82x), 44.3 GB/s =
1.22 of a 36.4 GB/s probe. llava-1.5-7b, two threads (the default), ``--arch llava-1.5-7b --new-tokens 128 --repeats
1``, separate processes: TTFT 22.26 vs 22.33 s (0.997x: prefill is PyTorch's bf16 GEMM in both, at the machine's
~375 GFLOP/s), decode 3.51 vs 0.97 tok/s (3.61x), 46.4 GB/s = 0.852 of the 54.5 GB/s probe in our process
(transformers 12.9 GB/s, 0.20 of 63.3 in its own), peak RSS 13.64 vs 13.88 GiB (0.982x), load 24.3 vs 0.7 s.

llava-1.5-7b, measured here 2026-12-04 (AVX512-BF16 EPYC, 2 cores, 24 GiB; ``--arch llava-1.5-7b --threads 1
--batches 1 --new-tokens 128 --repeats 1``, warm-up on, bf16, separate processes, 594 prompt tokens), NOT quiet:
another session's train-demo (~0.75 core) ran throughout, and a second benchmark started during transformers'
process (1-min load 2.3 at the start, 3.2-4.3 during): fastllava TTFT 47.7 s vs transformers 69.2 s (0.69x),
decode 0.99 vs 0.44 tok/s (2.24x), i.e. 13.1 vs 5.8 GB/s of the 13.22 GB read per token (decoder layers + norm +
lm_head) = 0.55 of the 23.6 GB/s read bandwidth measured in fastllava's process (transformers: 0.34 of 17.0 GB/s
measured in its own); peak RSS 13.64 vs 13.84 GiB (the weights are 13.16 GiB; baselines after imports 0.22 /
0.36 GiB), so ours holds no second copy; load 33.4 s (reads the 14.1 GB file, copies the text weights into huge
pages) vs 1.0 s (transformers maps the file lazily: its page-ins fall in the warm-up generate). The random
checkpoint took 161 s to make, peak RSS 13.5 GiB. Both processes were contended, so these are lower bounds.
Second run, same day, ``--new-tokens 32``, quieter but not quiet (a train-demo, ~0.9 core, ran throughout this one
too; load 2.4 at the start, 1.1 at the end): TTFT 46.1 vs 47.9 s (0.96x), decode 1.39 vs 0.51 tok/s
(2.73x), 18.4 vs 6.7 GB/s = 0.85 of the 21.7 GB/s probe in fastllava's process (0.67 of the 27.4 GB/s probe in
transformers'; the probe itself moves with the other jobs), transformers 0.25; peak RSS 13.64 vs 13.88 GiB (0.98x);
load 48.0 vs 1.1 s.

llava-interleave-qwen-0.5b, 2026-12-04 (session 5), Zen 4 EPYC with AVX512-BF16 (transformers' bf16 is native
there), ``--threads 1 --batches 1 --new-tokens 128 --repeats 1``, warm-up on, a training job on the other core
(load 1.4-2.1): fastllava TTFT 8.61 s vs transformers 8.64 s (0.996x), decode 17.96 vs 5.34 tok/s (3.36x), 0.63 of
the 26.4 GB/s read bandwidth (target 0.75 not met; a run at load 1.4 before the lean decode step: 19.0 tok/s,
3.30x, 0.665); second chat turn TTFT 0.26 s = 0.030x the first. Same day under load 3-4: decode 3.05-3.97x, TTFT
0.94-0.99x. On the quiet machine (load ~1, 17:05) the same command gave decode 19.03 vs 5.14 tok/s (3.70x) but TTFT
8.30 vs 7.62 s (1.09x: the TTFT target is not reliably met) and 0.55 of a 32.2 GB/s one-thread probe (the probe
reads much more when nothing else runs; our decode did not). The lean decode step (generation/lean_step.py) saves 2-5 ms of a ~50-58 ms step here (interleaved
A/B in one process); what is left per token: ~37 ms of products at ~25 GB/s, ~5 ms of attention over 757 bf16
positions (78 MB), a few ms of small ops.

llava-interleave-qwen-0.5b, measured here (AVX2 EPYC, no bf16 arithmetic, 2 cores, ``--threads 1 --batches 1
--new-tokens 128 --repeats 1 --no-warmup``, bf16), 2026-11-25, session 4 (C++ kernels: GEMV/tiled products, decode
attention over a bf16 KV cache, fused RMSNorm/RoPE/SiLU, joint q/k/v and gate/up products; huge-page weights),
machine quiet (load ~1):
fastllava TTFT 18.0 s vs transformers 109.9 s (0.16x), decode 10.47 vs 4.45 tok/s (2.36x; target 2.5x not met),
0.64 of the 15.2 GB/s read bandwidth measured in the run (target 0.75 not met: the GEMV streams the 0.93 GB at
~12 GB/s, decode attention over 757 bf16 positions adds ~9 ms a token); second chat turn TTFT 0.41 s = 0.022x
the first. The same run with another job on the second core: 8.77 vs 4.85 tok/s (1.81x), 0.64 of 12.6 GB/s.
Session 3 (GEMV kernels only, float32 KV cache): 8.13 vs 4.71 tok/s (1.72x), 0.48. Before the kernels (native
bf16 GEMV): 5.27 tok/s, 0.31. Batch 8 (``--batches 8 --new-tokens 16 --no-warmup``, before the kernels): TTFT
173.7 s vs 1188.1 s (0.15x), decode 6.83 vs 5.08 tok/s (1.34x).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ARCHITECTURES,
    MIB,
    emit_json,
    make_random_checkpoint,
    median,
    memory_status,
    print_table,
    read_bandwidth_gb_s,
    run_json_subprocess,
)

SCRIPT = str(Path(__file__).resolve())
LIBRARIES = ("fastllava", "transformers")
# Text tokens before and after the image placeholders in each architecture's chat prompt.
CHAT_TOKENS = {
    # "<|im_start|>user " + "\n" ... / "What is shown in this image?<|im_end|><|im_start|>assistant\n"
    "llava-interleave-qwen-0.5b": (13, 15),
    # llava-1.5's "USER: <image>\nWhat is shown in this image? ASSISTANT:" with the Llama tokenizer: <s> ▁USER : ▁
    # before, \n What ▁is ▁shown ▁in ▁this ▁image ? ▁A SS IST ANT : after (5 + 576 + 13 = 594 tokens)
    "llava-1.5-7b": (5, 13),
}


def make_inputs(config: dict, batch: int, seed: int = 0, arch: str = "llava-interleave-qwen-0.5b") -> dict:
    """The architecture's chat prompt around one image per row: text ids, the image placeholders, text ids
    (729 placeholders for interleave's SigLIP tower; 576 for llava-1.5's CLIP tower, CLS dropped)."""
    generator = torch.Generator().manual_seed(seed)
    vision = config["vision_config"]
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    # random text ids below the image token and the vocabulary's end (150000 kept for interleave's figures)
    vocab = min(150000, config["image_token_index"], config["text_config"]["vocab_size"])
    prefix_len, suffix_len = CHAT_TOKENS[arch]
    prefix = torch.randint(100, vocab, (batch, prefix_len), generator=generator)
    suffix = torch.randint(100, vocab, (batch, suffix_len), generator=generator)
    images = torch.full((batch, image_tokens), config["image_token_index"])
    input_ids = torch.cat([prefix, images, suffix], dim=1)
    pixel_values = torch.randn(batch, 3, vision["image_size"], vision["image_size"], generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values}


class TokenClock:
    """A streamer (transformers' put/end protocol, which fastllava follows too) that timestamps each new token
    batch, so one generate() call yields both TTFT and the decode rate, free of prefill-time noise. ``clock``:
    ``time.time`` where another process must share the time base."""

    def __init__(self, clock=time.perf_counter):
        self.times: list[float] = []
        self._prompt_seen = False
        self._clock = clock

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.times.append(self._clock())

    def end(self) -> None:
        pass


def timed_generate(model, inputs: dict, new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s per sequence) of one greedy generate()."""
    clock = TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock)
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens, out.shape
    ttft = clock.times[0] - start
    decode = (len(clock.times) - 1) / max(clock.times[-1] - clock.times[0], 1e-9)
    return ttft, decode


def text_weight_bytes(model) -> int:
    """Bytes read per decoded token: the decoder layers, final norm and lm_head (tied weights counted once; an
    untied input embedding is only gathered, so llava-1.5's 263 MB embed_tokens is not counted)."""
    text = model.model.language_model
    seen, total = set(), 0
    for module in (text.layers, text.norm, model.lm_head):
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel() * parameter.element_size()
    return total


def multi_turn(model, config: dict, new_tokens: int, arch: str = "llava-interleave-qwen-0.5b") -> dict:
    """TTFT of a first chat turn (image + prompt) and of a second turn that reuses the KV cache."""
    from fastllava.generation.session import DecodeSession

    inputs = make_inputs(config, 1, seed=7, arch=arch)
    vocab = min(150000, config["image_token_index"], config["text_config"]["vocab_size"])
    second_turn = torch.randint(100, vocab, (1, 24), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        session = DecodeSession(model, 1, inputs["input_ids"].shape[1] + new_tokens + 64)
        start = time.perf_counter()
        logits = session.extend(inputs["input_ids"], pixel_values=inputs["pixel_values"])
        first = time.perf_counter() - start
        token = logits.argmax(-1)
        for _ in range(new_tokens - 1):
            token = session.step(token).argmax(-1)
        start = time.perf_counter()
        session.extend(torch.cat([token.view(1, 1), second_turn], dim=1))
        second = time.perf_counter() - start
    return {"first_turn_ttft_s": first, "second_turn_ttft_s": second, "ratio": second / first}


def load_model(library: str, directory, dtype: torch.dtype):
    if library == "fastllava":
        import fastllava

        return fastllava.LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    if library == "transformers":
        import transformers

        return transformers.LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval()
    raise ValueError(f"unknown library {library!r}")


def generation_record(library: str, dtype: str, batch: int, new_tokens: int, prompt_tokens: int, ttft: float,
                      decode_tps: float, weight_bytes: int, bandwidth: float) -> dict:
    """One library's row; at batch 1 also the decode bandwidth (weight bytes x tok/s) against the machine's."""
    record = {"bench": "generate", "library": library, "dtype": dtype, "batch": batch, "new_tokens": new_tokens,
              "prompt_tokens": prompt_tokens, "ttft_s": ttft, "decode_tok_s": decode_tps}
    if batch == 1:
        record["decode_gb_s"] = weight_bytes * decode_tps / 1e9
        record["read_bandwidth_gb_s"] = bandwidth
        record["bandwidth_fraction"] = record["decode_gb_s"] / bandwidth
    return record


def ratio_record(ours: dict, theirs: dict, batch: int) -> dict:
    ratio = {"bench": "generate", "library": "ratio fastllava/transformers", "batch": batch,
             "ttft_s": ours["ttft_s"] / theirs["ttft_s"], "decode_tok_s": ours["decode_tok_s"] / theirs["decode_tok_s"]}
    if "peak_rss" in ours and "peak_rss" in theirs:
        ratio["peak_rss_gib"] = ours["peak_rss"] / theirs["peak_rss"]
        ratio["load_s"] = ours["load_s"] / theirs["load_s"]
    return ratio


def run_in_process(args, config: dict, directory: Path) -> tuple[list[dict], dict | None, dict]:
    """Both libraries' models loaded in this process, measured batch by batch (the 0.5b architecture fits)."""
    dtype = getattr(torch, args.dtype)
    ours = load_model("fastllava", directory, dtype)
    theirs = load_model("transformers", directory, dtype)
    bandwidth = read_bandwidth_gb_s()
    weight_bytes = text_weight_bytes(ours)
    rows = []
    for batch in args.batches:
        inputs = make_inputs(config, batch, arch=args.arch)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        results = {}
        if args.warmup:
            for name, model in (("fastllava", ours), ("transformers", theirs)):
                timed_generate(model, inputs, 2)  # warm-up: allocator, kernels
        for name, model in (("fastllava", ours), ("transformers", theirs)):
            runs = [timed_generate(model, inputs, args.new_tokens) for _ in range(args.repeats)]
            results[name] = generation_record(name, args.dtype, batch, args.new_tokens, prompt_tokens,
                                              median(r[0] for r in runs), batch * median(r[1] for r in runs),
                                              weight_bytes, bandwidth)
        rows += [results["fastllava"], results["transformers"],
                 ratio_record(results["fastllava"], results["transformers"], batch)]
    turns = None
    if args.multi_turn:
        turns = {"bench": "multi_turn", "library": "fastllava", **multi_turn(ours, config, args.new_tokens, args.arch)}
    return rows, turns, {"read_bandwidth_gb_s": bandwidth, "text_weight_bytes": weight_bytes}


def measure_worker(library: str, checkpoint: str, arch: str, toy: bool, dtype_name: str, batches: list[int],
                   new_tokens: int, repeats: int, warmup: bool, turns: bool) -> dict:
    """Runs inside a fresh interpreter: load one library's model, generate for each batch size, report the
    process's peak RSS (VmHWM, taken before the bandwidth probe), then free the model and measure the read
    bandwidth in the same process. Times in s, memory in bytes."""
    config = ARCHITECTURES[arch][1 if toy else 0]()
    dtype = getattr(torch, dtype_name)
    if library == "fastllava":  # imported before the baseline and the load clock
        import fastllava  # noqa: F401
    else:
        import transformers  # noqa: F401
        from transformers import LlavaForConditionalGeneration  # noqa: F401  (transformers imports lazily)
    gc.collect()
    baseline = memory_status()
    start = time.perf_counter()
    model = load_model(library, checkpoint, dtype)
    load_s = time.perf_counter() - start
    after_load = memory_status()
    results = []
    for batch in batches:
        inputs = make_inputs(config, batch, arch=arch)
        if warmup:
            timed_generate(model, inputs, 2)  # warm-up: first touch of the mmapped weights, allocator, kernels
        runs = [timed_generate(model, inputs, new_tokens) for _ in range(repeats)]
        results.append({"batch": batch, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                        "ttft_s": median(r[0] for r in runs), "decode_tok_s": batch * median(r[1] for r in runs),
                        "decode_tok_s_runs": [batch * r[1] for r in runs]})
    end = memory_status()
    report = {"bench": "generate_worker", "library": library, "arch": arch, "threads": torch.get_num_threads(),
              "load_s": load_s, "text_weight_bytes": text_weight_bytes(model), "baseline_rss": baseline["rss"],
              "after_load_rss": after_load["rss"], "peak_rss": end["hwm"], "results": results}
    if turns and library == "fastllava":
        report["multi_turn"] = multi_turn(model, config, new_tokens, arch)
    del model
    gc.collect()
    report["read_bandwidth_gb_s"] = read_bandwidth_gb_s()
    return report


def run_separate(checkpoint: Path, arch: str, toy: bool = False, dtype: str = "bfloat16", batches=(1,),
                 new_tokens: int = 32, repeats: int = 1, warmup: bool = True, turns: bool = False,
                 threads: int | None = None, timeout: float = 7200) -> tuple[list[dict], dict | None, dict]:
    """Each library in its own fresh interpreter, one after the other (never both models in memory at once);
    rows like the in-process mode's plus load time and peak RSS per process, and the ratio row."""
    reports = {}
    for library in LIBRARIES:
        command = [SCRIPT, "--worker", library, "--checkpoint", str(checkpoint), "--arch", arch, "--dtype", dtype,
                   "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--batches", *map(str, batches),
                   "--warmup" if warmup else "--no-warmup", "--multi-turn" if turns else "--no-multi-turn"]
        command += ["--toy"] if toy else []
        command += ["--threads", str(threads)] if threads else []
        print(f"[{time.strftime('%H:%M:%S')}] {library}: fresh process", file=sys.stderr, flush=True)
        reports[library] = run_json_subprocess(command, timeout=timeout)
    rows = []
    for batch in batches:
        records = {}
        for library, report in reports.items():
            result = next(r for r in report["results"] if r["batch"] == batch)
            record = generation_record(library, dtype, batch, new_tokens, result["prompt_tokens"], result["ttft_s"],
                                       result["decode_tok_s"], report["text_weight_bytes"],
                                       report["read_bandwidth_gb_s"])
            record.update(arch=arch, process="separate", threads=report["threads"], load_s=report["load_s"],
                          decode_tok_s_runs=result["decode_tok_s_runs"], baseline_rss=report["baseline_rss"],
                          peak_rss=report["peak_rss"], peak_rss_gib=report["peak_rss"] / (1024 * MIB))
            records[library] = record
        rows += [records["fastllava"], records["transformers"],
                 ratio_record(records["fastllava"], records["transformers"], batch)]
    turns_record = None
    if "multi_turn" in reports["fastllava"]:
        turns_record = {"bench": "multi_turn", "library": "fastllava", **reports["fastllava"]["multi_turn"]}
    ours = reports["fastllava"]
    return rows, turns_record, {"read_bandwidth_gb_s": ours["read_bandwidth_gb_s"],
                                "text_weight_bytes": ours["text_weight_bytes"],
                                "transformers_read_bandwidth_gb_s": reports["transformers"]["read_bandwidth_gb_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--arch", default="llava-interleave-qwen-0.5b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--toy", action="store_true", help="toy-size model of the same architecture (script tests)")
    parser.add_argument("--separate-processes", action=argparse.BooleanOptionalAction, default=None,
                        help="each library in its own fresh process, one after the other (default: on for the 7b)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8 (0.5b), 1 (7b)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--multi-turn", action=argparse.BooleanOptionalAction, default=None,
                        help="second chat turn's TTFT with the KV cache reused (default: on except for the 7b)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per worker process")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="bf16 is what the issue measures; float32 makes transformers' side fast on AVX2 CPUs")
    parser.add_argument("--worker", choices=[*LIBRARIES, "checkpoint"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    big = args.arch == "llava-1.5-7b" and not args.toy
    if args.separate_processes is None:
        args.separate_processes = big
    if args.multi_turn is None:
        args.multi_turn = not big
    if args.batches is None:
        args.batches = [1] if args.arch == "llava-1.5-7b" else [1, 8]
    config = ARCHITECTURES[args.arch][1 if args.toy else 0]()
    directory = Path(args.out) / f"{args.arch}{'-toy' if args.toy else ''}-bf16"

    if args.worker == "checkpoint":  # made in a process of its own, so the parent never holds the model
        start = time.perf_counter()
        _, built = make_random_checkpoint(directory, config)
        emit_json({"bench": "checkpoint", "checkpoint": str(directory), "built": built,
                   "seconds": time.perf_counter() - start, "peak_rss": memory_status()["hwm"]})
        return
    if args.worker:
        emit_json(measure_worker(args.worker, args.checkpoint, args.arch, args.toy, args.dtype, args.batches,
                                 args.new_tokens, args.repeats, args.warmup, args.multi_turn))
        return

    columns = ["library", "batch", "prompt_tokens", "ttft_s", "decode_tok_s", "decode_gb_s", "bandwidth_fraction"]
    if args.separate_processes:
        made = run_json_subprocess([SCRIPT, "--worker", "checkpoint", "--arch", args.arch, "--out", args.out]
                                   + (["--toy"] if args.toy else []), timeout=args.timeout)
        if made["built"]:
            print(f"made {directory} in {made['seconds']:.0f} s (peak RSS {made['peak_rss'] / (1024 * MIB):.1f} GiB)",
                  file=sys.stderr, flush=True)
        rows, turns, info = run_separate(directory, args.arch, args.toy, args.dtype, args.batches, args.new_tokens,
                                         args.repeats, args.warmup, args.multi_turn, args.threads, args.timeout)
        columns += ["read_bandwidth_gb_s", "peak_rss_gib", "load_s"]
    else:
        directory, _ = make_random_checkpoint(directory, config)
        rows, turns, info = run_in_process(args, config, directory)
    for row in rows:
        emit_json(row)
    if turns is not None:
        emit_json(turns)
    print()
    print_table(rows, columns)
    summary = (f"\n{args.arch}{' (toy)' if args.toy else ''}, {args.threads} thread(s): read bandwidth "
               f"{info['read_bandwidth_gb_s']:.1f} GB/s")
    if "transformers_read_bandwidth_gb_s" in info:
        summary += f" (transformers' process: {info['transformers_read_bandwidth_gb_s']:.1f})"
    summary += f"; text weights {info['text_weight_bytes'] / 1e9:.2f} GB"
    if turns is not None:
        summary += (f"; second chat turn TTFT {turns['second_turn_ttft_s']:.3f} s = {turns['ratio']:.3f} x the "
                    f"first turn's {turns['first_turn_ttft_s']:.2f} s")
    print(summary)


if __name__ == "__main__":
    main()
