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
