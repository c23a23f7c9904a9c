"""fastllava's AVX512-BF16 prefill attention (fastllava/kernels/prefill_attention.cpp) against a float64 reference
and against torch's own bf16 SDPA: full and causal attention, grouped-query heads, head sizes with and without
16/32-dim tails, key counts on both sides of the 64-key blocks, query counts on both sides of the 4-row tiles,
strided cache views, batches, threads; that `attend` routes bf16 prefill through it (and nothing else); that a
bf16 model's logits are the same with and without it; clear errors. The kernel needs AVX512-BF16: on a CPU
without it the tests that run it are skipped and the routing test checks that SDPA is used instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllava.kernels import build
from fastllava.models import attention

HAS_AVX512_BF16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
needs_avx512_bf16 = pytest.mark.skipif(not HAS_AVX512_BF16, reason="the kernel needs a CPU with AVX512-BF16")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert build.load(), "the C++ kernels did not build"
    return torch.ops.fastllava


def reference(q, k, v, causal):
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = q.double() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


def sdpa_bf16(q, k, v, causal):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=causal)


def random_qkv(batch, heads, kv_heads, queries, keys, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(batch, h, n, dim, generator=generator).to(torch.bfloat16)  # noqa: E731
    return make(heads, queries), make(kv_heads, keys), make(kv_heads, keys)


def assert_like_sdpa(got, q, k, v, causal):
    """Within torch's own bf16 SDPA error of the exact result (plus a bf16 ulp of slack): the kernel rounds the
    probabilities to bf16 before the value product, as torch's flash kernel does."""
    want = reference(q, k, v, causal)
    ours = (got.double() - want).abs().max().item()
    theirs = (sdpa_bf16(q, k, v, causal).double() - want).abs().max().item()
    assert ours <= 1.5 * theirs + 2 ** -8, (ours, theirs)


@needs_avx512_bf16
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim", [8, 33, 64, 72, 128])  # 16-dim tails, an odd dim (a half-filled pair), two passes
@pytest.mark.parametrize("length", [2, 5, 63, 64, 65, 130])
def test_matches_reference(kernels, causal, dim, length):
    q, k, v = random_qkv(2, 6, 2, length, length, dim, seed=dim * 1000 + length)
    out = kernels.prefill_attention(q, k, v, causal, dim ** -0.5)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert out.permute(0, 2, 1, 3).is_contiguous()  # (B, T, H, D) in memory: the output projection's layout
    assert_like_sdpa(out, q, k, v, causal)


@needs_avx512_bf16
@pytest.mark.parametrize("queries,keys", [(3, 70), (100, 7), (1, 1), (9, 200)])
def test_more_or_fewer_keys_than_queries(kernels, queries, keys):
    q, k, v = random_qkv(1, 4, 4, queries, keys, 40, seed=queries + keys)
    assert_like_sdpa(kernels.prefill_attention(q, k, v, False, 40 ** -0.5), q, k, v, False)


@needs_avx512_bf16
def test_model_sized_shapes_with_large_scores(kernels):
    """SigLIP's [16, 729, 72] and Qwen2-0.5B's causal [14/2, 757, 64] with scores spread wide enough that the
    running max changes across blocks (a softmax that forgot to rescale would be far off)."""
    for heads, kv_heads, length, dim, causal in [(16, 16, 729, 72, False), (14, 2, 757, 64, True)]:
        q, k, v = random_qkv(1, heads, kv_heads, length, length, dim, seed=length)
        q = (q.float() * 3).to(torch.bfloat16)
        assert_like_sdpa(kernels.prefill_attention(q, k, v, causal, dim ** -0.5), q, k, v, causal)


@needs_avx512_bf16
def test_strided_views_and_threads(kernels):
    """k/v as prefixes of a preallocated cache (strided heads and positions), q as a transposed projection."""
    q_rows = torch.randn(2, 50, 8 * 64).to(torch.bfloat16)
    q = q_rows.view(2, 50, 8, 64).transpose(1, 2)
    cache_k = torch.randn(2, 2, 300, 64).to(torch.bfloat16)
    cache_v = torch.randn(2, 2, 300, 64).to(torch.bfloat16)
    k, v = cache_k[:, :, :50], cache_v[:, :, :50]
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(kernels.prefill_attention(q, k, v, True, 0.125))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])  # each (head, 4 rows) task is one thread's: no order dependence
    assert_like_sdpa(results[0], q.contiguous(), k.contiguous(), v.contiguous(), True)


