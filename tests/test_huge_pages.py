"""Decode weights copied into one huge-page-advised mapping after loading (fastllava.models.huge_pages)."""

from __future__ import annotations

import pytest
import torch

import fastllava
from fastllava.models import huge_pages
from tiny_checkpoints import sample_inputs

LM = fastllava.LlavaForConditionalGeneration


def logits(model):
    config = model.config
    ids, mask, pixels = sample_inputs(batch=2, vocab=config.text_config.vocab_size, image_token=config.image_token_index)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits


def mapping_of(tensor: torch.Tensor) -> int:
    """The address of the tensor's storage: all moved weights are views of one storage (the mapping)."""
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_decode_weights_move_into_one_mapping_and_nothing_else_changes(checkpoint_factory, monkeypatch, quantization):
    directory = checkpoint_factory("siglip_qwen2")  # tied embeddings: the tie must survive the move
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)
    moved = LM.from_pretrained(directory, quantization_config=quantization)
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: False)
    plain = LM.from_pretrained(directory, quantization_config=quantization)
    slots = list(huge_pages.decode_weight_slots(moved))
    assert len(slots) == 7 * moved.config.text_config.num_hidden_layers + 1  # q k v o gate up down, lm_head
    storages = {mapping_of(getattr(module, attr)) for _, module, attr in slots}
    assert len(storages) == 1  # every decode weight is a view of the one mapping
    vision = next(p for n, p in moved.model.vision_tower.named_parameters() if p.dim() == 2)
    assert mapping_of(vision) not in storages  # the vision tower stays where it was loaded
    head, embed = moved.lm_head, moved.model.language_model.embed_tokens
    if quantization != "int4":  # (an int4 head has its own codes; the embedding is int8)
        assert head.weight is embed.weight  # still one tensor for the tied pair
    assert torch.equal(logits(moved), logits(plain))
    for (name, module, attr), (_, other, _) in zip(slots, huge_pages.decode_weight_slots(plain)):
        assert torch.equal(getattr(module, attr), getattr(other, attr)), name


def test_setting_and_availability(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLLAVA_HUGE_PAGES", "0")
    assert not huge_pages.huge_pages_available()
    monkeypatch.setenv("FASTLLAVA_HUGE_PAGES", "lots")
    with pytest.raises(ValueError, match="FASTLLAVA_HUGE_PAGES='lots'"):
        huge_pages.huge_pages_available()
    monkeypatch.setenv("FASTLLAVA_HUGE_PAGES", "1")
    setting = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "_THP_SETTING", setting)
    setting.write_text("always madvise [never]\n")
    assert not huge_pages.huge_pages_available()
    setting.write_text("always [madvise] never\n")
    assert huge_pages.huge_pages_available()
    setting.unlink()
    assert not huge_pages.huge_pages_available()  # no such file: not Linux THP
