"""benchmarks/bench_engine.py runs end to end at toy size and reports what it promises (no real benchmark in CI)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
pytest.importorskip("transformers")


def load_bench():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_script_bench_engine", BENCHMARKS / "bench_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kv_layout_measures_every_layout():
    rows = load_bench().bench_kv_layout(lengths=(64,), repeats=2)
    assert {(r["dtype"], r["cached_tokens"]) for r in rows} == {("float32", 64), ("bfloat16", 64)}
    assert all(r["contiguous_ms"] > 0 and r["paged_blocks_ms"] > 0 for r in rows)


def test_decode_attention_measures_every_variant(cpu_kernels):
    bench = load_bench()
    rows = bench.bench_decode_attention(lengths=(16,), head_configs=((4, 2),), repeats=2, cold_bytes=1 << 20)
    assert len(rows) == 1 and rows[0]["bench"] == "decode-attention"
    names = ["sdpa_fp32", "sdpa_bf16", "torch_single_query_fp32", "torch_single_query_bf16"]
    if cpu_kernels == "fastllava-gemv":
        names += ["ours_fp32", "ours_bf16"]
    assert all(rows[0][f"{name}_{kind}_ms"] > 0 for name in names for kind in ("warm", "cold"))
    assert ("ours_bf16_warm_ms" in rows[0]) == (cpu_kernels == "fastllava-gemv")
    prefill = bench.bench_prefill_attention(chunk=8, pasts=(0, 8), repeats=1)
    assert [r["past"] for r in prefill] == [0, 8]
    assert all(r[f"{name}_ms"] > 0 for r in prefill for name in ("fp32", "bf16", "bf16_cast_fp32"))


def test_toy_run_reports_ratios_and_identical_outputs(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["bench_engine.py", "--toy", "--out", str(tmp_path), "--threads", "1",
                                      "--only", "throughput", "shared-images", "repeat", "--concurrency", "2",
                                      "--new-tokens", "2", "4"])
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by = {(r["bench"], r.get("library"), r.get("new_tokens")): r for r in records}
    for name in ("distinct-images", "shared-images"):
        for new_tokens in (2, 4):  # one run to 4 tokens; the 2-token rows are read off its first 2 steps
            ours, theirs = by[(name, "fastllava-engine", new_tokens)], by[(name, "transformers", new_tokens)]
            assert ours["tok_s"] > 0 and theirs["tok_s"] > 0 and ours["run_new_tokens"] == 4
            ratio = by[(name, "ratio", new_tokens)]
            assert ratio["identical_outputs"] == f"{ratio['requests']}/{ratio['requests']}"
        assert by[(name, "transformers", 2)]["total_s"] < by[(name, "transformers", 4)]["total_s"]
    by = {(r["bench"], r.get("library")): r for r in records}
    assert by[("shared-images", "ratio")]["image_cache_hits"] >= 1
    assert by[("repeat-image-ttft", None)]["cached_tokens"] > 0
    assert by[("second-turn-ttft", None)]["cached_tokens"] > by[("repeat-image-ttft", None)]["cached_tokens"]
    assert by[("memory", None)]["peak_rss_gib"] > 0


def test_transformers_in_another_dtype_is_labelled_and_not_compared(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["bench_engine.py", "--toy", "--out", str(tmp_path), "--threads", "1",
                                      "--only", "throughput", "--concurrency", "1", "--new-tokens", "2",
                                      "--theirs-dtype", "bfloat16"])
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by = {r.get("library"): r for r in records if r["bench"] == "distinct-images"}
    assert by["fastllava-engine"]["dtype"] == "float32" and by["transformers"]["dtype"] == "bfloat16"
    assert by["ratio"]["identical_outputs"] == "not compared (dtypes differ)"
