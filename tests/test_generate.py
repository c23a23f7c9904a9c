"""generate(): greedy tokens identical to transformers', sampling reproducible, eos/stop strings exact,
streamer text equal to the final decode."""

from __future__ import annotations

import threading

import pytest
import torch

import fastllava
from fastllava.generation.streaming import TextIteratorStreamer
from tiny_checkpoints import make_full_checkpoint, sample_inputs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("full15"), "llava15")


def both(directory):
    return (fastllava.LlavaForConditionalGeneration.from_pretrained(directory),
            transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval())


@pytest.mark.parametrize("family", ["clip_llama", "clip_mistral", "siglip_qwen2"])
def test_greedy_batch_of_one_matches_transformers(checkpoint_factory, family):
    ours, theirs = both(checkpoint_factory(family))
    ids, mask, pixels = sample_inputs(batch=1, pad=(0,))
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=32, eos_token_id=None)
    expected = theirs.generate(**kwargs, do_sample=False)
    got = ours.generate(**kwargs)
    assert got.shape == (1, ids.shape[1] + 32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["clip_llama", "siglip_qwen2"])
def test_greedy_left_padded_batch_of_four_matches_transformers(checkpoint_factory, family):
    ours, theirs = both(checkpoint_factory(family))
    ids, mask, pixels = sample_inputs(batch=4, length=34, pad=(0, 3, 7, 11), seed=5)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=32, eos_token_id=None)
    expected = theirs.generate(**kwargs, do_sample=False)
    got = ours.generate(**kwargs)
    assert torch.equal(got, expected)
    assert len({tuple(row[-32:].tolist()) for row in got}) > 1  # rows really differ


def test_repetition_penalty_and_min_new_tokens_match_transformers(full_checkpoint):
    ours, theirs = both(full_checkpoint)
    ids, mask, pixels = sample_inputs(batch=2, vocab=500, image_token=ours.config.image_token_id, pad=(0, 4))
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=20,
                  repetition_penalty=1.3, min_new_tokens=10)
    assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs, do_sample=False))


def test_eos_ends_rows_and_pads_the_rest(checkpoint_factory):
    ours, _ = both(checkpoint_factory("clip_llama"))
    ids, mask, pixels = sample_inputs(batch=2, pad=(0, 5))
    free = ours.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12, eos_token_id=None)
    new = free[:, ids.shape[1]:]
    eos = int(new[0, 3])  # make row 0's 4th token the end-of-sequence token
    stopped = ours.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12,
                            eos_token_id=[eos, 10_000], pad_token_id=0)
    out = stopped[:, ids.shape[1]:]
    first = (new[0] == eos).nonzero()[0].item()
    assert torch.equal(out[0, : first + 1], new[0, : first + 1])
    assert (out[0, first + 1:] == 0).all()
    if (new[1] == eos).any():
        assert out.shape[1] <= 12
    else:
        assert torch.equal(out[1], new[1, : out.shape[1]])


def test_sampling_is_reproducible_with_a_seed(checkpoint_factory):
    ours, _ = both(checkpoint_factory("clip_llama"))
    ids, mask, pixels = sample_inputs(batch=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=16, do_sample=True,
                  temperature=1.5, top_k=0, top_p=0.95, eos_token_id=None)
    a = ours.generate(**kwargs, seed=123)
    b = ours.generate(**kwargs, seed=123)
    c = ours.generate(**kwargs, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_sampling_equals_greedy(checkpoint_factory):
    ours, _ = both(checkpoint_factory("clip_llama"))
    ids, mask, pixels = sample_inputs(batch=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(ours.generate(**kwargs, do_sample=True, top_k=1, seed=0), ours.generate(**kwargs))


def test_stop_strings_end_generation_at_the_completing_token(full_checkpoint):
    ours, _ = both(full_checkpoint)
    tokenizer = fastllava.AutoTokenizer.from_pretrained(full_checkpoint)
    ids, mask, pixels = sample_inputs(batch=1, pad=(0,), vocab=500, image_token=ours.config.image_token_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, eos_token_id=None)
    free = ours.generate(**kwargs, max_new_tokens=24)[0, ids.shape[1]:].tolist()
    # A stop string made of the text of tokens 5..6 must end generation right after token 6.
    text_upto = [tokenizer.decode(free[:n]) for n in range(len(free) + 1)]
    stop = text_upto[7][len(text_upto[5]):]
    assert stop.strip(), "need printable tokens to build a stop string"
    expected_end = next(n for n in range(1, 25) if stop in text_upto[n])
    stopped = ours.generate(**kwargs, max_new_tokens=24, stop_strings=[stop], tokenizer=tokenizer)
    assert stopped[0, ids.shape[1]:].tolist() == free[:expected_end]
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(**kwargs, max_new_tokens=4, stop_strings=["x"])


def test_streamer_yields_the_final_text_from_another_thread(full_checkpoint):
    ours, _ = both(full_checkpoint)
    tokenizer = fastllava.AutoTokenizer.from_pretrained(full_checkpoint)
    ids, mask, pixels = sample_inputs(batch=1, pad=(0,), vocab=500, image_token=ours.config.image_token_id)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("ids", ours.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=24, eos_token_id=None,
        streamer=streamer)))
    thread.start()
    chunks = list(streamer)
    thread.join()
    final = tokenizer.decode(result["ids"][0, ids.shape[1]:], skip_special_tokens=True)
    assert "".join(chunks) == final
    assert len(chunks) > 1


def test_generation_config_from_checkpoint_and_overrides(full_checkpoint, tmp_path):
    ours, _ = both(full_checkpoint)
    assert ours.generation_config.eos_token_id == 2
    ours.generation_config.max_new_tokens = 3
    ids, mask, pixels = sample_inputs(batch=1, pad=(0,), vocab=500, image_token=ours.config.image_token_id)
    out = ours.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, eos_token_id=None)
    assert out.shape[1] == ids.shape[1] + 3
    ours.save_pretrained(tmp_path)
    assert fastllava.GenerationConfig.from_pretrained(tmp_path).max_new_tokens == 3


def test_bad_generate_arguments_are_clear(checkpoint_factory):
    ours, _ = both(checkpoint_factory("clip_llama"))
    ids, mask, pixels = sample_inputs(batch=1, pad=(0,))
    with pytest.raises(TypeError, match="unexpected arguments"):
        ours.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2, beams=3)
    with pytest.raises(ValueError, match="context"):
        ours.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=10_000)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2, do_sample=True, temperature=0)
