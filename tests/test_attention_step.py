"""decode_attention_step (fastllava/kernels/attention_step.cpp): RoPE on the new q/k, the cache write and attention
in one op give exactly what rotary_, cache_write_ and decode_attention give one after the other, and bad shapes are
refused with a message naming them."""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels import build


@pytest.fixture(scope="module")
def ops():
    assert build.load(), "the C++ kernels did not build"
    return torch.ops.fastllava


def step_inputs(batch, heads, kv_heads, dim, length, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    joint = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, generator=generator).to(dtype)
    q, k, v = joint.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)  # views of one product, as in decode
    angles = torch.rand(batch, 1, dim // 2, generator=generator) * 6
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    keys = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    values = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    return q, k, v, cos, sin, keys, values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, heads, kv_heads, dim", [(1, 16, 16, 64), (2, 14, 2, 64), (3, 4, 4, 32)])
def test_equals_the_three_ops(ops, dtype, batch, heads, kv_heads, dim):
    length, slot, kv_len = 40, 29, 30
    q, k, v, cos, sin, keys, values = step_inputs(batch, heads, kv_heads, dim, length, dtype, heads + batch)
    valid = torch.ones(batch, kv_len, dtype=torch.bool)
    valid[-1, :7] = False  # a left-padded row
    keys2, values2, q2, k2 = keys.clone(), values.clone(), q.clone(), k.clone()

    got = ops.decode_attention_step(q, k, v, cos, sin, keys, values, slot, kv_len, valid, dim ** -0.5)

    q_heads = q2.view(batch, 1, heads, dim).transpose(1, 2)
    k_heads = k2.view(batch, 1, kv_heads, dim).transpose(1, 2)
    ops.rotary_(q_heads, cos, sin)
    ops.rotary_(k_heads, cos, sin)
    ops.cache_write_(keys2, values2, k_heads, v.view(batch, 1, kv_heads, dim).transpose(1, 2), slot)
    want = ops.decode_attention(q_heads.reshape(batch, heads, dim), keys2[:, :, :kv_len], values2[:, :, :kv_len],
                                valid, dim ** -0.5)
    assert got.shape == (batch, 1, heads * dim)
    assert torch.equal(got, want.reshape(batch, 1, heads * dim))
    assert torch.equal(keys, keys2) and torch.equal(values, values2)  # the new row written, nothing else touched
    assert torch.equal(q, q2) and torch.equal(k, k2)  # q and k rotated in place, as rotary_ does
    assert not torch.equal(keys[:, :, slot], step_inputs(batch, heads, kv_heads, dim, length, dtype,
                                                         heads + batch)[5][:, :, slot])


def test_bad_shapes_are_named(ops):
    q, k, v, cos, sin, keys, values = step_inputs(1, 4, 2, 32, 16, torch.bfloat16, 0)
    with pytest.raises(RuntimeError, match="kv_len 17 must cover the new slot 3 and fit the cache's 16"):
        ops.decode_attention_step(q, k, v, cos, sin, keys, values, 3, 17, None, 1.0)
    with pytest.raises(RuntimeError, match="kv_len 3 must cover the new slot 3"):
        ops.decode_attention_step(q, k, v, cos, sin, keys, values, 3, 3, None, 1.0)
    with pytest.raises(RuntimeError, match="are not one token's"):
        ops.decode_attention_step(q, k[..., :32], v[..., :32], cos, sin, keys, values, 3, 8, None, 1.0)
    with pytest.raises(RuntimeError, match="the cache must be"):
        ops.decode_attention_step(q, k, v, cos, sin, keys[0], values[0], 3, 8, None, 1.0)
