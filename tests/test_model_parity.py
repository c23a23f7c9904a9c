"""fastllava against transformers on the same tiny random checkpoints: logits, loss, outputs, caches."""

from __future__ import annotations

import pytest
import torch

import fastllava
from tiny_checkpoints import FAMILIES, IMAGE_TOKEN, sample_inputs

transformers = pytest.importorskip("transformers")


def load_both(directory):
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(directory)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
    return ours, theirs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_loss_match_transformers(checkpoint_factory, family):
    ours, theirs = load_both(checkpoint_factory(family))
    ids, mask, pixels = sample_inputs(length=40 if "dynamic" in family else 30)
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == IMAGE_TOKEN, -100)
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
        got = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
    valid = mask.bool()
    assert got.logits.shape == expected.logits.shape
    assert (got.logits - expected.logits)[valid].abs().max() <= 1e-4
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5


@pytest.mark.parametrize("family", ["clip_llama", "siglip_qwen2"])
def test_hidden_states_attentions_and_image_features(checkpoint_factory, family):
    directory = checkpoint_factory(family)
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(directory)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
    ids, mask, pixels = sample_inputs(pad=(0, 0))
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels, attention_mask=mask, output_hidden_states=True,
                          output_attentions=True)
        ours.set_attn_implementation("eager")
        got = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, output_hidden_states=True,
                   output_attentions=True)
        features_theirs = torch.stack(theirs.get_image_features(pixel_values=pixels).pooler_output)
        features_ours = torch.stack(ours.get_image_features(pixel_values=pixels).pooler_output)
    assert len(got.hidden_states) == len(expected.hidden_states)
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert (a - b).abs().max() <= 1e-4
    assert len(got.attentions) == len(expected.attentions)
    for a, b in zip(got.attentions, expected.attentions):
        assert (a - b).abs().max() <= 1e-5
    assert (features_ours - features_theirs).abs().max() <= 1e-5
    assert torch.equal(got.image_hidden_states, features_ours)


def test_logits_to_keep_int_and_tensor(checkpoint_factory):
    ours, _ = load_both(checkpoint_factory("clip_llama"))
    ids, mask, pixels = sample_inputs()
    with torch.no_grad():
        full = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        last = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, logits_to_keep=1).logits
        picked = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                      logits_to_keep=torch.tensor([3, 7])).logits
    assert last.shape[1] == 1 and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)
    assert torch.allclose(picked, full[:, [3, 7]], atol=1e-6)


@pytest.mark.parametrize("family", ["clip_mistral", "siglip_qwen2"])
def test_incremental_forward_with_cache_equals_full_forward(checkpoint_factory, family):
    ours, _ = load_both(checkpoint_factory(family))
    ids, mask, pixels = sample_inputs()
    with torch.no_grad():
        full = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        first = ours(input_ids=ids[:, :24], pixel_values=pixels, attention_mask=mask[:, :24], use_cache=True)
        cache = first.past_key_values
        steps = [first.logits]
        for t in range(24, 30):
            out = ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full)[mask.bool()].abs().max() <= 1e-5


def test_vision_tower_runs_only_the_layers_it_needs(checkpoint_factory):
    ours, _ = load_both(checkpoint_factory("clip_llama"))  # 3 layers, feature layer -2 -> 2 layers run
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in ours.vision_tower.encoder.layers]
    with torch.no_grad():
        ours.get_image_features(pixel_values=torch.randn(1, 3, 28, 28))
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2


def test_newer_key_layout_loads_to_the_same_logits(checkpoint_factory, tmp_path):
    from safetensors.torch import save_file

    directory = checkpoint_factory("clip_llama")
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}  # model.language_model.*, lm_head.*
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    ours_new = fastllava.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    ours_hub = fastllava.LlavaForConditionalGeneration.from_pretrained(directory)
    ids, mask, pixels = sample_inputs()
    with torch.no_grad():
        a = ours_new(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        b = ours_hub(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["clip_llama", "siglip_qwen2"])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_our_save_loads_in_transformers_with_same_logits(checkpoint_factory, tmp_path, family, shard):
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory(family))
    if shard:
        ours.save_pretrained(tmp_path, max_shard_size=shard)
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        ours.save_pretrained(tmp_path)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded = fastllava.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask, pixels = sample_inputs()
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        b = theirs(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        c = reloaded(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    assert torch.equal(a, c)


def test_dtype_auto_and_explicit(checkpoint_factory, tmp_path):
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory("clip_llama"))
    theirs.to(torch.bfloat16).save_pretrained(tmp_path)
    assert fastllava.LlavaForConditionalGeneration.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert fastllava.LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    model = fastllava.LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype="float16", device_map="cpu")
    assert model.dtype == torch.float16 and model.device.type == "cpu"


def test_tied_embeddings_share_storage(checkpoint_factory):
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory("siglip_qwen2"))
    assert ours.lm_head.weight is ours.get_input_embeddings().weight


def test_placeholder_count_mismatch_names_both_counts(checkpoint_factory):
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory("clip_llama"))
    ids, mask, pixels = sample_inputs(batch=1, pad=(0,))
    ids[0, 2] = 5  # one placeholder fewer than the 16 features
    with pytest.raises(ValueError, match=r"tokens: 15, features: 16"):
        ours(input_ids=ids, pixel_values=pixels[:1], attention_mask=mask)


def test_inputs_embeds_path_matches_input_ids(checkpoint_factory):
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory("siglip_qwen2"))
    ids, mask, pixels = sample_inputs(batch=1, pad=(0,))
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pixels[:1]).logits
        embeds = ours.get_input_embeddings()(ids)
        b = ours(inputs_embeds=embeds, pixel_values=pixels[:1]).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_attn_implementation_choices(checkpoint_factory):
    directory = checkpoint_factory("clip_llama")
    eager = fastllava.LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager")
    sdpa = fastllava.LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa")
    ids, mask, pixels = sample_inputs()
    with torch.no_grad():
        a = eager(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        b = sdpa(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="flash-attn"):
            fastllava.LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation"):
        fastllava.LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="magic")
