"""The lean decode step (fastllava/generation/lean_step.py) against the module path it replaces: the same logits,
bit for bit, for bf16 and int8/int4 weights, GQA, q/k/v biases, sliding windows, left-padded batches; and the
cases where it must step aside."""

from __future__ import annotations

import pytest
import torch

import fastllava
from fastllava.generation.decode_step import StepRunner, decode_step, eager_window
from fastllava.generation.lean_step import LeanStep
from fastllava.generation.session import DecodeSession
from fastllava.kernels import build


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert build.load(), "the C++ kernels did not build"


def load(directory, quantization=None):
    config = None if quantization is None else {"weights": quantization[0], "group_size": quantization[1]}
    return fastllava.LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16,
                                                                    quantization_config=config)


def prompt_batch(model, rows: int, length: int = 11):
    torch.manual_seed(rows)
    ids = torch.randint(5, model.config.text_config.vocab_size - 5, (rows, length))
    mask = torch.ones_like(ids)
    for row in range(1, rows):  # left padding of different lengths
        mask[row, : 2 * row] = 0
    return ids, mask


def lean_and_module_logits(model, rows: int, steps: int = 6):
    """Decode ``steps`` tokens twice from the same prefill, stepping with LeanStep and with decode_step."""
    runs = []
    for use_lean in (True, False):
        ids, mask = prompt_batch(model, rows)
        with torch.inference_mode():
            session = DecodeSession(model, rows, 64)
            token = session.extend(ids, attention_mask=mask).argmax(-1)
            runner = session.step_runner
            lean = LeanStep.build(model)
            assert lean is not None and lean.applies(session.cache, rows)
            logits = []
            for _ in range(steps):
                cache = session.cache
                slot = cache.length
                cache.valid[:, slot] = True
                cache.length = slot + 1
                args = (cache, token.view(-1, 1), session.next_positions[:, None], torch.tensor([slot]),
                        runner._inv_freq)
                window = eager_window(slot + 1, cache.capacity)
                out = lean(*args, window) if use_lean else decode_step(model, *args, window)
                session.next_positions += 1
                logits.append(out)
                token = out.argmax(-1)
        runs.append(torch.stack(logits))
    return runs


@pytest.mark.parametrize("family", ["clip_llama", "clip_mistral", "siglip_qwen2"])  # GQA, window, q/k/v bias
@pytest.mark.parametrize("rows", [1, 3])
def test_bf16_logits_equal_the_module_path(checkpoint_factory, family, rows):
    lean, module = lean_and_module_logits(load(checkpoint_factory(family)), rows)
    assert torch.equal(lean, module)


@pytest.mark.parametrize("quantization", [("int8", None), ("int4", 32)])
def test_quantized_logits_equal_the_module_path(checkpoint_factory, quantization):
    lean, module = lean_and_module_logits(load(checkpoint_factory("clip_llama"), quantization), 2)
    assert torch.equal(lean, module)


def test_generate_uses_it_and_keeps_its_tokens(checkpoint_factory, monkeypatch):
    model = load(checkpoint_factory("siglip_qwen2"))
    ids, mask = prompt_batch(model, 2)
    calls = []
    real = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    with_lean = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert len(calls) == 7  # every decode step after the prefill's token
    monkeypatch.setattr(LeanStep, "build", classmethod(lambda cls, m: None))
    without = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(with_lean, without)


def test_steps_aside_where_it_would_not_match(checkpoint_factory, monkeypatch):
    directory = checkpoint_factory("clip_llama")
    float32 = fastllava.LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    assert LeanStep.build(float32) is None  # fp32 products stay on PyTorch's ops
    model = load(directory)
    monkeypatch.setenv("FASTLLAVA_HALF_MATMUL", "native")
    assert LeanStep.build(model) is None
    monkeypatch.delenv("FASTLLAVA_HALF_MATMUL")
    model.model.language_model.layers[0].self_attn.attn_implementation = "eager"
    assert LeanStep.build(model) is None
    model.model.language_model.layers[0].self_attn.attn_implementation = "sdpa"
    lean = LeanStep.build(model)
    session = DecodeSession(model, 1, 64)
    with torch.no_grad():
        assert lean.applies(session.cache, 1) and not lean.applies(session.cache, lean.max_rows)
    assert not lean.applies(session.cache, 1)  # with autograd on (training), the module path
    monkeypatch.setitem(build._state, "loaded", False)
    assert LeanStep.build(model) is None and isinstance(StepRunner(model), StepRunner)


