"""Benchmark: LLaVA image preprocessing, fastllava beside transformers, on a batch of real photos.

Contract: builds a batch of 32 colour photos of varied sizes from ``skimage.data`` (300x451 up to 1411x1411),
runs fastllava's ``LlavaImageProcessor`` (torch) and ``LlavaImageProcessorPil`` and transformers' two processors
on it, interleaved round by round in this one process, and reports images/s (best of the rounds) with the ratio
to transformers' torch processor: a table on stderr and one JSON line per result on stdout. Inputs can be PIL
images, numpy HWC arrays or CHW uint8 tensors (``--inputs``). transformers' torch processor needs torchvision;
without it that row is skipped and the ratios are taken against transformers' PIL processor. It also checks that
fastllava's output equals transformers' PIL output. fastllava's torch processor runs the images of the batch in
``torch.get_num_threads()`` threads (``--threads``); the other three run in one: the "threads" column says which.
Absolute times on shared machines are noise; the ratios measured in one run are the result.
"""

from __future__ import annotations

import argparse
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
        "fastllava LlavaImageProcessor": LlavaImageProcessor(**config),
        "fastllava LlavaImageProcessorPil": LlavaImageProcessorPil(**config),
    }
    warnings.filterwarnings("ignore")
    import transformers

    try:
        found["transformers LlavaImageProcessor"] = transformers.LlavaImageProcessor(**config)
    except Exception as error:  # torchvision missing
        print(f"# transformers LlavaImageProcessor unavailable ({type(error).__name__}: {error})", file=sys.stderr)
    found["transformers LlavaImageProcessorPil"] = transformers.LlavaImageProcessorPil(**config)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inputs", choices=("pil", "np", "pt"), default="pil")
    parser.add_argument("--config", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for all processors")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {} if args.config == "clip" else {
        "size": {"height": 384, "width": 384}, "do_center_crop": False, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    batch = make_batch(args.inputs, args.batch)
    procs = processors(config)
    reference = procs["transformers LlavaImageProcessorPil"](batch, return_tensors="np")["pixel_values"]
    times: dict[str, list[float]] = {name: [] for name in procs}
    max_diff: dict[str, float] = {}
    for name, proc in procs.items():  # warm-up (coefficient caches, lazy imports) and the equality check
        out = proc(batch, return_tensors="np")["pixel_values"]
        max_diff[name] = float(np.abs(out.astype(np.float64) - reference).max())
    for _ in range(args.rounds):
        for name, proc in procs.items():
            start = time.perf_counter()
            proc(batch, return_tensors="pt")
            times[name].append(time.perf_counter() - start)
    baseline = "transformers LlavaImageProcessor" if "transformers LlavaImageProcessor" in procs else \
        "transformers LlavaImageProcessorPil"
    best = {name: min(values) for name, values in times.items()}
    print(f"# {args.batch} photos as {args.inputs}, {args.config} config, torch threads={torch.get_num_threads()}, "
          f"best of {args.rounds} rounds; ratio = speed / {baseline}", file=sys.stderr)
    print(f"{'processor':40s} {'threads':>7s} {'images/s':>10s} {'ms/batch':>10s} {'ratio':>7s} {'max|diff|':>10s}",
          file=sys.stderr)
    for name, seconds in best.items():
        ratio = best[baseline] / seconds
        # torch-based processors may use the torch threads; transformers' falls back to its PIL class without
        # torchvision, which runs in one
        uses_torch = "Pil" not in type(procs[name]).__name__
        threads = torch.get_num_threads() if uses_torch else 1
        print(f"{name:40s} {threads:7d} {args.batch / seconds:10.1f} {seconds * 1e3:10.1f} {ratio:7.2f} "
              f"{max_diff[name]:10.2e}", file=sys.stderr)
        print(json.dumps({
            "benchmark": "image_processing", "processor": name, "inputs": args.inputs, "config": args.config,
            "batch": args.batch, "threads": threads, "images_per_s": round(args.batch / seconds, 2),
            "ms_per_batch": round(seconds * 1e3, 2), "ratio_vs": baseline, "ratio": round(ratio, 3),
            "max_abs_diff_vs_transformers_pil": max_diff[name],
        }))


if __name__ == "__main__":
    main()
