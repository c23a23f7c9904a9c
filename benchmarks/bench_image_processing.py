"""Benchmark: LLaVA image preprocessing, fastllava beside transformers, on a batch of real photos.

Contract: builds a batch of 32 colour photos of varied sizes from ``skimage.data`` (300x451 up to 1411x1411),
runs fastllava's ``LlavaImageProcessor`` twice, with its C++ resampler (``torch.ops.fastllava.resample_window``)
and with the C++ kernels off (Pillow's resize, as with FASTLLAVA_KERNELS=0), fastllava's
``LlavaImageProcessorPil`` and transformers' two processors, interleaved round by round in this one process, at
each torch thread count of ``--threads`` (default 1 and 2), and reports images/s (best of the rounds) with the
ratio to transformers' torch processor: a table on stderr and one JSON line per result on stdout. Inputs can be PIL
images, numpy HWC arrays or CHW uint8 tensors (``--inputs``). transformers' torch processor needs torchvision;
without it transformers falls back to its PIL processor (that row then times the PIL one) and the ratios are taken
against it. It also checks that every output equals transformers' PIL output (max|diff|). fastllava's torch
processor runs the images of the batch in ``torch.get_num_threads()`` threads; the PIL processors run in one
whatever the setting: the "threads" column says which. Absolute times on shared machines are noise; the ratios
measured in one run, rounds interleaved, are the result.

Measured on a 2-core AMD EPYC VM (AVX2), shared with a training run and other benchmarks (load average 3.6-3.9
during the run: a second thread finds little free CPU); Pillow 13.0, torch 2.13 CPU, transformers without
torchvision (its LlavaImageProcessor is then its PIL class, one thread); 32 PIL photos, CLIP config, best of 15
interleaved rounds, every output bit-identical to transformers' (max|diff| 0):

    processor                                  torch threads   images/s   ratio vs transformers (same setting)
    fastllava LlavaImageProcessor (kernel)           1           1231.8    11.79
    fastllava LlavaImageProcessor (Pillow)           1            184.3     1.76
    transformers LlavaImageProcessor                 1            104.5     1.00
    fastllava LlavaImageProcessor (kernel)           2           1140.1    12.70
    fastllava LlavaImageProcessor (Pillow)           2            231.5     2.58
    transformers LlavaImageProcessor                 2 (uses 1)    89.7     1.00

An earlier run under heavier load gave 788 / 137 / 82 images/s (kernel 9.6x) with 1 thread and 829 / 137 / 82
(10.1x) with 2. The second thread does not help the kernel here: the machine's other core is busy, and the kernel
is short enough (~0.8 ms an image) that scheduling noise dominates; the Pillow path, 7x heavier, still gains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry", "retina",
          "rocket")


def make_batch(kind: str, count: int) -> list:
    import skimage.data

    arrays = [getattr(skimage.data, name)() for name in PHOTOS]
    arrays = [arrays[i % len(arrays)] for i in range(count)]
    if kind == "pil":
        return [Image.fromarray(a) for a in arrays]
    if kind == "np":
        return [np.ascontiguousarray(a) for a in arrays]
    return [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]  # (C, H, W) uint8


def processors(config: dict) -> dict:
    from fastllava.image_processing import LlavaImageProcessor, LlavaImageProcessorPil

    found = {
        KERNEL: LlavaImageProcessor(**config),
        PILLOW: LlavaImageProcessor(**config),
        "fastllava LlavaImageProcessorPil": LlavaImageProcessorPil(**config),
    }
    warnings.filterwarnings("ignore")
    import transformers

    try:
        found["transformers LlavaImageProcessor"] = transformers.LlavaImageProcessor(**config)
    except Exception as error:  # torchvision missing (newer transformers fall back to the PIL class instead)
        print(f"# transformers LlavaImageProcessor unavailable ({type(error).__name__}: {error})", file=sys.stderr)
    found["transformers LlavaImageProcessorPil"] = transformers.LlavaImageProcessorPil(**config)
    return found


KERNEL = "fastllava LlavaImageProcessor (kernel)"
PILLOW = "fastllava LlavaImageProcessor (Pillow)"


@contextlib.contextmanager
def kernels(enabled: bool):
    """The C++ kernels on (built if needed; an error if they cannot be) or off (FASTLLAVA_KERNELS=0's path)."""
    from fastllava.kernels import build

    if enabled:
        if not build.load():
            raise SystemExit("fastllava's C++ kernels are not available (FASTLLAVA_KERNELS=0, no compiler, no AVX2)")
        yield
        return
    saved = build._state.get("loaded")
    build._state["loaded"] = False
    try:
        yield
    finally:
        build._state["loaded"] = saved


def run(name: str, proc, batch, return_tensors: str):
    with kernels(name != PILLOW):
        return proc(batch, return_tensors=return_tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inputs", choices=("pil", "np", "pt"), default="pil")
    parser.add_argument("--config", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to measure")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    config = {} if args.config == "clip" else {
        "size": {"height": 384, "width": 384}, "do_center_crop": False, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    batch = make_batch(args.inputs, args.batch)
    procs = processors(config)
    reference = procs["transformers LlavaImageProcessorPil"](batch, return_tensors="np")["pixel_values"]
    max_diff: dict[str, float] = {}
    for name, proc in procs.items():  # warm-up (kernel build, coefficient caches, lazy imports), equality check
        out = run(name, proc, batch, "np")["pixel_values"]
        max_diff[name] = float(np.abs(out.astype(np.float64) - reference).max())
    times = {(threads, name): [] for threads in thread_counts for name in procs}
    for _ in range(args.rounds):  # interleaved: thread counts and processors share the machine's noise
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for name, proc in procs.items():
                start = time.perf_counter()
                run(name, proc, batch, "pt")
                times[threads, name].append(time.perf_counter() - start)
    baseline = "transformers LlavaImageProcessor" if "transformers LlavaImageProcessor" in procs else \
        "transformers LlavaImageProcessorPil"
    print(f"# {args.batch} photos as {args.inputs}, {args.config} config, best of {args.rounds} interleaved rounds; "
          f"ratio = speed / {baseline} at the same setting", file=sys.stderr)
    print(f"{'processor':42s} {'threads':>7s} {'images/s':>10s} {'ms/batch':>10s} {'ratio':>7s} {'max|diff|':>10s}",
          file=sys.stderr)
    for threads in thread_counts:
        best = {name: min(times[threads, name]) for name in procs}
        for name, seconds in best.items():
            ratio = best[baseline] / seconds
            # transformers' processors (its torch class falls back to PIL without torchvision) and the PIL ones
            # run in one thread; fastllava's torch processor uses the torch threads
            uses = threads if name in (KERNEL, PILLOW) else 1
            print(f"{name:42s} {uses:7d} {args.batch / seconds:10.1f} {seconds * 1e3:10.1f} {ratio:7.2f} "
                  f"{max_diff[name]:10.2e}", file=sys.stderr)
            print(json.dumps({
                "benchmark": "image_processing", "processor": name, "inputs": args.inputs, "config": args.config,
                "batch": args.batch, "torch_threads": threads, "threads": uses,
                "images_per_s": round(args.batch / seconds, 2), "ms_per_batch": round(seconds * 1e3, 2),
                "ratio_vs": baseline, "ratio": round(ratio, 3), "max_abs_diff_vs_transformers_pil": max_diff[name],
            }))


if __name__ == "__main__":
    main()