def test_layers_whose_weights_are_not_adjacent_run_one_product_each(checkpoint_factory):
    model = load(checkpoint_factory("siglip_qwen2"))  # q/k/v biases
    for layer in model.model.language_model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.k_proj.weight.data = attention.k_proj.weight.data.clone()  # moved: no joint q/k/v view
        mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone()
    from fastllava.models.fused_ops import joint_operator
    attention = model.model.language_model.layers[0].self_attn
    assert joint_operator(attention, [attention.q_proj, attention.k_proj, attention.v_proj]) is None
    lean, module = lean_and_module_logits(model, 2)
    assert torch.equal(lean, module)


@pytest.mark.parametrize("fused_silu", [True, False])
def test_either_gated_silu_matches_the_module_path(checkpoint_factory, monkeypatch, fused_silu):
    from fastllava.models import llama
    monkeypatch.setattr(llama, "SILU_MUL_KERNEL_FASTER", fused_silu)
    lean, module = lean_and_module_logits(load(checkpoint_factory("clip_llama")), 2)
    assert torch.equal(lean, module)


def test_the_cpp_decoder_names_what_is_wrong():
    decoder = torch.classes.fastllava.DecoderLayers(False)
    weight = torch.zeros(8, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="add_layer before its products"):
        decoder.add_product("qkv", "gemv", weight, None, None, 0, None, [4, 2, 2])
    decoder.add_layer(0, torch.ones(4, dtype=torch.bfloat16), 1e-6, torch.ones(4, dtype=torch.bfloat16), 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="unknown product op 'gemv_fp8'"):
        decoder.add_product("qkv", "gemv_fp8", weight, None, None, 0, None, [8])
    with pytest.raises(RuntimeError, match="do not add up to the weight's 8 rows"):
        decoder.add_product("qkv", "gemv", weight, None, None, 0, None, [4, 2])
    with pytest.raises(RuntimeError, match="gemv_int8 needs scales"):
        decoder.add_product("o_proj", "gemv_int8", weight.to(torch.int8), None, None, 0, None, [8])
    with pytest.raises(RuntimeError, match="unknown part 'mlp'"):
        decoder.add_product("mlp", "gemv", weight, None, None, 0, None, [8])
    decoder.add_product("qkv", "gemv", weight, None, None, 0, None, [4, 2, 2])
    x = torch.zeros(1, 1, 4, dtype=torch.bfloat16)
    cache = [torch.zeros(1, 1, 8, 2, dtype=torch.bfloat16)]
    valid = [torch.ones(1, 1, dtype=torch.bool)]
    cos = sin = torch.zeros(1, 1, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="lm_head or final norm not set"):
        decoder.run(x, cos, sin, cache, cache, 0, 1, valid)
    decoder.add_product("lm_head", "gemv", weight, None, None, 0, None, [8])
    decoder.set_final_norm(torch.ones(4, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="layer 0 needs q/k/v, o_proj, gate/up and down products"):
        decoder.run(x, cos, sin, cache, cache, 0, 1, valid)
    square = torch.eye(4, dtype=torch.bfloat16)
    decoder.add_product("o_proj", "gemv", square, None, None, 0, None, [4])
    decoder.add_product("gate_up", "gemv", weight, None, None, 0, None, [4, 4])
    decoder.add_product("down", "gemv", square, None, None, 0, None, [4])
    with pytest.raises(RuntimeError, match="layer 0 has no cache or mask"):
        decoder.run(x, cos, sin, [], [], 0, 1, valid)
    logits = decoder.run(x, cos, sin, cache, cache, 0, 1, valid)
    assert logits.shape == (1, 8) and logits.dtype == torch.float32


@pytest.mark.parametrize("quantization", [None, ("int8", None), ("int4", 32)])
def test_several_sequences_over_their_own_caches_give_each_ones_logits(checkpoint_factory, quantization):
    """LeanStep.ragged (the engine's decode of several sequences, each with its own cache and length): row b's
    logits are those of that sequence stepped alone, bit for bit, and the caches are written at each slot."""
    model = load(checkpoint_factory("siglip_qwen2"), quantization)
    lean = LeanStep.build(model)
    lengths = (7, 12, 4)
    alone, sessions = [], []
    for use_ragged in (False, True):
        made = []
        with torch.inference_mode():
            for seed, length in enumerate(lengths):
                ids = torch.randint(5, 100, (1, length), generator=torch.Generator().manual_seed(seed))
                session = DecodeSession(model, 1, 32)
                made.append((session, session.extend(ids).argmax(-1)))
            caches = [session.cache for session, _ in made]
            slots = list(lengths)
            for cache, slot in zip(caches, slots):
                cache.valid[:, slot] = True
                cache.length = slot + 1
            tokens = torch.cat([token.view(1, 1) for _, token in made])
            positions = torch.tensor([[slot] for slot in slots])
            if use_ragged:
                ragged = lean.ragged(caches, tokens, positions, slots, made[0][0].step_runner._inv_freq)
            else:
                alone = [lean(cache, tokens[b:b + 1], positions[b:b + 1], slots[b], made[0][0].step_runner._inv_freq,
                              slots[b] + 1) for b, cache in enumerate(caches)]
        sessions.append(caches)
    assert ragged.shape == (3, model.config.text_config.vocab_size)
    for b in range(3):
        assert torch.equal(ragged[b], alone[b][0]), f"sequence {b}"
        for layer in range(len(sessions[0][b].keys)):  # the new token's key and value landed at its slot
            assert torch.equal(sessions[1][b].keys[layer][:, :, :lengths[b] + 1],
                               sessions[0][b].keys[layer][:, :, :lengths[b] + 1])
            assert torch.equal(sessions[1][b].values[layer][:, :, :lengths[b] + 1],
                               sessions[0][b].values[layer][:, :, :lengths[b] + 1])


def test_several_sequences_with_a_sliding_window_give_each_ones_logits(checkpoint_factory):
    """A windowed model (clip_mistral: a window shorter than these sequences): each row's masks are its own."""
    model = load(checkpoint_factory("clip_mistral"))
    window = next(w for w in model.model.language_model.sliding_windows if w is not None)
    lean = LeanStep.build(model)
    lengths = (window + 5, 3)  # one past its window, one inside it
    with torch.inference_mode():
        runs = []
        for use_ragged in (False, True):
            caches, tokens = [], []
            for seed, length in enumerate(lengths):
                session = DecodeSession(model, 1, 64)
                ids = torch.randint(5, 100, (1, length), generator=torch.Generator().manual_seed(seed))
                tokens.append(session.extend(ids).argmax(-1).view(1, 1))
                session.cache.valid[:, length] = True
                session.cache.length = length + 1
                caches.append(session.cache)
            tokens = torch.cat(tokens)
            positions = torch.tensor([[length] for length in lengths])
            inv_freq = session.step_runner._inv_freq
            if use_ragged:
                runs.append(lean.ragged(caches, tokens, positions, list(lengths), inv_freq))
            else:
                runs.append(torch.cat([lean(cache, tokens[b:b + 1], positions[b:b + 1], lengths[b], inv_freq,
                                            lengths[b] + 1) for b, cache in enumerate(caches)]))
    assert torch.equal(runs[0], runs[1])


def test_several_sequences_need_matching_inputs(checkpoint_factory):
    model = load(checkpoint_factory("siglip_qwen2"))
    lean = LeanStep.build(model)
    with torch.inference_mode():
        session = DecodeSession(model, 1, 32)
        session.extend(torch.tensor([[5, 6, 7]]))
        x = lean.embed(torch.tensor([[8], [9]]))
        cos = sin = torch.zeros(2, 1, model.config.text_config.hidden_size // 8, dtype=torch.bfloat16)
        cache = session.cache
        with pytest.raises(RuntimeError, match="2 rows need 2 slots"):  # one sequence's caches for two rows
            lean.decoder.run_ragged(x, cos, sin, cache.keys, cache.values, [3], [cache.valid[:, :4]] *
                                    len(cache.keys), len(cache.keys))
        with pytest.raises(ValueError):  # a slot for each sequence
            lean.ragged([cache, cache], torch.tensor([[8], [9]]), torch.tensor([[3], [3]]), [3], None)
