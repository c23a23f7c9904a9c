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
