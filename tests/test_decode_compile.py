"""The fixed-shape decode step: compiled and eager give the same greedy tokens as transformers."""

from __future__ import annotations

import pytest
import torch

import fastllava
from fastllava.generation.decode_step import bucket_capacity
from tiny_checkpoints import sample_inputs

transformers = pytest.importorskip("transformers")


def test_capacities_come_in_buckets():
    assert bucket_capacity(1) == bucket_capacity(256) == 256
    assert bucket_capacity(257) == 512


def test_compiled_eager_and_transformers_agree_on_a_left_padded_batch(checkpoint_factory):
    directory = checkpoint_factory("clip_mistral")  # sliding window shorter than the sequence: masks matter
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(directory)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
    ids, mask, pixels = sample_inputs(batch=4, length=34, pad=(0, 3, 7, 11), seed=5)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=32, eos_token_id=None)
    eager = ours.generate(**kwargs, compile=False)
    compiled = ours.generate(**kwargs, compile=True)
    expected = theirs.generate(**kwargs, do_sample=False)
    assert torch.equal(eager, expected)
    assert torch.equal(compiled, expected)


def test_session_grows_past_its_bucket_and_keeps_decoding(checkpoint_factory):
    from fastllava.generation.session import DecodeSession

    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory("clip_llama"))
    ids, _, pixels = sample_inputs(batch=1, pad=(0,))
    session = DecodeSession(ours, 1, 10, compile=False)
    assert session.cache.capacity == 256
    steps = 256 - ids.shape[1] + 5
    with torch.inference_mode():
        token = session.extend(ids, pixel_values=pixels).argmax(-1)
        for _ in range(steps):
            token = session.step(token).argmax(-1)
    assert session.cache.capacity == 512 and session.length == ids.shape[1] + steps == 261


def test_compiled_bf16_model_matches_eager_with_an_image(checkpoint_factory):
    """bf16 weights take the joint q/k/v and gate/up products eagerly; the compiled step must trace (it ran the
    layers one by one) and give the same greedy tokens, batch 1 with an image after a many-row prefill."""
    model = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory("siglip_qwen2"),
                                                                    dtype=torch.bfloat16)
    ids, _, pixels = sample_inputs(batch=1, pad=(0,), seed=3)
    kwargs = dict(input_ids=ids, pixel_values=pixels.bfloat16(), max_new_tokens=12, eos_token_id=None)
    compiled = model.generate(**kwargs, compile=True)
    eager = model.generate(**kwargs, compile=False)
    assert compiled.shape[1] == ids.shape[1] + 12
    assert torch.equal(compiled, eager)
