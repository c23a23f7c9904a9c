"""fastllava's C++ single-query attention (fastllava/kernels/attention.cpp) against a float64 reference:
K/V and query dtypes, batch, grouped-query layouts, cache lengths on both sides of the 4-key and L1-block tiles,
head widths with and without a scalar tail, strided views of larger storages, masks with holes and rows with
nothing to attend to, thread counts, the shapes torch.compile sees, errors, its exp; then the two callers
(models/attention.py's decode path and the engine's RaggedPlan) and the KV cache dtype it allows."""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels import build

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ops():
    assert build.load(), "the C++ kernels did not build"
    return torch.ops.fastllava


def reference(q, k, v, valid, scale):
    """softmax(q k^T * scale) v in float64; a query with no valid key gives zeros (as SDPA)."""
    groups = q.shape[1] // k.shape[1]
    keys = k.double().repeat_interleave(groups, 1)
    values = v.double().repeat_interleave(groups, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), keys) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhs,bhsd->bhd", weights, values)


def assert_close(got, want, dtype):
    """float32 arithmetic, one rounding to the output dtype: half an ulp of it plus a little float32 error."""
    assert got.dtype == dtype and got.shape == want.shape
    ulp = {torch.float32: 2 ** -22, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}[dtype]
    error = (got.double() - want).abs()
    bound = want.abs() * ulp + 2e-6 * want.abs().max().clamp(min=1.0)
    assert bool((error <= bound).all()), f"max error {error.max().item():.3g}, worst excess {(error - bound).max():.3g}"


def cache(batch, kv_heads, length, dim, dtype, seed, spare=5):
    """k, v (B, Hkv, S, D) as views of a larger (B, 2, Hkv, S + spare, D) storage, like the engine's."""
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(batch, 2, kv_heads, length + spare, dim, generator=g).to(dtype)
    return storage[:, 0, :, :length], storage[:, 1, :, :length]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(14, 2), (16, 16), (8, 1)])
