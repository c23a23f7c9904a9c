"""Load benchmark: peak memory and time of ``from_pretrained`` and of the first forward, fastllava vs transformers.

A random-weight bf16 checkpoint of the real llava-interleave-qwen-0.5b architecture is written once with
transformers (default ``./bench_out/llava-interleave-qwen-0.5b-random``, reused when present). Then each
measurement runs in a fresh interpreter (``--worker``), so no number depends on another: it imports torch and
the library, records the baseline resident memory (VmRSS), times ``LlavaForConditionalGeneration.from_pretrained(
dir, dtype=torch.bfloat16)``, then times the first forward of a short text-only prompt (a lazy loader pays its
page faults there, so it cannot hide cost) and records VmRSS / VmHWM / ru_maxrss after each step. Runs alternate
between the libraries; the medians are printed as a table and as one JSON line per library plus one of ratios.

``rss_over_weights = (peak_rss - baseline_rss) / weights_bytes`` where peak_rss is the process's high-water mark
after load and first forward, and weights_bytes the tensor bytes of the checkpoint. Targets: fastllava <= 1.15
and a load time no slower than transformers'. Run: ``python benchmarks/bench_load.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MIB,
    emit_json,
    llava_interleave_qwen_0_5b_config,
    make_random_checkpoint,
    median,
    memory_status,
    print_table,
    run_json_subprocess,
    safetensors_files,
    safetensors_weight_bytes,
    toy_llava_interleave_config,
)

LIBRARIES = ("fastllava", "transformers")
RSS_TARGET = 1.15
SCRIPT = str(Path(__file__).resolve())


# ----------------------------------------------------------------------------------------------------------
# Worker side: runs inside a fresh interpreter


def measure_load(library: str, checkpoint: str, prompt_tokens: int = 16) -> dict[str, Any]:
    """Import, load and run one forward in this process; every memory figure in bytes, every time in seconds."""
    start = time.perf_counter()
    import torch

    if library == "fastllava":
        import fastllava

        model_class = fastllava.LlavaForConditionalGeneration  # resolves the lazy export: imports model code
    elif library == "transformers":
        from transformers import LlavaForConditionalGeneration as model_class
    else:
        raise ValueError(f"unknown library {library!r}; use one of {LIBRARIES}")
    import_s = time.perf_counter() - start
    gc.collect()
    before = memory_status()
    modules_before = set(sys.modules)

    start = time.perf_counter()
    model = model_class.from_pretrained(checkpoint, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    after_load = memory_status()
    # Imports a loader defers into from_pretrained are part of its cost; name the heavy one (torch._dynamo).
    imported_during_load = set(sys.modules) - modules_before

    vocab = model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, min(vocab, 150000), (1, prompt_tokens), generator=generator)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
    forward_s = time.perf_counter() - start
    after_forward = memory_status()
    last = logits[0, -1].float()
    # The same forward again: what the first one cost beyond it is paging weights in and one-time setup.
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    second_forward_s = time.perf_counter() - start

    # A text-only forward never reads the vision tower, so a lazy (mmap) loader still has ~half the weights
    # unread. Touch one element per page of every tensor to get the memory cost of a fully resident model.
    start = time.perf_counter()
    touch_all(model)
    touch_s = time.perf_counter() - start
    after_touch = memory_status()

    result: dict[str, Any] = {
        "library": library,
        "import_s": import_s,
        "load_s": load_s,
        "forward_s": forward_s,
        "load_forward_s": load_s + forward_s,
        "second_forward_s": second_forward_s,
        "touch_s": touch_s,
        "baseline_rss": before["rss"],
        "baseline_peak_rss": before["hwm"],
        "logits_sum": float(last.sum()),
        "logits_argmax": int(last.argmax()),
        "param_dtype": str(next(model.parameters()).dtype),
        "modules_imported_during_load": len(imported_during_load),
        "dynamo_imported_during_load": "torch._dynamo" in imported_during_load,
    }
    previous = before
    for prefix, status in (("load", after_load), ("forward", after_forward), ("touch", after_touch)):
        result.update({f"{prefix}_{key}": value for key, value in status.items() if not key.endswith("flt")})
        for kind in ("minflt", "majflt"):  # page faults taken in this step
            result[f"{prefix}_{kind}"] = status[kind] - previous[kind]
        previous = status
    return result


def touch_all(model) -> float:
    """Read one element per memory page of every parameter and buffer (forces mmap-backed weights in)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.numel() and tensor.device.type != "meta":
                step = max(1, 4096 // tensor.element_size())
                total += float(tensor.detach().reshape(-1)[::step].float().sum())
    return total


def worker_build(out: str, toy: bool) -> dict[str, Any]:
    config = toy_llava_interleave_config() if toy else llava_interleave_qwen_0_5b_config()
    start = time.perf_counter()
    directory, built = make_random_checkpoint(out, config)
    status = memory_status()
    return {"checkpoint": str(directory), "built": built, "build_s": time.perf_counter() - start,
            "build_peak_rss": status["hwm"], "build_ru_maxrss": status["ru_maxrss"]}


# ----------------------------------------------------------------------------------------------------------
# Driver side


def summarize(runs: list[dict[str, Any]], weights_bytes: int) -> dict[str, Any]:
    """Median over runs of one library, plus the derived figures."""
    numeric = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict[str, Any] = {"library": runs[0]["library"], "runs": len(runs)}
    out.update({key: median(run[key] for run in runs) for key in numeric})
    out["logits_sum"] = runs[0]["logits_sum"]
    out["logits_argmax"] = runs[0]["logits_argmax"]
    for key in ("param_dtype", "dynamo_imported_during_load"):
        out[key] = runs[0][key]
    out["weights_bytes"] = weights_bytes
    # Peak over the whole process: load, first forward, every weight page touched (VmHWM; ru_maxrss beside it
    # as a cross-check). The partial figures show what a lazy loader has not paid yet at each step.
    out["peak_rss"] = out["touch_hwm"]
    out["rss_over_weights"] = (out["touch_hwm"] - out["baseline_rss"]) / weights_bytes
    out["rss_over_weights_ru_maxrss"] = (out["touch_ru_maxrss"] - out["baseline_rss"]) / weights_bytes
    out["rss_over_weights_first_forward"] = (out["forward_hwm"] - out["baseline_rss"]) / weights_bytes
    out["rss_over_weights_load_only"] = (out["load_hwm"] - out["baseline_rss"]) / weights_bytes
    out["import_load_s"] = median(run["import_s"] + run["load_s"] for run in runs)
    out["load_s_all"] = [round(run["load_s"], 3) for run in runs]
    out["forward_s_all"] = [round(run["forward_s"], 3) for run in runs]
    return out


def ratios(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    keys = ["load_s", "forward_s", "second_forward_s", "load_forward_s", "import_s", "import_load_s", "rss_over_weights",
            "rss_over_weights_first_forward", "rss_over_weights_load_only", "peak_rss", "baseline_rss"]
    out = {"library": "fastllava/transformers"}
    out.update({key: ours[key] / ref[key] if ref[key] else float("nan") for key in keys})
    out["same_logits"] = (ours["logits_argmax"] == ref["logits_argmax"]
                          and abs(ours["logits_sum"] - ref["logits_sum"]) <= 1e-2 * max(1.0, abs(ref["logits_sum"])))
    out["rss_target_met"] = ours["rss_over_weights"] <= RSS_TARGET
    out["time_target_met"] = ours["load_s"] <= ref["load_s"]
    out["time_target_met_incl_first_forward"] = ours["load_forward_s"] <= ref["load_forward_s"]
    return out


def warm_page_cache(directory: Path) -> None:
    """Read the weight files once so that every measured process finds them in the page cache alike."""
    for path in safetensors_files(directory):
        with open(path, "rb") as handle:
            while handle.read(64 * MIB):
                pass


def run_benchmark(out: str, repeats: int = 3, prompt_tokens: int = 16, toy: bool = False,
                  libraries: tuple[str, ...] = LIBRARIES, quiet: bool = False) -> dict[str, Any]:
    build = run_json_subprocess([SCRIPT, "--build", "--out", out] + (["--toy"] if toy else []))
    checkpoint = Path(build["checkpoint"])
    weights_bytes = safetensors_weight_bytes(checkpoint)
    if not quiet:
        action = f"built in {build['build_s']:.1f} s, builder peak RSS {build['build_peak_rss'] / MIB:.0f} MiB" \
            if build["built"] else "reused"
        print(f"checkpoint {checkpoint} ({weights_bytes / MIB:.1f} MiB of tensors): {action}", flush=True)
    warm_page_cache(checkpoint)
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libraries}
    for repeat in range(repeats):
        order = libraries if repeat % 2 == 0 else tuple(reversed(libraries))
        for library in order:
            result = run_json_subprocess([SCRIPT, "--worker", library, "--checkpoint", str(checkpoint),
                                          "--prompt-tokens", str(prompt_tokens)])
            runs[library].append(result)
            if not quiet:
                print(f"  run {repeat + 1}/{repeats} {library:12s} load {result['load_s']:.3f} s  "
                      f"first forward {result['forward_s']:.3f} s  peak RSS {result['forward_hwm'] / MIB:.0f} MiB",
                      flush=True)
    summaries = {lib: summarize(runs[lib], weights_bytes) for lib in libraries}
    records: list[dict[str, Any]] = [dict(bench="load", **summaries[lib]) for lib in libraries]
    if set(LIBRARIES) <= set(libraries):
        records.append(dict(bench="load", **ratios(summaries["fastllava"], summaries["transformers"])))
    build_info = {key: value for key, value in build.items() if key != "checkpoint"}
    for record in records:
        record.update(checkpoint=str(checkpoint), prompt_tokens=prompt_tokens, **build_info)
    return {"records": records, "summaries": summaries, "weights_bytes": weights_bytes}


def print_report(result: dict[str, Any]) -> None:
    rows = []
    for lib, s in result["summaries"].items():
        rows.append({
            "library": lib,
            "import_s": s["import_s"],
            "load_s": s["load_s"],
            "1st_fwd_s": s["forward_s"],
            "2nd_fwd_s": s["second_forward_s"],
            "load+fwd_s": s["load_forward_s"],
            "import+load_s": s["import_load_s"],
            "base_MiB": s["baseline_rss"] / MIB,
            "peak_load": s["load_hwm"] / MIB,
            "peak_fwd": s["forward_hwm"] / MIB,
            "peak_all": s["touch_hwm"] / MIB,
            "anon_all": s["touch_rss_anon"] / MIB,
            "file_all": s["touch_rss_file"] / MIB,
            "flt_load": s["load_minflt"] + s["load_majflt"],
            "flt_fwd": s["forward_minflt"] + s["forward_majflt"],
            "majflt": s["load_majflt"] + s["forward_majflt"] + s["touch_majflt"],
            "rss/w": s["rss_over_weights"],
            "rss/w_fwd": s["rss_over_weights_first_forward"],
            "rss/w_load": s["rss_over_weights_load_only"],
        })
    print()
    print(f"weights_bytes = {result['weights_bytes']} ({result['weights_bytes'] / MIB:.1f} MiB); "
          f"medians of {next(iter(result['summaries'].values()))['runs']} fresh processes each")
    print("memory in MiB; peak_* = VmHWM after load / after first forward / after touching every weight page;"
          " anon/file = RssAnon/RssFile at the end; rss/w = (peak_all - base) / weights_bytes, rss/w_fwd and"
          " rss/w_load the same with the earlier peaks; flt_* = page faults in load / first forward, majflt ="
          " major (disk) faults in all")
    print_table(rows, list(rows[0]))
    print()
    for record in result["records"]:
        emit_json(record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/llava-interleave-qwen-0.5b-random",
                        help="checkpoint directory (built when absent, reused when present)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per library")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--toy", action="store_true", help="a toy-size model of the same architecture")
    parser.add_argument("--only", choices=LIBRARIES, help="measure one library only")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        emit_json(worker_build(args.out, args.toy))
    elif args.worker:
        emit_json(measure_load(args.worker, args.checkpoint, args.prompt_tokens))
    else:
        libraries = (args.only,) if args.only else LIBRARIES
        out = args.out if not args.toy or args.out != parser.get_default("out") else "bench_out/toy-llava-interleave"
        print_report(run_benchmark(out, args.repeats, args.prompt_tokens, args.toy, libraries))


if __name__ == "__main__":
    main()
