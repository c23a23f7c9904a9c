"""fastllava's C++ pointwise ops (fastllava/kernels/pointwise.cpp) against the PyTorch expressions they replace
in the decoder layer, and the joint q/k/v and gate/up products (fastllava/models/fused_ops.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllava.kernels import build
from fastllava.models import fused_ops
from fastllava.models.half_matmul import Linear
from fastllava.models.huge_pages import move_to_huge_pages
from fastllava.models.llama import RMSNorm
from fastllava.models.rope import apply_rotary

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert build.load(), "the C++ kernels did not build"
    return torch.ops.fastllava


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """models/llama.py's RMSNorm expression (the fallback path)."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    """Half precision: PyTorch's roundings reproduced, so equal but for an ulp where a float32 reduction's order
    moved a value across a rounding boundary; float32: within a few ulps."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype in HALF:
        ulp = 2 ** -7 if want.dtype == torch.bfloat16 else 2 ** -10
        assert torch.allclose(got.float(), want.float(), rtol=ulp, atol=0)
        assert (got != want).float().mean().item() < 1e-3
    else:
        assert torch.allclose(got, want, rtol=4e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1024, 37, 8])
def test_rms_norm(kernels, dtype, width):
    torch.manual_seed(width)
    x = (torch.randn(3, 5, width) * 3).to(dtype)
    weight = torch.randn(width).to(dtype)
    assert_matches(kernels.rms_norm(x, weight, 1e-6), torch_rms_norm(x, weight, 1e-6))
    strided = x.transpose(0, 1)  # not contiguous: the op copies, the result is the same
    assert_matches(kernels.rms_norm(strided, weight, 1e-5), torch_rms_norm(strided, weight, 1e-5))
    if dtype == torch.bfloat16:  # the common case: bit-identical
        assert torch.equal(kernels.rms_norm(x, weight, 1e-6), torch_rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 20])
def test_rotary_in_place_equals_apply_rotary_exactly(kernels, dtype, head_dim):
    torch.manual_seed(head_dim)
    # (B, T, H, D) -> (B, H, T, D): the strided view a projection's output gives
    for batch, table_batch in ((2, 2), (3, 1)):
        x = torch.randn(batch, 7, 4, head_dim).to(dtype).transpose(1, 2)
        cos, sin = torch.randn(table_batch, 7, head_dim).to(dtype), torch.randn(table_batch, 7, head_dim).to(dtype)
        want = apply_rotary(x, cos, sin)
        kernels.rotary_(x, cos, sin)
        assert torch.equal(x, want)  # the same products and sums, each rounded as PyTorch rounds them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [2816, 13])
def test_silu_mul(kernels, dtype, width):
    torch.manual_seed(width)
    joint = (torch.randn(4, 2, 2 * width) * 4).to(dtype)
    gate, up = joint.chunk(2, dim=-1)  # halves of one product: rows with a stride
    want = F.silu(gate) * up
    got = kernels.silu_mul(gate, up)
    assert got.is_contiguous()
    assert_matches(got, want)
    extremes = torch.tensor([[-200.0, -90.0, -1e-3, 0.0, 1e-3, 50.0, 100.0, float("inf")]]).to(dtype)
    ones = torch.ones_like(extremes)
    assert_matches(kernels.silu_mul(extremes, ones), F.silu(extremes) * ones)