def test_clear_errors(kernels):
    q, k, v = random_qkv(1, 4, 4, 8, 8, 16, seed=0)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        kernels.prefill_attention(q.float(), k, v, False, 0.25)
    with pytest.raises(RuntimeError, match="not a multiple"):
        kernels.prefill_attention(q, k[:, :3], v[:, :3], False, 0.25)
    with pytest.raises(RuntimeError, match="do not match"):
        kernels.prefill_attention(q, k, v[:, :, :4], False, 0.25)
    with pytest.raises(RuntimeError, match="causal needs"):
        kernels.prefill_attention(q, k[:, :, :4], v[:, :, :4], True, 0.25)


@pytest.fixture
def kernel_calls(kernels, monkeypatch):
    """Records the calls `attend` makes to the kernel (and still runs it)."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            if name == "prefill_attention":
                return lambda *args: calls.append(args) or kernels.prefill_attention(*args)
            return getattr(kernels, name)

    class Ops:  # torch.ops with fastllava's namespace spied on, every other namespace as it was
        def __init__(self, real):
            self.real, self.fastllava = real, Spy()

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(attention.torch, "ops", Ops(torch.ops))
    return calls


def test_attend_routes_bf16_prefill_only(kernels, kernel_calls):
    """bf16, unmasked or plain causal, more than one query: the kernel (where the CPU has it); fp32, masks,
    returned weights, a causal query block shorter than the keys, or the AVX-512 switch off: SDPA/eager."""
    q, k, v = random_qkv(1, 4, 2, 12, 12, 32, seed=1)
    attention.attend(q, k, v, None, causal_no_mask=True)
    assert len(kernel_calls) == (1 if HAS_AVX512_BF16 else 0)
    attention.attend(q, k, v, None)
    assert len(kernel_calls) == (2 if HAS_AVX512_BF16 else 0)
    attention.attend(q, k, v, torch.ones(1, 1, 12, 12, dtype=torch.bool).tril())
    attention.attend(q.float(), k.float(), v.float(), None, causal_no_mask=True)
    attention.attend(q, k, v, None, causal_no_mask=True, return_weights=True)
    attention.attend(q[:, :, :5], k, v, None, causal_no_mask=True)
    previous = kernels.set_avx512(False)
    try:
        attention.attend(q, k, v, None, causal_no_mask=True)
    finally:
        kernels.set_avx512(previous)
    assert len(kernel_calls) == (2 if HAS_AVX512_BF16 else 0)


@needs_avx512_bf16
def test_bf16_model_logits_with_and_without_the_kernel(kernels, kernel_calls, tmp_path):
    """A tiny bf16 LLaVA (SigLIP tower, GQA Qwen2 decoder): the prompt's logits through the kernel equal those
    through SDPA (AVX-512 switched off) within bf16 noise, and the next-token choices agree."""
    from tiny_checkpoints import make_checkpoint, sample_inputs

    from fastllava import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(make_checkpoint(tmp_path, "siglip_qwen2"),
                                                          dtype=torch.bfloat16)
    ids, _, pixels = sample_inputs(batch=1, length=40, pad=(0,))
    with torch.no_grad():
        fast = model(input_ids=ids, pixel_values=pixels.to(torch.bfloat16)).logits.float()
        used = len(kernel_calls)
        previous = kernels.set_avx512(False)
        try:
            plain = model(input_ids=ids, pixel_values=pixels.to(torch.bfloat16)).logits.float()
        finally:
            kernels.set_avx512(previous)
    assert used == 3 + 2 and len(kernel_calls) == used  # 3 vision layers + 2 decoder layers, then none
    assert (fast - plain).abs().max().item() <= 0.03 * plain.abs().max().item()
    assert (fast.argmax(-1) == plain.argmax(-1)).float().mean().item() >= 0.95
