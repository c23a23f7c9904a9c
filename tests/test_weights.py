"""Checkpoint files: truncated, corrupt, missing and mismatched weights are clear errors naming the problem."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastllava
from fastllava.weights import CheckpointError, SafetensorsFile, hub_to_internal, internal_to_hub


@pytest.fixture
def checkpoint(checkpoint_factory, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint_factory("clip_llama"), copy)
    return copy


def load(directory):
    return fastllava.LlavaForConditionalGeneration.from_pretrained(directory)


def test_truncated_file_names_file_and_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated: tensor"):
        load(checkpoint)


def test_empty_and_garbage_files(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or empty"):
        load(checkpoint)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load(checkpoint)


def test_missing_unexpected_and_misshaped_keys(checkpoint):
    path = checkpoint / "model.safetensors"
    state = load_file(str(path))
    removed = dict(state)
    removed.pop("language_model.model.norm.weight")
    save_file(removed, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys \['model.language_model.norm.weight'\]"):
        load(checkpoint)
    extra = dict(state, **{"language_model.model.surprise": torch.zeros(2)})
    save_file(extra, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['language_model.model.surprise'\]"):
        load(checkpoint)
    wrong = dict(state, **{"language_model.model.norm.weight": torch.zeros(3)})
    save_file(wrong, str(path))
    with pytest.raises(CheckpointError, match=r"'language_model.model.norm.weight' has shape \(3,\)"):
        load(checkpoint)


def test_missing_shard_and_missing_weights(checkpoint, tmp_path):
    model = load(checkpoint)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="30KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[-1].name} listed in the index is missing"):
        load(sharded)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load(checkpoint)


def test_not_a_directory_nor_hub_id():
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load("/definitely/not/here")


def test_hub_id_offline_without_cache_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        fastllava.LlavaForConditionalGeneration.from_pretrained("llava-hf/not-cached-model", cache_dir=tmp_path)


def test_hub_id_resolves_from_the_local_cache(checkpoint, tmp_path, monkeypatch):
    """A snapshot laid out as huggingface_hub's cache resolves with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--llava-hf--tiny-test"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in checkpoint.iterdir():
        shutil.copy(item, snapshot / item.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    model = fastllava.LlavaForConditionalGeneration.from_pretrained("llava-hf/tiny-test", cache_dir=tmp_path / "hub")
    assert model.config.text_config.model_type == "llama"


def test_zero_copy_views_and_key_maps(checkpoint):
    file = SafetensorsFile(checkpoint / "model.safetensors")
    key = "language_model.model.embed_tokens.weight"
    view = file.tensor(key)
    assert view.shape == file.shape(key)
    assert torch.equal(view, load_file(str(checkpoint / "model.safetensors"))[key])
    for hub in ["language_model.model.layers.0.mlp.up_proj.weight", "language_model.lm_head.weight",
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "multi_modal_projector.linear_1.bias"]:
        assert internal_to_hub(hub_to_internal(hub)) == hub
    assert hub_to_internal("vision_tower.encoder.layers.0.mlp.fc1.weight") == "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert hub_to_internal("model.vision_tower.vision_model.post_layernorm.bias") == "model.vision_tower.post_layernorm.bias"


def test_pickle_checkpoints_load_weights_only(checkpoint):
    state = load_file(str(checkpoint / "model.safetensors"))
    torch.save(state, checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    model = load(checkpoint)
    assert torch.equal(model.model.multi_modal_projector.linear_1.bias, state["multi_modal_projector.linear_1.bias"])


def test_loading_skips_random_init_and_never_imports_dynamo(checkpoint):
    """Building on the meta device must not run torch's initialisers (normal_ on meta imports torch._dynamo:
    seconds of load time on a real checkpoint)."""
    import subprocess
    import sys

    code = ("import sys, fastllava; fastllava.LlavaForConditionalGeneration.from_pretrained(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