@pytest.mark.parametrize("length", [1, 7, 64, 1000])
@pytest.mark.parametrize("dim", [64, 128, 72])
def test_matches_float64_reference(ops, dtype, heads, kv_heads, length, dim):
    seed = heads * 10000 + length * 10 + dim
    k, v = cache(3, kv_heads, length, dim, dtype, seed)
    q = torch.randn(3, heads, dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    scale = dim ** -0.5
    assert not k.is_contiguous() or length == 1
    assert_close(ops.decode_attention(q, k, v, None, scale), reference(q, k, v, None, scale), dtype)


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("q_dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_query_dtype_decides_the_output_dtype(ops, kv_dtype, q_dtype, batch):
    k, v = cache(batch, 2, 300, 64, kv_dtype, seed=7)
    big = torch.randn(batch, 14, 3, 64).to(q_dtype)
    q = big[:, :, 1]  # not contiguous
    assert_close(ops.decode_attention(q, k, v, None, 0.125), reference(q, k, v, None, 0.125), q_dtype)


def test_other_layouts_and_scales(ops):
    g = torch.Generator().manual_seed(3)
    storage = torch.randn(2, 40, 4, 64, generator=g).to(torch.bfloat16)  # (B, S, Hkv, D): heads interleaved
    k = storage.permute(0, 2, 1, 3)[:, :, :33]
    v = torch.randn(2, 4, 33, 64, generator=g).to(torch.bfloat16)  # k and v with different strides
    q = torch.randn(2, 8, 64, generator=g)
    for scale in (0.125, 1.0, 0.01):
        assert_close(ops.decode_attention(q, k, v, None, scale), reference(q, k, v, None, scale), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(14, 2, 64), (8, 8, 72), (8, 1, 128), (16, 16, 64)])
def test_masks_with_holes_and_a_row_with_nothing_to_see(ops, dtype, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(heads + dim)
    k, v = cache(3, kv_heads, 203, dim, dtype, seed=heads + dim)
    valid = torch.rand(3, 203, generator=g) > 0.4
    valid[0, :50] = False  # left padding
    valid[1] = False  # nothing to attend to: zeros
    valid[2, 100:] = False
    k[~valid[:, None, :, None].expand_as(k)] = float("nan")  # masked slots may hold anything
    v[~valid[:, None, :, None].expand_as(v)] = float("inf")
    q = torch.randn(3, heads, dim, generator=g).to(dtype)
    got = ops.decode_attention(q, k, v, valid, dim ** -0.5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert_close(got, reference(q, k.nan_to_num(0.0), v.nan_to_num(0.0, 0.0), valid, dim ** -0.5), dtype)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0, 0.0)
    broadcast = valid[2:3].expand(3, -1)  # stride 0 over the batch
    assert_close(ops.decode_attention(q, k, v, broadcast, dim ** -0.5), reference(q, k, v, broadcast, dim ** -0.5),
                 dtype)


@pytest.mark.parametrize("heads,kv_heads,dim", [(14, 2, 64), (8, 1, 128), (4, 4, 32), (3, 3, 256)])
def test_avx512_and_avx2_loops_agree(ops, heads, kv_heads, dim):
    """bf16 queries and caches take attention_avx512.cpp's loops where the CPU has AVX512-BF16 (VDPBF16PS scores
    for 16 keys at a time, 16-lane value sums): the same accuracy as the AVX2 loops, results within a bf16 ulp of
    theirs, key counts around the 16-key tiles and the 64-key blocks, masked slots holding NaN."""
    for length in (1, 15, 16, 17, 64, 65, 777):
        k, v = cache(2, kv_heads, length, dim, torch.bfloat16, seed=length + dim)
        q = torch.randn(2, heads, dim, generator=torch.Generator().manual_seed(length)).to(torch.bfloat16)
        valid = torch.rand(2, length, generator=torch.Generator().manual_seed(length + 1)) > 0.3
        valid[:, 0] = True
        k[~valid[:, None, :, None].expand_as(k)] = float("nan")
        results = []
        for avx512 in (True, False):
            previous = ops.set_avx512(avx512)
            try:
                results.append(ops.decode_attention(q, k, v, valid, dim ** -0.5))
            finally:
                ops.set_avx512(previous)
        want = reference(q, k.nan_to_num(0.0), v, valid, dim ** -0.5)
        for got in results:
            assert_close(got, want, torch.bfloat16)
        assert torch.allclose(results[0].float(), results[1].float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("dim", [64, 128])
def test_one_pass_softmax_when_the_max_keeps_rising(ops, dim):
    """Heads with their own K/V (G = 1) are read in one pass with a running max: keys whose scores climb block
    after block (every block rescales what came before), one dominant key late, and scores near float32's exp
    range all match the float64 softmax."""
    length = 300
    g = torch.Generator().manual_seed(dim)
    q = torch.randn(1, 4, dim, generator=g).to(torch.bfloat16)
    k, v = cache(1, 4, length, dim, torch.bfloat16, seed=dim)
    ramp = torch.linspace(0.1, 3.0, length)[None, None, :, None]
    k[:, 0] = (q[:, 0, None, :].float() * ramp[0]).to(torch.bfloat16)  # head 0: scores grow with the position
    k[:, 1, 250] = (q[:, 1].float() * 8.0).to(torch.bfloat16)  # head 1: one key far above the rest
    k[:, 2] = (k[:, 2].float() * 12.0).to(torch.bfloat16)  # head 2: scores spread over +-80 after scaling
    for scale in (dim ** -0.5, 1.0):
        assert_close(ops.decode_attention(q, k, v, None, scale), reference(q, k, v, None, scale), torch.bfloat16)


def test_one_and_two_threads_give_identical_results(ops):
    k, v = cache(3, 4, 777, 64, torch.bfloat16, seed=11)
    q = torch.randn(3, 16, 64, dtype=torch.bfloat16)
    valid = torch.rand(3, 777) > 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.decode_attention(q, k, v, valid, 0.125)
        torch.set_num_threads(2)
        two = ops.decode_attention(q, k, v, valid, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_empty_cache_and_empty_batch(ops):
    q = torch.randn(2, 4, 64)
    k = v = torch.randn(2, 2, 0, 64)
    assert torch.equal(ops.decode_attention(q, k, v, None, 0.125), torch.zeros(2, 4, 64))
    assert ops.decode_attention(q[:0], k[:0], v[:0], None, 0.125).shape == (0, 4, 64)


def test_meta_shapes_and_fake_tensors(ops):
    q = torch.empty(3, 14, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(3, 2, 100, 64, dtype=torch.float32, device="meta")
    out = ops.decode_attention(q, k, k, None, 0.125)
    assert out.device.type == "meta" and out.shape == (3, 14, 64) and out.dtype == torch.bfloat16
    k, v = cache(1, 2, 10, 64, torch.bfloat16, seed=0)
    torch.library.opcheck(ops.decode_attention.default, (torch.randn(1, 4, 64), k, v, torch.rand(1, 10) > 0.5, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def test_errors_name_the_problem(ops):
    q = torch.randn(1, 8, 64)
    k, v = cache(1, 2, 10, 64, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="k/v must be float32, bfloat16 or float16"):
        ops.decode_attention(q, k.to(torch.int32), v.to(torch.int32), None, 0.125)
    with pytest.raises(RuntimeError, match="q must be float32"):
        ops.decode_attention(q.double(), k, v, None, 0.125)
    with pytest.raises(RuntimeError, match="k is Float but v is BFloat16"):
        ops.decode_attention(q, k, v.bfloat16(), None, 0.125)
    with pytest.raises(RuntimeError, match="6 query heads are not a multiple of the 4 key/value heads"):
        ops.decode_attention(torch.randn(1, 6, 64), *cache(1, 4, 10, 64, torch.float32, seed=0), None, 0.125)
    with pytest.raises(RuntimeError, match="head width 64 does not match k/v's 32"):
        ops.decode_attention(q, *cache(1, 2, 10, 32, torch.float32, seed=0), None, 0.125)
    with pytest.raises(RuntimeError, match="batch 2 but k/v have 1"):
        ops.decode_attention(torch.randn(2, 8, 64), k, v, None, 0.125)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        columns = torch.randn(1, 2, 64, 10).transpose(2, 3)  # (1, 2, 10, 64), stride 10 along D
        ops.decode_attention(q, columns, columns, None, 0.125)
    with pytest.raises(RuntimeError, match=r"valid must be \(B, S\)"):
        ops.decode_attention(q, k, v, torch.ones(1, 9, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="valid must be bool"):
        ops.decode_attention(q, k, v, torch.ones(1, 10), 0.125)
    with pytest.raises(RuntimeError, match=r"q must be \(B, H, D\)"):
        ops.decode_attention(q[:, :, None], k, v, None, 0.125)


def test_vectorised_exp_is_within_one_ulp(ops):
    """(An exhaustive run over every float32 in [-104, 88.7] measured at most 0.988 ulp; this is a dense sample.)"""
    x = torch.cat([torch.linspace(-104, 88.72, 1_000_001), torch.randn(100_000) * 3, torch.rand(100_000) * -1e-3])
    got = ops.exp_avx2(x).double()
    want = torch.exp(x.double())
    want32 = want.float()
    normal = want32 != 0
    ulp = (torch.nextafter(want32, torch.tensor(float("inf"))) - want32).double()
    assert ((got - want).abs() / ulp)[normal].max().item() <= 1.0
    special = torch.tensor([float("-inf"), -200.0, 0.0, -0.0, 89.0, float("inf"), float("nan")])
    out = ops.exp_avx2(special)
    assert out[:6].tolist() == [0.0, 0.0, 1.0, 1.0, float("inf"), float("inf")] and out[6].isnan()


# ------------------------------------------------------------------------------------------------ the callers


def test_decode_path_uses_the_kernel_where_built(cpu_kernels, monkeypatch):
    from fastllava.models import attention

    calls = []
    real = attention._single_query_torch
    monkeypatch.setattr(attention, "_single_query_torch", lambda *a: calls.append(1) or real(*a))
    k, v = cache(2, 2, 50, 64, torch.bfloat16, seed=1)
    q = torch.randn(2, 14, 1, 64, dtype=torch.bfloat16)
    mask = (torch.rand(2, 1, 1, 50) > 0.3)
    mask[1] = False
    out, _ = attention.attend(q, k, v, mask)
    assert len(calls) == (0 if cpu_kernels == "fastllava-gemv" else 1)
    if cpu_kernels == "fastllava-gemv":
        assert_close(out[:, :, 0], reference(q[:, :, 0], k, v, mask[:, 0, 0], 0.125), torch.bfloat16)
    expected = real(q, k, v, mask)  # the PyTorch path: bf16 weights times bf16 values, so a bf16 ulp or two apart
    assert torch.allclose(out.float(), expected.float(), rtol=2 ** -6, atol=1e-2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    with torch.enable_grad():  # the kernel has no backward: autograd stays on PyTorch's ops
        trained = q.float().requires_grad_()
        attention.attend(trained, k.float(), v.float(), None)[0].sum().backward()
    assert trained.grad is not None


def test_kv_cache_dtype_follows_the_kernels(cpu_kernels, monkeypatch):
    from fastllava.models.half_matmul import resolve_kv_dtype

    monkeypatch.setenv("FASTLLAVA_HALF_MATMUL", "float32")
    expected = torch.bfloat16 if cpu_kernels == "fastllava-gemv" else torch.float32
    assert resolve_kv_dtype("auto", torch.bfloat16, "cpu") == expected
    assert resolve_kv_dtype("auto", torch.float32, "cpu") == torch.float32
    assert resolve_kv_dtype("float32", torch.bfloat16, "cpu") == torch.float32


@pytest.mark.parametrize("family", ["clip_llama", "clip_mistral", "siglip_qwen2"])  # mistral: a sliding window
def test_bf16_engine_decodes_like_generate(checkpoint_factory, family, cpu_kernels, monkeypatch):
    """A bf16 model: the engine (kernel on decode rows, a window as its mask) and generate() (the kernel with
    generate's padding masks) give the same greedy tokens, with the kernels (bf16 caches) and without (float32).

    Many-row products are pinned to float32-then-round (FASTLLAVA_HALF_MATMUL=float32): with native bf16 GEMMs
    (CPUs with AVX512-BF16) the engine's chunked prefill and generate's whole prefill block the products
    differently, and a one-ulp bf16 difference flips near-tied argmaxes of these random tiny models."""
    monkeypatch.setenv("FASTLLAVA_HALF_MATMUL", "float32")
    import fastllava
    from fastllava import SamplingParams
    from fastllava.engine import Engine
    from fastllava.models.half_matmul import half_products_in_float32
    from test_engine import expected_greedy, make_prompts, run

    model = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint_factory(family), dtype=torch.bfloat16)
    prompts = make_prompts(model.config.image_token_id, 6, seed=5)
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=24, kv_cache_bytes=1 << 22)
    # float32 only where PyTorch's ops would attend over a bf16 cache on a CPU without bf16 arithmetic
    float32_cache = cpu_kernels == "torch-ops" and half_products_in_float32()
    assert engine.pool.dtype == (torch.float32 if float32_cache else torch.bfloat16)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    finals, _ = run(engine, {0: [(f"r{i}", p, params) for i, p in enumerate(prompts)]})
    for i, prompt in enumerate(prompts):
        assert finals[f"r{i}"].outputs[0].token_ids == expected_greedy(model, prompt, 12), f"request {i}"
