"""The benchmark scripts import and run end to end at toy size (no real benchmark runs in CI).

Each script under benchmarks/ is loaded from its path; its helpers run on a toy model of the same architecture,
and the load benchmark's driver runs once through its fresh-process workers, checking the JSON it reports.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    """Import benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common():
    return load_script("common")


@pytest.fixture(scope="module")
def bench_load():
    return load_script("bench_load")


@pytest.fixture(scope="module")
def bench_generate():
    return load_script("bench_generate")


@pytest.fixture(scope="module")
def toy_checkpoint(common, tmp_path_factory):
    directory, built = common.make_random_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt",
                                                     common.toy_llava_interleave_config())
    assert built
    return directory


def test_real_config_matches_the_hub_architecture(common):
    from transformers import LlavaConfig

    config = LlavaConfig(**common.llava_interleave_qwen_0_5b_config())
    text, vision = config.text_config, config.vision_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.vocab_size) == ("qwen2", 1024, 24, 152000)
    assert (vision.model_type, vision.hidden_size, vision.num_hidden_layers) == ("siglip_vision_model", 1152, 26)
    assert vision.vision_use_head is False and config.vision_feature_select_strategy == "full"
    assert config.image_token_id == 151646 and config.tie_word_embeddings
    # the shared dict is never mutated by overrides
    common.llava_interleave_qwen_0_5b_config(text={"hidden_size": 8})
    assert common.LLAVA_INTERLEAVE_QWEN_0_5B["text_config"]["hidden_size"] == 1024


def test_checkpoint_is_bf16_reused_and_weight_bytes_add_up(common, toy_checkpoint):
    from safetensors import safe_open

    total = 0
    with safe_open(str(toy_checkpoint / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            assert tensor.dtype.is_floating_point is False or str(tensor.dtype) == "torch.bfloat16", key
            total += tensor.numel() * tensor.element_size()
    assert common.safetensors_weight_bytes(toy_checkpoint) == total
    again, built = common.make_random_checkpoint(toy_checkpoint, common.toy_llava_interleave_config())
    assert again == toy_checkpoint and not built


def test_memory_status_and_output_helpers(common, capsys):
    status = common.memory_status()
    assert status["ru_maxrss"] > 0
    if Path("/proc/self/status").is_file():
        assert 0 < status["rss"] <= status["hwm"]
    common.print_table([{"a": 1.23456, "b": "x"}, {"a": 12345.6, "b": "yy"}], ["a", "b"])
    common.emit_json({"a": 1})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["a", "b"] and "1.235" in lines[2] and "12346" in lines[3]
    assert json.loads(lines[-1]) == {"a": 1}


def test_measure_load_in_process(bench_load, toy_checkpoint):
    result = bench_load.measure_load("fastllava", str(toy_checkpoint), prompt_tokens=4)
    assert result["library"] == "fastllava" and result["param_dtype"] == "torch.bfloat16"
    assert result["load_s"] > 0 and result["forward_s"] > 0
    assert result["baseline_rss"] <= result["load_hwm"] <= result["forward_hwm"] <= result["touch_hwm"]
    with pytest.raises(ValueError, match="unknown library"):
        bench_load.measure_load("nope", str(toy_checkpoint))


def test_load_benchmark_end_to_end_at_toy_size(bench_load, toy_checkpoint, capsys):
    result = bench_load.run_benchmark(str(toy_checkpoint), repeats=1, prompt_tokens=4, toy=True, quiet=True)
    assert result["records"][0]["built"] is False  # the toy checkpoint made above is reused
    ours, ref, ratio = result["records"]
    assert (ours["library"], ref["library"], ratio["library"]) == ("fastllava", "transformers", "fastllava/transformers")
    for record in (ours, ref):
        assert record["weights_bytes"] == result["weights_bytes"] > 0
        expected = (record["peak_rss"] - record["baseline_rss"]) / record["weights_bytes"]
        assert record["rss_over_weights"] == pytest.approx(expected)
    assert ratio["same_logits"], (ours["logits_sum"], ref["logits_sum"])
    assert ratio["load_s"] == pytest.approx(ours["load_s"] / ref["load_s"])
    bench_load.print_report(result)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line)["library"] for line in lines] == ["fastllava", "transformers", "fastllava/transformers"]


