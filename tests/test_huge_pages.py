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


def test_kv_cache_layers_share_one_aligned_mapping_and_keep_their_rows_when_grown(monkeypatch):
    from fastllava.generation.kv_cache import KVCache

    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)
    cache = KVCache(num_layers=3, batch_size=2, num_kv_heads=4, head_dim=8, capacity=16, dtype=torch.bfloat16)
    tensors = cache.keys + cache.values
    assert len({mapping_of(t) for t in tensors}) == 1  # every layer's keys and values: views of one mapping
    assert tensors[0].data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0  # starts on a huge page
    assert len({t.data_ptr() for t in tensors}) == 6 and all(t.is_contiguous() for t in tensors)
    assert all(t.shape == (2, 4, 16, 8) and not t.any() for t in tensors)  # zeroed
    for index, tensor in enumerate(tensors):  # no two layers overlap
        tensor.fill_(index + 1)
    assert [int(t[0, 0, 0, 0]) for t in tensors] == [1, 2, 3, 4, 5, 6]
    cache.length = 5
    cache.reserve(40)  # grows: the new tensors are again one mapping, with the written rows copied
    grown = cache.keys + cache.values
    assert cache.capacity == 45 and len({mapping_of(t) for t in grown}) == 1
    for index, tensor in enumerate(grown):
        assert torch.equal(tensor[:, :, :5], torch.full((2, 4, 5, 8), index + 1.0, dtype=torch.bfloat16))
        assert not tensor[:, :, 5:].any()

    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: False)
    plain = KVCache(num_layers=2, batch_size=1, num_kv_heads=2, head_dim=4, capacity=8, dtype=torch.float32)
    assert len({mapping_of(t) for t in plain.keys + plain.values}) == 4  # ordinary tensors, one each


def test_engine_sequence_kv_in_huge_pages_keeps_its_rows_when_grown(monkeypatch):
    from fastllava.engine.kv_pool import KVPool

    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, device="cpu",
                  budget_bytes=1 << 20, block_size=16)
    kv = pool.new(limit=256)
    assert pool.grow(kv, 16)
    assert kv.data.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0 and kv.data.is_contiguous()
    kv.data[:, :, :, :10] = 3.0
    kv.length = 10
    assert pool.grow(kv, 100)
    assert kv.data.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0 and kv.capacity >= 100
    assert torch.equal(kv.data[:, :, :, :10], torch.full_like(kv.data[:, :, :, :10], 3.0))
