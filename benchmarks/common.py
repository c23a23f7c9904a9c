"""Small helpers shared by the benchmark scripts: real architecture configs, memory readings, output.

``llava_interleave_qwen_0_5b_config`` and ``llava_1_5_7b_config`` are the config.json of
llava-hf/llava-interleave-qwen-0.5b-hf and llava-hf/llava-1.5-7b-hf (dicts, so either library can build them;
``ARCHITECTURES`` maps a name to the real and a toy-size config); ``make_random_checkpoint`` writes a random-weight
checkpoint of a config with transformers, in the target dtype from the start (no fp32 copy), and reuses it when
already there.
``memory_status`` reads the process's current and peak resident memory; ``run_json_subprocess`` runs a command
in a fresh interpreter and returns the JSON object it printed last. ``print_table`` / ``emit_json`` write the
human table and the one-JSON-line-per-result output every benchmark prints (see DESIGN.md, Conventions).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent

# config.json of llava-hf/llava-interleave-qwen-0.5b-hf (transformers 4.43 export). Note the text model is
# Qwen1.5-0.5B-Chat (hidden 1024, 16 heads, no GQA), not Qwen2-0.5B, and the SigLIP tower keeps 26 of
# so400m's 27 layers without the pooling head; 0.86 B parameters, 1.73 GB in bf16 like the hub file.
LLAVA_INTERLEAVE_QWEN_0_5B: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "ignore_index": -100,
    "image_token_index": 151646,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "text_config": {
        "_name_or_path": "Qwen/Qwen1.5-0.5B-Chat",
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vocab_size": 152000,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "layer_norm_eps": 1e-06,
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def llava_interleave_qwen_0_5b_config(text: dict[str, Any] | None = None,
                                      vision: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """The real config as a fresh dict; overrides shrink it for tests (same architecture, toy sizes)."""
    return _fresh_config(LLAVA_INTERLEAVE_QWEN_0_5B, text, vision, top)


def _fresh_config(base: dict[str, Any], text: dict[str, Any] | None, vision: dict[str, Any] | None,
                  top: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with the text, vision and top-level overrides applied."""
    config = copy.deepcopy(base)
    config["text_config"].update(text or {})
    config["vision_config"].update(vision or {})
    config.update(top)
    return config


def toy_llava_interleave_config() -> dict[str, Any]:
    """The same architecture at toy size (a few MB), for tests of the benchmark scripts."""
    return llava_interleave_qwen_0_5b_config(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=28, patch_size=7),
        image_token_index=511,
    )


# config.json of llava-hf/llava-1.5-7b-hf (transformers 4.37-4.39 exports; also llava-hf's copies of it), with
# every field the hub file leaves to a default written out. Sources: the hub file gives image_token_index 32000,
# pad_token_id 32001 (top level, not in text_config), projector gelu, vision_feature_layer -2, strategy "default",
# tie_word_embeddings false; text_config max_position_embeddings 4096, rms_norm_eps 1e-5, vocab_size 32064
# (lmsys/vicuna-7b-v1.5); vision_config hidden 1024, intermediate 4096, 24 layers, 16 heads, image 336, patch
# 14, projection_dim 768 (openai/clip-vit-large-patch14-336). The rest are the defaults of transformers'
# LlamaConfig (hidden 4096, intermediate 11008, 32 layers, 32 heads, KV heads = heads, silu, rope_theta 1e4, no
# biases) and CLIPVisionConfig (layer_norm_eps 1e-5, quick_gelu), checked against transformers 5.25 in the venv
# (tests/test_benchmark_scripts.py asserts them). 7.06 B parameters, 14.1 GB in bf16 (the hub file is fp16).
LLAVA_1_5_7B: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "ignore_index": -100,
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_act": "quick_gelu",
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
    },
}


def llava_1_5_7b_config(text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
                        **top: Any) -> dict[str, Any]:
    """The real llava-1.5-7b config as a fresh dict; overrides shrink it for tests."""
    return _fresh_config(LLAVA_1_5_7B, text, vision, top)


def toy_llava_1_5_config() -> dict[str, Any]:
    """llava-1.5's architecture (CLIP tower, penultimate layer without CLS, Llama text model) at toy size."""
    return llava_1_5_7b_config(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=256),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=28, patch_size=7, projection_dim=16),
        image_token_index=510, pad_token_id=511,
    )


# name -> (real config, toy config of the same architecture)
ARCHITECTURES = {
    "llava-interleave-qwen-0.5b": (llava_interleave_qwen_0_5b_config, toy_llava_interleave_config),
    "llava-1.5-7b": (llava_1_5_7b_config, toy_llava_1_5_config),
}


def config_fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def make_random_checkpoint(directory: str | os.PathLike, config: dict[str, Any], dtype: str = "bfloat16",
                           seed: int = 0) -> tuple[Path, bool]:
    """Write a random-weight transformers checkpoint of ``config`` unless one for it is there; (dir, built)."""
    directory = Path(directory)
    stamp = directory / "bench_config_fingerprint.txt"
    fingerprint = config_fingerprint({"config": config, "dtype": dtype, "seed": seed})
    if stamp.is_file() and stamp.read_text().strip() == fingerprint and safetensors_files(directory):
        return directory, False
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch_dtype = getattr(torch, dtype)
    hf_config = LlavaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    # Parameters are created and initialised directly in the target dtype: no fp32 copy is ever made.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        model = LlavaForConditionalGeneration._from_config(hf_config, dtype=torch_dtype)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    model.save_pretrained(directory)
    stamp.write_text(fingerprint + "\n")
    return directory, True


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def safetensors_weight_bytes(directory: str | os.PathLike) -> int:
    """Sum of the tensor data bytes of every .safetensors file in a directory (headers excluded)."""
    total = 0
    for path in safetensors_files(directory):
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        header.pop("__metadata__", None)
        total += sum(end - begin for begin, end in (entry["data_offsets"] for entry in header.values()))
    return total


def memory_status() -> dict[str, int]:
    """This process's memory in bytes: rss/hwm (VmRSS/VmHWM), rss_anon/rss_file, ru_maxrss; page-fault counts.

    VmHWM is this address space's own peak. Linux carries ru_maxrss across fork+exec, so in a subprocess it
    is at least the parent's peak: it only cross-checks VmHWM when the parent was the smaller process.
    """
    out: dict[str, int] = {}
    names = {"VmRSS": "rss", "VmHWM": "hwm", "RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem"}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in names:
                    out[names[key]] = int(value.split()[0]) * 1024  # reported in kB
    except OSError:  # not Linux: only getrusage below
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["ru_maxrss"] = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # kB on Linux
    out["minflt"], out["majflt"] = usage.ru_minflt, usage.ru_majflt  # page faults so far (counts, not bytes)
    return out


def run_json_subprocess(args: Sequence[str], timeout: float = 1800, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python args...`` in a fresh interpreter; return the last JSON object line it printed."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(args)} printed no JSON line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], file=None) -> None:
    """A plain aligned text table of the given columns."""
    file = file or sys.stdout
    cells = [[_cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)), file=file)


def emit_json(record: dict[str, Any], file=None) -> None:
    """One result as one JSON line."""
    file = file or sys.stdout
    print(json.dumps(record, sort_keys=False), file=file, flush=True)


MIB = 1024 * 1024


def read_bandwidth_gb_s(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-N GB/s of torch.sum over a buffer larger than the caches: the machine's read bandwidth."""
    import torch

    buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9
