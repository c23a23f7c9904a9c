"""Configs: defaults, both config.json generations, unknown fields kept, clear errors, the spec's example."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import fastllava
from fastllava.config import ConfigError, LlavaConfig


def test_defaults_match_the_documented_ones():
    config = LlavaConfig()
    assert config.image_token_index == 32000 and config.image_token_id == 32000
    assert config.image_seq_length == 576
    assert config.projector_hidden_act == "gelu"
    assert config.vision_feature_select_strategy == "default"
    assert config.vision_feature_layer == -2
    assert config.multimodal_projector_bias is True and config.tie_word_embeddings is False
    assert config.vision_config.model_type == "clip_vision_model" and config.vision_config.image_size == 336
    assert config.text_config.model_type == "llama" and config.text_config.hidden_size == 4096


def test_matches_transformers_default_dicts():
    transformers = pytest.importorskip("transformers")
    for ours, theirs in [
        (fastllava.CLIPVisionConfig(), transformers.CLIPVisionConfig()),
        (fastllava.SiglipVisionConfig(), transformers.SiglipVisionConfig()),
        (fastllava.LlamaConfig(), transformers.LlamaConfig()),
        (fastllava.MistralConfig(), transformers.MistralConfig()),
        (fastllava.Qwen2Config(), transformers.Qwen2Config()),
    ]:
        mine, reference = ours.to_dict(), theirs.to_dict()
        for key, value in mine.items():
            if key in reference and key not in ("rope_scaling",):
                assert reference[key] == value, (type(ours).__name__, key)


def test_reads_transformers_4x_config_with_rope_scaling(tmp_path):
    raw = {
        "model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "patch_size": 14,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
        "text_config": {"model_type": "llama", "rope_theta": 500000.0, "vocab_size": 32064,
                        "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "float16"},
        "some_future_field": {"kept": True},
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = LlavaConfig.from_pretrained(tmp_path)
    assert config.text_config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    assert config.some_future_field == {"kept": True}
    written = config.to_dict()
    assert written["some_future_field"] == {"kept": True}
    assert written["text_config"]["rope_theta"] == 500000.0
    assert LlavaConfig.from_dict(written).to_dict() == written


def test_reads_transformers_5x_rope_parameters():
    config = LlavaConfig(text_config={"model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert config.text_config.rope_parameters["rope_theta"] == 1e6


def test_transformers_reads_our_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = LlavaConfig(
        text_config=fastllava.Qwen2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                          rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}),
        vision_config=fastllava.SiglipVisionConfig(), vision_feature_layer=[-2, -5], image_token_index=151646,
    )
    config.save_pretrained(tmp_path)
    theirs = transformers.LlavaConfig.from_pretrained(tmp_path)
    assert theirs.text_config.model_type == "qwen2"
    assert theirs.text_config.rope_parameters["factor"] == 4.0 and theirs.text_config.rope_parameters["rope_theta"] == 1e6
    assert theirs.vision_feature_layer == [-2, -5] and theirs.image_token_id == 151646


def test_unknown_model_types_are_clear_errors():
    with pytest.raises(ConfigError, match=r"'gpt2'.*supported: llama, mistral, qwen2"):
        LlavaConfig(text_config={"model_type": "gpt2"})
    with pytest.raises(ConfigError, match=r"'vit'.*clip_vision_model"):
        LlavaConfig(vision_config={"model_type": "vit"})
    with pytest.raises(ConfigError, match="supported: llava"):
        LlavaConfig.from_dict({"model_type": "llava_next"})


def test_invalid_settings_are_errors():
    with pytest.raises(ConfigError, match="vision_feature_select_strategy"):
        LlavaConfig(vision_feature_select_strategy="cls_only")
    with pytest.raises(ConfigError, match="outside"):
        LlavaConfig(vision_feature_layer=99)
    with pytest.raises(ConfigError, match="rope_type"):
        fastllava.LlamaConfig(rope_parameters={"rope_type": "nonsense", "rope_theta": 1.0})


def test_full_clip_config_nesting_is_accepted():
    config = LlavaConfig(vision_config={"model_type": "clip", "vision_config": {"hidden_size": 48, "num_attention_heads": 4}})
    assert config.vision_config.model_type == "clip_vision_model" and config.vision_config.hidden_size == 48


def test_spec_config_example_runs_with_only_the_import_changed():
    """The docs' LlavaConfig example, verbatim but for the import. Its default Llama is 7B parameters (28 GB in
    fp32, more than these machines have), so the script is run under torch's meta device, which allocates
    nothing; the same lines run for real at small size in the other tests."""
    example = textwrap.dedent('''
        from fastllava import LlavaForConditionalGeneration, LlavaConfig, CLIPVisionConfig, LlamaConfig
        vision_config = CLIPVisionConfig()
        text_config = LlamaConfig()
        configuration = LlavaConfig(vision_config, text_config)
        model = LlavaForConditionalGeneration(configuration)
        configuration = model.config
    ''')
    wrapper = "import torch\nwith torch.device('meta'):\n" + textwrap.indent(example, "    ")
    wrapper += "\nprint(sum(p.numel() for p in model.parameters()), configuration.vision_config.patch_size)\n"
    result = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count, patch = result.stdout.split()
    assert int(count) > 6_500_000_000 and patch == "32"


def test_small_model_from_config_is_initialised_and_runs():
    import torch

    config = LlavaConfig(
        fastllava.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=28, patch_size=14),
        fastllava.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=64),
        image_token_index=63,
    )
    model = fastllava.LlavaForConditionalGeneration(config)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ids = torch.tensor([[1, 63, 63, 63, 63, 5]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), labels=ids)
    assert out.logits.shape == (1, 6, 64) and torch.isfinite(out.loss)