def test_llava_1_5_7b_config_matches_the_hub_architecture(common):
    """Every field written out in LLAVA_1_5_7B is what llava-hf/llava-1.5-7b-hf's config.json (or, where the hub
    file leaves it out, transformers' default) says, and the whole model is 7.06 B parameters."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    real = common.llava_1_5_7b_config()
    config = LlavaConfig(**{k: v for k, v in real.items() if k not in ("architectures", "model_type")})
    text, vision = config.text_config, config.vision_config
    assert (text.model_type, vision.model_type) == ("llama", "clip_vision_model")
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size, text.max_position_embeddings) == (
                4096, 11008, 32, 32, 32, 32064, 4096)
    assert text.rms_norm_eps == 1e-5 and text.rope_parameters["rope_theta"] == 10000.0 and not text.tie_word_embeddings
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.image_size, vision.patch_size, vision.projection_dim) == (1024, 4096, 24, 16, 336, 14, 768)
    assert vision.hidden_act == "quick_gelu" and vision.layer_norm_eps == 1e-5
    assert (config.image_token_id, config.pad_token_id, config.vision_feature_layer,
            config.vision_feature_select_strategy, config.projector_hidden_act) == (
                32000, 32001, -2, "default", "gelu")
    # the fields the hub file omits are transformers' own defaults
    llama, clip = LlamaConfig(), CLIPVisionConfig()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act"):
        assert real["text_config"][key] == getattr(llama, key), key
    for key in ("layer_norm_eps", "hidden_act"):
        assert real["vision_config"][key] == getattr(clip, key), key
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072


def test_generate_benchmark_separate_processes_at_toy_size(common, bench_generate, tmp_path):
    """The 7b mode end to end at toy size: each library in a fresh process, one JSON row each plus the ratio."""
    config = common.toy_llava_1_5_config()
    checkpoint, built = common.make_random_checkpoint(tmp_path / "llava-1.5-toy", config)
    assert built
    rows, turns, info = bench_generate.run_separate(checkpoint, "llava-1.5-7b", toy=True, batches=[1], new_tokens=4,
                                                    repeats=1, warmup=False, turns=False, threads=1, timeout=300)
    ours, theirs, ratio = rows
    assert turns is None
    assert (ours["library"], theirs["library"], ratio["library"]) == ("fastllava", "transformers",
                                                                       "ratio fastllava/transformers")
    # 5 + 16 image placeholders (CLIP, 28 px / 7 px patches, CLS dropped) + 13 prompt tokens
    for row in (ours, theirs):
        assert row["process"] == "separate" and row["arch"] == "llava-1.5-7b" and row["threads"] == 1
        assert row["prompt_tokens"] == 5 + 16 + 13 and row["new_tokens"] == 4 and row["batch"] == 1
        assert row["ttft_s"] > 0 and row["decode_tok_s"] > 0 and row["load_s"] > 0
        assert row["read_bandwidth_gb_s"] > 0
        assert row["decode_gb_s"] == pytest.approx(info["text_weight_bytes"] * row["decode_tok_s"] / 1e9)
        assert row["bandwidth_fraction"] == pytest.approx(row["decode_gb_s"] / row["read_bandwidth_gb_s"])
        assert 0 < row["baseline_rss"] < row["peak_rss"]
    # both processes count the same bytes per token: decoder layers, norm, untied lm_head, in bf16
    text = config["text_config"]
    hidden, inter, vocab, layers = (text["hidden_size"], text["intermediate_size"], text["vocab_size"],
                                    text["num_hidden_layers"])
    assert info["text_weight_bytes"] == 2 * (layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
                                             + hidden + vocab * hidden)
    assert ratio["ttft_s"] == pytest.approx(ours["ttft_s"] / theirs["ttft_s"])
    assert ratio["decode_tok_s"] == pytest.approx(ours["decode_tok_s"] / theirs["decode_tok_s"])
    assert ratio["peak_rss_gib"] == pytest.approx(ours["peak_rss"] / theirs["peak_rss"])
    for row in rows:
        assert json.loads(json.dumps(row)) == row  # each is one JSON line


@pytest.fixture(scope="module")
def bench_cold_start():
    return load_script("bench_cold_start")


def test_cold_start_scenarios_set_their_caches_and_keep_their_order(bench_cold_start, tmp_path):
    cold = bench_cold_start.scenario_environment("fastllava-cold", tmp_path)
    assert cold["FASTLLAVA_CACHE"] == str(tmp_path / "cold-kernels") and "TORCHINDUCTOR_CACHE_DIR" not in cold
    warm = bench_cold_start.scenario_environment("fastllava", tmp_path)
    assert "FASTLLAVA_CACHE" not in warm and warm["FASTLLAVA_COMPILE"] == "0"  # the environment's own, built cache
    for scenario in ("fastllava-compile-cold", "fastllava-compile-warm"):  # one inductor cache for both
        assert bench_cold_start.scenario_environment(scenario, tmp_path)["TORCHINDUCTOR_CACHE_DIR"] == str(
            tmp_path / "inductor")
    with pytest.raises(ValueError, match="unknown scenario"):
        bench_cold_start.scenario_environment("fastllava-hot", tmp_path)
    bench_cold_start.check_order(["fastllava-compile-cold", "fastllava", "fastllava-compile-warm"])
    for bad in (["fastllava-compile-warm"], ["fastllava-compile-warm", "fastllava-compile-cold"]):
        with pytest.raises(ValueError, match="list the cold one before it"):
            bench_cold_start.check_order(bad)


def test_cold_start_benchmark_end_to_end_at_toy_size(common, bench_cold_start, tmp_path):
    """Fresh processes from spawn to the first answer token (the kernels already built, as CI's setup leaves them):
    the parts add up to less than the whole, and the ratio row is against transformers' process."""
    checkpoint, _ = common.make_random_checkpoint(tmp_path / "toy", common.toy_llava_interleave_config())
    rows = bench_cold_start.run_scenarios(checkpoint, "llava-interleave-qwen-0.5b", ["fastllava", "transformers"],
                                          new_tokens=3, toy=True, threads=1, timeout=600)
    assert [row["scenario"] for row in rows] == ["fastllava", "transformers"]
    for row in rows:
        assert row["threads"] == 1 and row["new_tokens"] == 3 and row["prompt_tokens"] == 13 + 16 + 15
        parts = row["interpreter_s"] + row["import_s"] + row["load_s"] + row["ttft_s"]
        assert 0 < row["ttft_s"] and parts <= row["to_first_token_s"] + 1e-3
        assert row["to_first_token_s"] < parts + 5.0  # only the input building lies between the parts
        assert row["decode_tok_s"] > 0 and row["first_step_s"] > 0
    assert rows[1]["to_first_token_vs_transformers"] == 1.0
    assert rows[0]["to_first_token_vs_transformers"] == pytest.approx(
        rows[0]["to_first_token_s"] / rows[1]["to_first_token_s"])