def test_clear_errors(kernels):
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight dtype"):
        kernels.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="weight of 4 values for rows of 8"):
        kernels.rms_norm(x, torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        kernels.rms_norm(x.double(), torch.ones(8).double(), 1e-6)
    with pytest.raises(RuntimeError, match="cos/sin must be"):
        kernels.rotary_(torch.randn(1, 2, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(RuntimeError, match="differ"):
        kernels.silu_mul(torch.randn(2, 8), torch.randn(2, 9))


def test_meta_shapes(kernels):
    x = torch.empty(2, 3, 16, device="meta")
    assert kernels.rms_norm(x, torch.empty(16, device="meta"), 1e-6).shape == x.shape
    assert kernels.silu_mul(x, x).shape == x.shape


class Projections(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = Linear(64, 48, bias=bias), Linear(64, 16, bias=bias), Linear(64, 16, bias=bias)


class Holder(torch.nn.Module):
    """Shaped like a LLaVA model as far as huge_pages.decode_weight_slots looks."""

    def __init__(self, bias: bool):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.language_model = Projections(bias)
        self.lm_head = Linear(64, 10, bias=False)


@pytest.mark.parametrize("bias", [False, True])
def test_joint_product_over_adjacent_weights(kernels, monkeypatch, bias):
    monkeypatch.setenv("FASTLLAVA_HUGE_PAGES", "1")
    torch.manual_seed(0)
    holder = Holder(bias).to(torch.bfloat16)
    layer = holder.model.language_model
    names = ("q_proj", "k_proj", "v_proj")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert fused_ops.joint_product(layer, names, x) is None  # separate allocations: not adjacent
        separate = [getattr(layer, n)(x) for n in names]
        if not move_to_huge_pages(holder):
            pytest.skip("this machine offers no transparent huge pages (the layout under test)")
        joint = fused_ops.joint_product(layer, names, x)
        assert joint is not None and [t.shape[-1] for t in joint] == [48, 16, 16]
        for got, want in zip(joint, separate):
            assert torch.equal(got, want)  # the same kernel, row by row
        if bias:  # an edited bias is seen (the cached concatenation is rebuilt)
            layer.k_proj.bias.add_(1.0)
            again = fused_ops.joint_product(layer, names, x)
            assert torch.equal(again[1], layer.k_proj(x))
        many = torch.randn(200, 64, dtype=torch.bfloat16)  # past the few-row kernels: the layers run one by one
        assert fused_ops.joint_product(layer, names, many) is None
    with torch.enable_grad():
        layer.q_proj.weight.requires_grad_(True)
        assert fused_ops.joint_product(layer, names, x) is None  # autograd needs the separate products


def _quantized_holder(kind: str) -> Holder:
    """A Holder whose q/k/v are Int8Linear or Int4Linear layers (128-wide inputs: the VNNI loops' width, where the
    CPU has them), codes quantized from random weights, plus biases."""
    from fastllava.quantization import Int4Linear, Int8Linear, quantize_int4, quantize_int8

    holder = Holder(bias=True)
    layer = holder.model.language_model
    for name, rows in (("q_proj", 48), ("k_proj", 16), ("v_proj", 16)):
        weight = torch.randn(rows, 128) * 0.05
        if kind == "int8":
            module = Int8Linear(128, rows, bias=True)
            module.weight, module.scales = quantize_int8(weight, torch.bfloat16)
        else:
            module = Int4Linear(128, rows, True, 64)
            module.qweight, module.scales, module.zeros = quantize_int4(weight, 64, torch.bfloat16)
        module.bias = torch.randn(rows)
        module.finish_load()
        setattr(layer, name, module)
    holder.lm_head = Linear(128, 10, bias=False).to(torch.bfloat16)
    return holder


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_joint_product_over_adjacent_quantized_codes(kernels, monkeypatch, kind):
    """q/k/v as int8/int4 layers: once their codes lie back to back, one product (scales, zeros and biases
    concatenated) gives exactly what the layers give one by one; switching a layer's kernel rebuilds it."""
    monkeypatch.setenv("FASTLLAVA_HUGE_PAGES", "1")
    torch.manual_seed(1)
    holder = _quantized_holder(kind)
    layer = holder.model.language_model
    names = ("q_proj", "k_proj", "v_proj")
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert fused_ops.joint_product(layer, names, x) is None  # separate allocations
        if not move_to_huge_pages(holder):
            pytest.skip("this machine offers no transparent huge pages (the layout under test)")
        joint = fused_ops.joint_product(layer, names, x)
        assert joint is not None and [t.shape[-1] for t in joint] == [48, 16, 16]
        for got, name in zip(joint, names):
            assert torch.equal(got, getattr(layer, name)(x))
        if kind == "int4":  # the float-activation kernel: the cached joint product must follow the switch
            for name in names:
                getattr(layer, name).kernel = "gemv"
            for got, name in zip(fused_ops.joint_product(layer, names, x), names):
                assert torch.equal(got, getattr(layer, name)(x))
        layer.k_proj.kernel = "dequant"  # mixed kernels: no joint product
        assert fused_ops.joint_product(layer, names, x) is None


def test_argmax_last_matches_torch(kernels):
    """First index of the maximum, NaN counting as largest, ties and infinities, rows of any length and stride."""
    from fastllava.generation.sampling import greedy_tokens

    torch.manual_seed(5)
    for width in (1, 7, 8, 9, 64, 151936):
        scores = torch.randn(3, width)
        assert torch.equal(kernels.argmax_last(scores), scores.argmax(-1))
    tied = torch.zeros(2, 37)
    tied[0, [5, 20]] = 3.0  # two maxima: the first wins
    tied[1] = float("-inf")  # all -inf: index 0
    special = torch.randn(4, 50)
    special[0, 30], special[0, 10] = float("nan"), float("inf")  # NaN beats +inf
    special[1, 45] = float("nan")  # a NaN in the scalar tail
    special[2, [3, 4]] = float("inf")
    special[3, 49] = 100.0  # the maximum in the tail
    across = torch.randn(5, 1000)  # ties between lanes, chains and the tail: the first index wins
    across[0, [700, 37, 38, 5]] = 9.0
    across[1, [999, 996]] = 9.0
    across[2, [64, 33]] = 9.0
    across[3] = float("-inf")
    across[3, [500, 300]] = float("inf")
    across[4, [3, 900]] = float("nan")
    few_values = torch.randint(0, 4, (8, 517)).float()  # many ties everywhere
    for scores in (tied, special, across, few_values, torch.randn(5, 40)[:, ::2]):
        assert torch.equal(kernels.argmax_last(scores), scores.argmax(-1))
        assert torch.equal(greedy_tokens(scores), scores.argmax(-1))
    assert torch.equal(greedy_tokens(special.double()), special.double().argmax(-1))  # other dtypes: torch's
    with pytest.raises(RuntimeError, match="2-D float32"):
        kernels.argmax_last(torch.randn(5))
    with pytest.raises(RuntimeError, match="empty rows"):
        kernels.argmax_last(torch.randn(2, 0))


def test_cache_write(kernels):
    keys, values = torch.zeros(2, 3, 10, 8, dtype=torch.bfloat16), torch.zeros(2, 3, 10, 8, dtype=torch.bfloat16)
    k = torch.randn(2, 3, 2, 8, dtype=torch.bfloat16)
    v = torch.randn(2, 3, 2, 8, dtype=torch.bfloat16)
    want_k, want_v = keys.clone(), values.clone()
    want_k.index_copy_(2, torch.tensor([4, 5]), k)
    want_v.index_copy_(2, torch.tensor([4, 5]), v)
    kernels.cache_write_(keys, values, k, v, 4)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.cache_write_(keys, values, k, v, 9)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.cache_write_(keys, values, k[:, :2], v[:, :2], 0)


def test_cache_write_strided_views_and_dtypes(kernels):
    """Row copies into views of a larger storage (the engine's per-sequence caches) from transposed projections,
    and ATen's converting copy where the new rows have another dtype: both must equal an index_copy_."""
    storage = torch.zeros(2, 2, 3, 12, 8, dtype=torch.bfloat16)  # (B, k/v, heads, capacity, dim)
    keys, values = storage[:, 0], storage[:, 1]
    projections = torch.randn(2, 3, 2 * 3 * 8, dtype=torch.bfloat16)  # (B, T, k|v heads * dim), one joint product
    k = projections[..., :24].view(2, 3, 3, 8).transpose(1, 2)  # (B, heads, T, dim), strided
    v = projections[..., 24:].view(2, 3, 3, 8).transpose(1, 2)
    want_k, want_v = keys.clone(), values.clone()
    want_k.index_copy_(2, torch.tensor([7, 8, 9]), k.contiguous())
    want_v.index_copy_(2, torch.tensor([7, 8, 9]), v.contiguous())
    kernels.cache_write_(keys, values, k, v, 7)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert storage[:, :, :, :7].abs().sum() == 0 and storage[:, :, :, 10:].abs().sum() == 0  # nothing else touched
    float_keys, float_values = torch.zeros(2, 3, 12, 8), torch.zeros(2, 3, 12, 8)
    kernels.cache_write_(float_keys, float_values, k, v, 1)
    assert torch.equal(float_keys[:, :, 1:4], k.float()) and torch.equal(float_values[:, :, 1:4], v.float())
