"""fastllava.models.attention.attend: the single-query (decode) path on CPU against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllava.models.attention import attend


def sdpa_reference(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("heads, kv_heads", [(14, 2), (8, 8), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_per_sequence_matches_sdpa(heads, kv_heads, dtype):
    torch.manual_seed(heads + kv_heads)
    batch, keys = 3, 37
    q = torch.randn(batch, heads, 1, 16, dtype=dtype)
    k = torch.randn(batch, kv_heads, 64, 16, dtype=dtype)[:, :, :keys]  # a window of a larger cache, as in decode
    v = torch.randn(batch, kv_heads, 64, 16, dtype=dtype)[:, :, :keys]
    mask = torch.rand(batch, 1, 1, keys) > 0.3
    mask[:, ..., 0] = True
    got, weights = attend(q, k, v, mask)
    assert weights is None and got.shape == q.shape and got.dtype == dtype
    want = sdpa_reference(q.float(), k.float(), v.float(), mask)
    assert torch.allclose(got.float(), want, atol=1e-5 if dtype == torch.float32 else 2e-2)
    unmasked, _ = attend(q, k, v, None)
    assert torch.allclose(unmasked.float(), sdpa_reference(q.float(), k.float(), v.float(), None),
                          atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_a_query_that_may_see_nothing_gets_zeros_like_sdpa():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1] = False  # a left-padding row
    got, _ = attend(q, k, v, mask)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and not got.isnan().any()
    assert torch.allclose(got[0], sdpa_reference(q, k, v, mask)[0], atol=1e-6)
