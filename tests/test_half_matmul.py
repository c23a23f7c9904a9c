"""bf16 products in float32 on CPUs without bf16 arithmetic (fastllava.models.half_matmul)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllava.models import half_matmul
from fastllava.models.half_matmul import KERNEL_MAX_ROWS, MIN_ROWS_IN_FLOAT32, Linear, PatchConv2d, linear


@pytest.fixture
def mode(monkeypatch):
    def set_mode(value: str) -> None:
        monkeypatch.setenv("FASTLLAVA_HALF_MATMUL", value)
    return set_mode


def test_many_rows_are_computed_in_float32_and_rounded_once(mode):
    mode("float32")
    torch.manual_seed(0)
    rows = max(MIN_ROWS_IN_FLOAT32, KERNEL_MAX_ROWS)  # past the C++ kernels' range too
    x = torch.randn(2, rows // 2, 64, dtype=torch.bfloat16)
    layer = Linear(64, 48).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows // 2, 48)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)
    native = F.linear(x, layer.weight, layer.bias)  # the same product up to summation order: a bf16 ulp at most
    assert torch.allclose(out.float(), native.float(), rtol=2 ** -7, atol=1e-2)


def test_few_rows_use_the_gemv_kernel_where_built_and_float32_inputs_stay_native(mode, cpu_kernels, monkeypatch):
    mode("float32")
    torch.manual_seed(0)
    weight = torch.randn(48, 64, dtype=torch.bfloat16)
    few = torch.randn((KERNEL_MAX_ROWS if cpu_kernels == "fastllava-gemv" else MIN_ROWS_IN_FLOAT32) - 1, 64,
                      dtype=torch.bfloat16)
    calls = []
    if cpu_kernels == "fastllava-gemv":
        kernel = torch.ops.fastllava.gemv
        monkeypatch.setattr(half_matmul, "torch", _Spy(torch, kernel, calls))
    out = linear(few, weight)
    assert calls == ([few.shape] if cpu_kernels == "fastllava-gemv" else [])
    native = F.linear(few, weight)  # float32 accumulation too: at most one bf16 ulp apart (summation order)
    assert torch.allclose(out.float(), native.float(), rtol=2 ** -7, atol=1e-2)
    full = torch.randn(64, 64)
    assert torch.equal(linear(full, weight.float()), F.linear(full, weight.float()))
    with torch.enable_grad():  # the kernels have no backward: products that need one stay on torch's ops
        trained = weight.clone().requires_grad_()
        linear(few, trained).sum().backward()
    assert trained.grad is not None and len(calls) == (1 if cpu_kernels == "fastllava-gemv" else 0)


class _Spy:
    """``torch`` as half_matmul sees it, with ``torch.ops.fastllava.gemv`` recording the shapes it is called with."""

    def __init__(self, module, kernel, calls):
        self._module, self._kernel, self._calls = module, kernel, calls
        self.ops = type("Ops", (), {"fastllava": type("Lib", (), {"gemv": staticmethod(self._gemv)})})

    def _gemv(self, x, weight, bias=None):
        self._calls.append(x.shape)
        return self._kernel(x, weight, bias)

    def __getattr__(self, name):
        return getattr(self._module, name)


def test_native_mode_and_bad_setting(mode):
    mode("native")
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    weight = torch.randn(16, 32, dtype=torch.bfloat16)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert torch.equal(linear(x[:2], weight), F.linear(x[:2], weight))  # no GEMV kernel either
    mode("fast")
    with pytest.raises(ValueError, match="FASTLLAVA_HALF_MATMUL='fast'"):
        linear(x, weight)


def test_auto_follows_the_cpu_flags(mode, monkeypatch):
    mode("auto")
    monkeypatch.setattr(half_matmul, "cpu_has_half_arithmetic", lambda: False)
    assert half_matmul.half_products_in_float32()
    monkeypatch.setattr(half_matmul, "cpu_has_half_arithmetic", lambda: True)
    assert not half_matmul.half_products_in_float32()


def test_patch_convolution_in_float32(mode):
    mode("float32")
    torch.manual_seed(0)
    conv = PatchConv2d(3, 32, kernel_size=8, stride=8, bias=False).to(torch.bfloat16)
    image = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    out = conv(image)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.conv2d(image.float(), conv.weight.float(), stride=8).to(torch.bfloat16))


def test_bf16_model_gives_the_same_greedy_tokens_either_way(checkpoint_factory, mode, cpu_kernels):
    """A whole bf16 LLaVA (vision tower, projector, decoder): float32 products and KV cache change no greedy token."""
    from fastllava.models.llava import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint_factory("clip_llama"), torch_dtype=torch.bfloat16)
    config = model.config
    side = config.vision_config.image_size
    image_tokens = (side // config.vision_config.patch_size) ** 2
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (1, image_tokens + 20))
    ids[0, 2:2 + image_tokens] = config.image_token_id
    pixels = torch.randn(1, 3, side, side)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=8,
                  do_sample=False, eos_token_id=None)
    mode("native")
    native = model.generate(**kwargs)
    mode("float32")
    assert torch.equal(model.generate(**kwargs), native)


def test_kv_cache_of_a_bf16_model_is_float32_when_products_are_without_the_decode_kernel(checkpoint_factory, mode,
                                                                                         cpu_kernels):
    from fastllava.generation.session import DecodeSession
    from fastllava.models.half_matmul import resolve_kv_dtype
    from fastllava.models.llava import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint_factory("clip_llama"), torch_dtype=torch.bfloat16)
    mode("float32")
    # the C++ decode attention reads a bf16 cache faster than SDPA reads a float32 one (resolve_kv_dtype)
    expected = torch.bfloat16 if cpu_kernels == "fastllava-gemv" else torch.float32
    assert DecodeSession(model, 1, 8).cache.keys[0].dtype == expected
    assert resolve_kv_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_dtype("bfloat16", torch.bfloat16) == torch.bfloat16
    mode("native")
    assert DecodeSession(model, 1, 8).cache.keys[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_dtype("int8", torch.bfloat16)
