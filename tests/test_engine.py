"""The serving engine: greedy outputs equal model.generate() whatever the batch, arrival order, chunking,
preemption or cache hits; caches hit; abort frees memory; seeds, n > 1, logprobs, stop strings; AsyncEngine
streaming from asyncio; LLM.chat / LLM.generate. Tiny fp32 checkpoints made by transformers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import fastllava
from fastllava import LLM, SamplingParams
from fastllava.engine import AsyncEngine, Engine, EngineOverloadedError, RequestError
from tiny_checkpoints import make_full_checkpoint

NEW = 8  # new tokens per request in the parity tests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: one intra-op thread is fastest and immune to other processes on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ck15(tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("engine15"), "llava15")


@pytest.fixture(scope="module")
def model15(ck15):
    return fastllava.LlavaForConditionalGeneration.from_pretrained(ck15, dtype=torch.float32)


@pytest.fixture(scope="module")
def processor15(ck15):
    return fastllava.AutoProcessor.from_pretrained(ck15)


def load(checkpoint_factory, family):
    return fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory(family), dtype=torch.float32)


def make_prompts(image_token: int, count: int, seed: int = 0, vocab: int = 120, images: int = 5,
                 shared_prefix: bool = True) -> list[dict]:
    """Pre-tokenized prompts with one 16-placeholder image each; lengths 24-63; some share image and prefix."""
    g = torch.Generator().manual_seed(seed)
    pictures = [torch.randn(1, 3, 28, 28, generator=g) for _ in range(images)]
    prefix = torch.randint(3, vocab, (4,), generator=g).tolist()
    prompts = []
    for i in range(count):
        length = 24 + int(torch.randint(0, 40, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        start = 4 if shared_prefix and i % 2 == 0 else 1 + i % 3
        if shared_prefix and i % 2 == 0:
            ids[:4] = prefix  # same text and image up to past the first block: prefix-cache hits
        ids[start:start + 16] = [image_token] * 16
        prompts.append({"prompt_token_ids": ids, "pixel_values": pictures[i % images]})
    return prompts


def expected_greedy(model, prompt: dict, new: int = NEW) -> list[int]:
    ids = torch.tensor([prompt["prompt_token_ids"]])
    out = model.generate(input_ids=ids, pixel_values=prompt.get("pixel_values"), max_new_tokens=new, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def run(engine: Engine, arrivals: dict[int, list[tuple[str, object, SamplingParams]]], max_steps: int = 2000):
    """Add requests at the given step numbers; return final outputs by id and the list of per-step outputs."""
    finals, steps = {}, []
    step = 0
    while step <= max(arrivals, default=0) or engine.has_unfinished_requests():
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        outputs = engine.step()
        steps.append(outputs)
        for out in outputs:
            if out.finished:
                finals[out.request_id] = out
        step += 1
        assert step < max_steps, "the engine did not finish"
    return finals, steps


GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("family,caching", [("clip_llama", True), ("clip_llama", False), ("clip_mistral", True),
                                            ("siglip_qwen2", True)])
def test_greedy_mixed_staggered_batch_equals_generate(checkpoint_factory, family, caching):
    model = load(checkpoint_factory, family)
    prompts = make_prompts(model.config.image_token_id, 16, seed=3)
    engine = Engine(model, max_num_seqs=5, max_num_batched_tokens=24, kv_cache_bytes=1 << 22,
                    enable_prefix_caching=caching, image_cache_bytes=(1 << 20) if caching else 0)
    arrivals = {0: [], 2: [], 5: [], 9: []}
    for i, prompt in enumerate(prompts):
        arrivals[[0, 2, 5, 9][i % 4]].append((f"r{i}", prompt, GREEDY))
    finals, _ = run(engine, arrivals)
    for i, prompt in enumerate(prompts):
        out = finals[f"r{i}"]
        assert out.error is None
        assert out.outputs[0].token_ids == expected_greedy(model, prompt), f"request {i}"
        assert out.outputs[0].finish_reason == "length"
    stats = engine.stats()
    assert stats["requests_finished"] == 16 and stats["num_running"] == stats["num_waiting"] == 0
    if caching:
        assert stats["prefix_cache"]["hits"] > 0 and stats["image_cache"]["hits"] > 0
    else:
        assert stats["prefix_cache"]["hits"] == 0 and stats["kv_cache"]["used_bytes"] == 0


def test_chunked_prefill_keeps_decoding_streams_moving(model15):
    image = model15.config.image_token_id
    short = make_prompts(image, 1, seed=1)[0]
    long = {"prompt_token_ids": list(range(3, 163)), "pixel_values": short["pixel_values"]}
    long["prompt_token_ids"][10:26] = [image] * 16
    engine = Engine(model15, max_num_seqs=4, max_num_batched_tokens=16, kv_cache_bytes=1 << 22)
    engine.add_request("a", short, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    while len(engine.requests["a"].sequences[0].generated) < 2:
        engine.step()
    engine.add_request("b", long, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    b_first = None
    a_progress = []
    for step in range(40):
        outputs = {o.request_id: o for o in engine.step()}
        a_progress.append("a" in outputs)
        if "b" in outputs and b_first is None:
            b_first = step
            break
    assert b_first is not None and b_first >= 9  # 160 prompt tokens at <= 15 a step
    assert all(a_progress), "a decode stream stalled while a long prompt was prefilling"
    finals, _ = run(engine, {})
    assert finals["b"].outputs[0].token_ids == expected_greedy(model15, long, 4)


@pytest.fixture(scope="module")
def model15_bf16(ck15):
    return fastllava.LlavaForConditionalGeneration.from_pretrained(ck15, dtype=torch.bfloat16)


@pytest.mark.parametrize("caching,dtype", [(False, "float32"), (True, "float32"), (True, "bfloat16")])
def test_preemption_under_a_tiny_kv_budget_completes_everything(model15, model15_bf16, caching, dtype):
    """float32 runs the packed path for every step; bf16 takes the lean decode step for decode-only steps, through
    preemptions, recomputed prompts and adopted prefix storages."""
    model15 = model15 if dtype == "float32" else model15_bf16
    prompts = make_prompts(model15.config.image_token_id, 6, seed=7, shared_prefix=caching)
    if dtype == "bfloat16":
        for prompt in prompts:
            prompt["pixel_values"] = prompt["pixel_values"].bfloat16()
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    per_token = Engine(model15, kv_cache_bytes=1 << 20).pool.bytes_per_token
    engine = Engine(model15, max_num_seqs=6, max_num_batched_tokens=32, kv_cache_bytes=128 * per_token,
                    enable_prefix_caching=caching)
    arrivals = {0: [(f"r{i}", p, params) for i, p in enumerate(prompts[:4])],
                6: [(f"r{i}", p, params) for i, p in enumerate(prompts[4:], 4)]}
    finals, _ = run(engine, arrivals)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["requests_finished"] == 6
    assert (engine.runner._lean is not None) == (dtype == "bfloat16")  # bound at the first decode-only step
    assert engine.pool.peak_bytes <= engine.pool.budget_bytes
    for i, prompt in enumerate(prompts):
        assert finals[f"r{i}"].outputs[0].token_ids == expected_greedy(model15, prompt, 40), f"request {i}"
    if caching:
        assert stats["prefix_cache"]["evictions"] > 0  # finished sequences' blocks made room for new ones
        engine.prefix_cache.clear()
    assert engine.pool.used_bytes == 0


def test_a_request_that_cannot_fit_the_budget_is_refused(model15):
    engine = Engine(model15, kv_cache_bytes=64 * 512)  # 64 tokens of KV
    assert engine.max_model_len == 64
    prompt = {"prompt_token_ids": list(range(3, 53))}
    with pytest.raises(RequestError, match="context"):
        engine.add_request("x", prompt, SamplingParams(max_tokens=20))
    engine.add_request("y", prompt, SamplingParams(max_tokens=10, temperature=0))
    assert run(engine, {})[0]["y"].error is None


def test_abort_frees_memory_at_once(model15):
    prompts = make_prompts(model15.config.image_token_id, 3, seed=11, shared_prefix=False)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    engine = Engine(model15, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_bytes=1 << 22)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    victim = engine.requests["r1"].sequences[0].kv.nbytes
    used = engine.pool.used_bytes
    assert engine.abort("r1") and not engine.abort("r1") and not engine.abort("nope")
    assert engine.pool.used_bytes == used - victim
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["r1"].finished and outputs["r1"].outputs[0].finish_reason == "abort"
    finals, _ = run(engine, {})
    assert set(finals) == {"r0", "r2"}
    assert finals["r2"].outputs[0].token_ids == expected_greedy(model15, prompts[2], 60)
    engine.prefix_cache.clear()
    assert engine.pool.used_bytes == 0 and engine.stats()["requests_aborted"] == 1


def test_image_cache_hits_on_a_repeated_image(model15):
    prompts = make_prompts(model15.config.image_token_id, 4, seed=5, images=1, shared_prefix=False)
    engine = Engine(model15, max_num_seqs=2, max_num_batched_tokens=64, enable_prefix_caching=False)
    finals, _ = run(engine, {0: [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]})
    assert engine.stats()["image_cache"] == {**engine.stats()["image_cache"], "hits": 3, "misses": 1, "entries": 1}
    for i, prompt in enumerate(prompts):
        assert finals[f"r{i}"].outputs[0].token_ids == expected_greedy(model15, prompt)


def test_prefix_cache_serves_a_second_question_about_the_same_image(model15):
    first, second = make_prompts(model15.config.image_token_id, 2, seed=9, images=1, shared_prefix=False)
    second = {**second, "prompt_token_ids": first["prompt_token_ids"][:22] + second["prompt_token_ids"][22:]}
    engine = Engine(model15, max_num_batched_tokens=64)
    finals, _ = run(engine, {0: [("q1", first, GREEDY)]})
    computed = engine.stats()["prompt_tokens_computed"]
    finals, _ = run(engine, {0: [("q2", second, GREEDY)]})
    assert finals["q2"].num_cached_tokens == 16  # the image's block; the rest differs
    assert engine.stats()["prompt_tokens_computed"] - computed == len(second["prompt_token_ids"]) - 16
    assert finals["q2"].outputs[0].token_ids == expected_greedy(model15, second)


def test_concurrent_questions_about_one_new_image_compute_it_once(model15):
    prompts = make_prompts(model15.config.image_token_id, 6, seed=2, images=1, shared_prefix=True)
    for prompt in prompts:
        prompt["prompt_token_ids"][:20] = prompts[0]["prompt_token_ids"][:20]
    engine = Engine(model15, max_num_seqs=6, max_num_batched_tokens=256)
    finals, _ = run(engine, {0: [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]})
    stats = engine.stats()
    assert stats["image_cache"]["misses"] == 1 and stats["prefix_cache"]["hits"] == 5
    for i, prompt in enumerate(prompts):
        assert finals[f"r{i}"].outputs[0].token_ids == expected_greedy(model15, prompt)


def test_next_chat_turn_prefills_only_the_new_tokens(model15, processor15):
    picture = fastllava.load_image(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    turn1 = [{"role": "user", "content": [{"type": "image", "image": picture},
                                          {"type": "text", "text": "what is in the picture?"}]}]
    params = SamplingParams(max_tokens=10, temperature=0)
    engine = Engine(model15, processor15, max_num_batched_tokens=64)
    first = run(engine, {0: [("t1", turn1, params)]})[0]["t1"]
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": first.outputs[0].text}]},
                     {"role": "user", "content": [{"type": "text", "text": "and what colour is it?"}]}]
    second = run(engine, {0: [("t2", turn2, params)]})[0]["t2"]
    assert second.num_cached_tokens >= (first.prompt_tokens // 16) * 16
    fresh = Engine(model15, processor15, enable_prefix_caching=False, image_cache_bytes=0)
    assert second.outputs[0].token_ids == run(fresh, {0: [("t2", turn2, params)]})[0]["t2"].outputs[0].token_ids


def test_seeded_sampling_is_reproducible_whatever_the_batch(model15):
    prompts = make_prompts(model15.config.image_token_id, 5, seed=4)
    seeded = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    alone = run(Engine(model15), {0: [("x", prompts[0], seeded)]})[0]["x"].outputs[0].token_ids
    others = [SamplingParams(max_tokens=9, temperature=1.0, seed=i, ignore_eos=True) for i in range(3)] + [GREEDY]
    engine = Engine(model15, max_num_seqs=5, max_num_batched_tokens=20)
    arrivals = {0: [(f"o{i}", prompts[i + 1], others[i]) for i in range(2)],
                3: [("x", prompts[0], seeded)] + [(f"o{i}", prompts[i + 1], others[i]) for i in range(2, 4)]}
    assert run(engine, arrivals)[0]["x"].outputs[0].token_ids == alone
    # the same processors and the same draws as generate() with that seed
    ids = torch.tensor([prompts[0]["prompt_token_ids"]])
    reference = model15.generate(input_ids=ids, pixel_values=prompts[0]["pixel_values"], max_new_tokens=12,
                                 do_sample=True, temperature=1.3, top_p=0.95, top_k=40, seed=1234, eos_token_id=None)
    assert alone == reference[0, ids.shape[1]:].tolist()


def test_n_samples_share_the_prompt(model15):
    prompt = make_prompts(model15.config.image_token_id, 1, seed=6)[0]
    length = len(prompt["prompt_token_ids"])
    engine = Engine(model15, max_num_batched_tokens=128, enable_prefix_caching=False)
    out = run(engine, {0: [("g", prompt, SamplingParams(n=3, max_tokens=NEW, temperature=0, ignore_eos=True))]})[0]["g"]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(o.token_ids == expected_greedy(model15, prompt) for o in out.outputs)
    assert engine.stats()["prompt_tokens_computed"] < 3 * length - 2 * 16  # the samples reuse the prompt's blocks
    sampled = SamplingParams(n=3, max_tokens=10, temperature=1.5, seed=3, ignore_eos=True)
    first = run(Engine(model15), {0: [("s", prompt, sampled)]})[0]["s"]
    again = run(Engine(model15), {0: [("s", prompt, sampled)]})[0]["s"]
    samples = [o.token_ids for o in first.outputs]
    assert samples == [o.token_ids for o in again.outputs] and len({tuple(s) for s in samples}) == 3


def test_logprobs_are_the_models_distribution(model15):
    prompt = make_prompts(model15.config.image_token_id, 1, seed=8)[0]
    out = run(Engine(model15), {0: [("l", prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=3,
                                                                ignore_eos=True))]})[0]["l"].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry.token_id == token and len(entry.top) == 3
        assert entry.logprob == pytest.approx(max(entry.top.values()), abs=1e-6) and entry.logprob <= 0
    with torch.no_grad():
        logits = model15(input_ids=torch.tensor([prompt["prompt_token_ids"]]),
                         pixel_values=prompt["pixel_values"]).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)
    assert out.logprobs[0].logprob == pytest.approx(float(expected[out.token_ids[0]]), abs=1e-4)
    plain = run(Engine(model15), {0: [("p", prompt, GREEDY)]})[0]["p"].outputs[0]
    assert plain.logprobs is None


def test_stop_strings_cut_the_text_and_the_stream_adds_up(model15, processor15):
    prompt = make_prompts(model15.config.image_token_id, 1, seed=12)[0]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine = Engine(model15, processor15)
    full = run(engine, {0: [("f", prompt, params)]})[0]["f"].outputs[0]
    assert full.text == processor15.decode(full.token_ids, skip_special_tokens=True)
    clean = [i for i in range(3, len(full.text) - 3) if "\ufffd" not in full.text[i:i + 3] and full.text[i:i + 3].strip()]
    assert clean, f"no usable stop string in {full.text!r}"
    stop = full.text[clean[0]:clean[0] + 3]
    stopped = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=["never-there", stop])
    finals, steps = run(engine, {0: [("s", prompt, stopped)]})
    out = finals["s"].outputs[0]
    assert out.text == full.text[: full.text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 24
    streamed = "".join(o.outputs[0].text_delta for step in steps for o in step if o.request_id == "s")
    assert streamed == out.text
    assert [t for step in steps for o in step if o.request_id == "s" for t in o.outputs[0].token_ids_delta] == out.token_ids


def test_stop_token_ids_min_tokens_and_eos(model15):
    prompt = make_prompts(model15.config.image_token_id, 1, seed=13)[0]
    free = run(Engine(model15), {0: [("f", prompt, GREEDY)]})[0]["f"].outputs[0].token_ids
    stop_id = free[3]
    out = run(Engine(model15), {0: [("s", prompt, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True,
                                                                  stop_token_ids=[stop_id]))]})[0]["s"].outputs[0]
    assert out.token_ids == free[: free.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    engine = Engine(model15)
    engine.eos_ids = [stop_id]  # as if it were the checkpoint's end-of-sequence token
    eos = run(engine, {0: [("e", prompt, SamplingParams(max_tokens=NEW, temperature=0))]})[0]["e"].outputs[0]
    assert eos.token_ids == free[: free.index(stop_id) + 1] and eos.stop_reason is None
    late = run(engine, {0: [("m", prompt, SamplingParams(max_tokens=NEW, temperature=0, min_tokens=6))]})[0]["m"]
    assert len(late.outputs[0].token_ids) >= 6 and stop_id not in late.outputs[0].token_ids[:6]


def test_user_errors_fail_only_their_request(model15, processor15):
    engine = Engine(model15, processor15, max_model_len=100)
    good = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    with pytest.raises(RequestError, match="context"):
        engine.add_request("long", {"prompt_token_ids": list(range(3, 120))}, GREEDY)
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.add_request("long2", {"prompt_token_ids": list(range(3, 97))}, GREEDY)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(TypeError):
        engine.add_request("t", good, {"max_tokens": 3})
    engine.add_request("bad-image", [{"role": "user", "content": [{"type": "image", "path": "/no/such.png"},
                                                                   {"type": "text", "text": "hi"}]}], GREEDY)
    with pytest.raises(RequestError, match="no image"):
        engine.add_request("no-image", {"prompt_token_ids": [5, model15.config.image_token_id, 6]}, GREEDY)
    engine.add_request("too-long-text", "word " * 200, GREEDY)
    engine.add_request("good", good, GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", good, GREEDY)
    finals, _ = run(engine, {})
    assert "no such file" in finals["bad-image"].error
    assert "context" in finals["too-long-text"].error
    assert finals["good"].error is None and len(finals["good"].outputs[0].token_ids) == NEW
    assert engine.stats()["requests_failed"] == 2


def test_async_engine_streams_aborts_and_sheds_load(model15, processor15):
    prompts = make_prompts(model15.config.image_token_id, 3, seed=14)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(model15, processor15, max_num_seqs=2, max_num_batched_tokens=32,
                             max_queued_requests=1).start()

        async def collect(request_id, prompt, sampling):
            deltas, last = [], None
            async for out in engine.generate(request_id, prompt, sampling):
                deltas.append(out.outputs[0].text_delta)
                last = out
            return "".join(deltas), last

        try:
            results = await asyncio.gather(*(collect(f"s{i}", p, params) for i, p in enumerate(prompts)))
            for (text, last), prompt in zip(results, prompts):
                assert last.finished and text == last.outputs[0].text
                assert last.outputs[0].token_ids == expected_greedy(model15, prompt)

            # a consumer that goes away aborts its request and frees its memory
            long = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
            stream = engine.generate("gone", prompts[0], long)
            await stream.__anext__()
            await stream.aclose()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if engine.stats()["num_requests"] == 0 and engine.stats()["requests_aborted"] == 1:
                    break
            assert engine.stats()["requests_aborted"] == 1 and engine.engine.pool.used_bytes == \
                engine.engine.prefix_cache.retired_bytes

            # max_num_seqs + max_queued_requests = 3 in flight; the fourth is refused at once
            streams = [engine.generate(f"q{i}", prompts[i % 3], long) for i in range(3)]
            for s in streams:
                await s.__anext__()
            with pytest.raises(EngineOverloadedError):
                await engine.generate("q3", prompts[0], params).__anext__()
            for s in streams:
                await s.aclose()

            with pytest.raises(RequestError, match="context"):
                await engine.generate("huge", "word " * 400, params).__anext__()
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_llm_chat_and_generate(ck15, model15, processor15):
    llm = LLM(str(ck15), dtype="float32", max_num_seqs=3, max_num_batched_tokens=32)
    rng = np.random.default_rng(1)
    pictures = [fastllava.load_image(rng.integers(0, 255, (24 + 8 * i, 32, 3), dtype=np.uint8)) for i in range(3)]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": pictures[i % 3]},
                                                   {"type": "text", "text": f"question {i}?"}]}] for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0)
    outs = llm.chat(conversations, params, use_tqdm=False)
    assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)
    for conversation, out in zip(conversations, outs):
        inputs = processor15.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")
        expected = model15.generate(**inputs, max_new_tokens=6)[0, inputs["input_ids"].shape[1]:].tolist()
        eos = model15.generation_config.eos_token_ids()
        assert out.outputs[0].token_ids == expected[: next((i + 1 for i, t in enumerate(expected) if t in eos),
                                                           len(expected))]
        assert out.num_image_tokens == 16 and out.prompt_tokens == inputs["input_ids"].shape[1]
    single = llm.chat(conversations[0], params)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids

    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    generated = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": pictures[0]}}, "USER: hi"],
                             [params, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)], use_tqdm=False)
    inputs = processor15(images=pictures[0], text=prompt, return_tensors="pt")
    expected = model15.generate(**inputs, max_new_tokens=6)[0, inputs["input_ids"].shape[1]:].tolist()
    assert generated[0].outputs[0].token_ids == expected[: len(generated[0].outputs[0].token_ids)]
    assert len(generated[1].outputs[0].token_ids) == 3 and generated[1].num_image_tokens == 0


def test_llm_with_weight_only_int8_matches_the_quantized_generate(ck15):
    pytest.importorskip("fastllava.quantization")
    llm = LLM(str(ck15), dtype="float32", quantization="int8")
    conversation = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    out = llm.chat(conversation, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    model, processor = llm.engine.model, llm.engine.processor
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, eos_token_id=None)[0, inputs["input_ids"].shape[1]:]
    assert out.outputs[0].token_ids == expected.tolist()


@pytest.mark.parametrize("family,weights", [("siglip_qwen2", None), ("clip_mistral", None), ("clip_llama", "int8")])
def test_decoding_sequences_take_the_lean_step_and_match_generate(checkpoint_factory, family, weights):
    """bf16 (and int8 weights): a step of decode tokens only runs generation/lean_step.py, as generate() decodes -
    one sequence alone, or several at once each over its own cache (a sliding window included) - and every
    request's greedy tokens are generate()'s."""
    config = None if weights is None else fastllava.QuantizationConfig(weights=weights)
    model = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory(family), dtype=torch.bfloat16,
                                                                    quantization_config=config)
    prompts = make_prompts(model.config.image_token_id, 3, seed=5)
    for prompt in prompts:
        prompt["pixel_values"] = prompt["pixel_values"].bfloat16()
    engine = Engine(model, max_num_seqs=4, kv_cache_bytes=1 << 22)
    lean_rows = []  # rows of each step the lean step computed
    original = engine.runner._lean_decode

    def counted(chunks):
        logits = original(chunks)
        if logits is not None:
            assert logits.shape == (len(chunks), model.config.text_config.vocab_size)
            lean_rows.append(len(chunks))
        return logits

    engine.runner._lean_decode = counted
    finals, _ = run(engine, {0: [("r0", prompts[0], GREEDY), ("r1", prompts[1], GREEDY)],
                             40: [("r2", prompts[2], GREEDY)]})
    assert lean_rows.count(1) >= NEW - 1  # at least r2's decode steps, which ran alone
    assert 2 in lean_rows  # r0 and r1 decoding together
    for i, prompt in enumerate(prompts):
        assert finals[f"r{i}"].outputs[0].token_ids == expected_greedy(model, prompt), f"request {i}"
