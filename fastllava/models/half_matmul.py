"""bf16/fp16 matrix products on CPUs that have no half-precision arithmetic.

On x86 CPUs without AVX512-BF16 or AMX (e.g. AVX2-only machines) PyTorch's bf16 GEMM converts as it goes and runs
at a fraction of the float32 rate: measured on an AVX2 EPYC with torch 2.13, one thread, a 744x1024 @ 1024x2816
product took 460 ms in bf16 and 92 ms when both operands were first converted to float32 (67 ms of it the
float32 GEMM); a 14x14 patch-embedding convolution on a 384 px image took 405 ms in bf16 and 20 ms in float32.
So products with many rows (prefill, vision towers, training) are computed in float32 from the bf16 operands and
rounded back to bf16 once: the same inputs, float32 accumulation like the native kernel, only the summation
order differs (measured: 0.01% of outputs differ, by one bf16 ulp). Few-row products (decode steps of up to
a few dozen sequences) cannot afford converting the whole weight per step: below ``KERNEL_MAX_ROWS`` rows they go
through fastllava's C++ kernels (``fastllava/kernels/gemv.cpp``: one weight stream at near read bandwidth for
1-5 rows, a register-tiled product converting bf16 on the fly from 6; float32 accumulation, any CPU with AVX2;
measured one thread, 2816x1024 weight: 0.2 vs 1.2 ms at 1 row, 1.5-1.8 vs 2.8-3.2 ms at 16, 5.6-6.3 vs
6.7-7.3 ms at 64, even at 128), else torch's native kernel below ``MIN_ROWS_IN_FLOAT32`` (its crossover).

Attention is the same story: torch's SDPA of one decode query over 800 cached bf16 tokens measured 7x slower than
over float32 ones, so without the C++ kernels (whose decode attention reads bf16 at full speed) caches of
half-precision models on such CPUs store float32 (``resolve_kv_dtype``).

``FASTLLAVA_HALF_MATMUL`` = ``auto`` (default: float32 when the CPU lacks bf16 arithmetic), ``float32`` or
``native`` (torch's own kernels for every product, the GEMV kernels included) overrides the choice;
``FASTLLAVA_KERNELS=0`` turns off only the C++ kernels.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from fastllava.kernels.build import gemv_kernels_available

HALF_DTYPES = (torch.bfloat16, torch.float16)
MIN_ROWS_IN_FLOAT32 = 16  # below this, torch's own bf16 GEMV beats converting the weight (no C++ kernels)
KERNEL_MAX_ROWS = 64  # below this, fastllava's C++ kernels beat converting the weight (see the docstring)
# With bf16 arithmetic (AVX512-BF16) PyTorch's native product wins from 6 rows: measured, one thread, Zen 4,
# 2816x1024 bf16 weights: C++ kernel 21-23 GB/s at 1-3 rows (torch 9.5-10), 7.3 vs 8.2 at 6, 3.7 vs 6.1 at 16.
NATIVE_HALF_KERNEL_MAX_ROWS = 6


@functools.lru_cache(maxsize=None)
def cpu_has_half_arithmetic() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX tiles), as PyTorch's own CPU checks say."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _choice() -> str:
    choice = os.environ.get("FASTLLAVA_HALF_MATMUL", "auto").strip().lower()
    if choice not in ("auto", "float32", "native"):
        raise ValueError(f"FASTLLAVA_HALF_MATMUL={choice!r}: expected auto, float32 or native")
    return choice


def half_products_in_float32() -> bool:
    """Whether CPU bf16/fp16 products with many rows are computed in float32 (see the module docstring)."""
    choice = _choice()
    return choice == "float32" or (choice == "auto" and not cpu_has_half_arithmetic())


def _upcast(x: torch.Tensor, rows: int) -> bool:
    return x.dtype in HALF_DTYPES and x.device.type == "cpu" and rows >= MIN_ROWS_IN_FLOAT32 \
        and half_products_in_float32()


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def kernel_max_rows(weight_dtype: torch.dtype) -> int:
    """Products with fewer rows than this go to the C++ kernels (given CPU tensors, no autograd and the kernels
    built); 0 under ``FASTLLAVA_HALF_MATMUL=native``, which keeps PyTorch's ops for every product."""
    if _choice() == "native":
        return 0
    native_half = weight_dtype in HALF_DTYPES and not half_products_in_float32()
    return NATIVE_HALF_KERNEL_MAX_ROWS if native_half else KERNEL_MAX_ROWS


def few_row_kernel_applies(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether fastllava's C++ GEMV takes this product: few rows, CPU, no autograd, and the kernels built."""
    if rows >= kernel_max_rows(weight.dtype):
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # the kernels have no backward
    return gemv_kernels_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; many-row half-precision products in float32 on CPUs without half arithmetic, few-row ones
    through the C++ GEMV (see the module docstring)."""
    if not x.dim() or x.dtype not in HALF_DTYPES:
        return F.linear(x, weight, bias)
    rows = x.numel() // max(1, x.shape[-1])
    if weight.dtype in HALF_DTYPES and weight.is_contiguous() and few_row_kernel_applies(x, weight, rows):
        return torch.ops.fastllava.gemv(x, weight, bias)
    if _upcast(x, rows):
        return F.linear(x.float(), weight.float(), _float(bias)).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose product goes through ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` for patch embeddings: a half-precision image is convolved in float32 (20x faster on AVX2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _upcast(x, MIN_ROWS_IN_FLOAT32):  # a whole image: always worth it
            return self._conv_forward(x.float(), self.weight.float(), _float(self.bias)).to(x.dtype)
        return super().forward(x)


def resolve_kv_dtype(kv_cache_dtype: str | torch.dtype, model_dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> torch.dtype:
    """The KV cache's dtype. "auto": the model's (half the bytes of float32; transformers keeps it too), except
    float32 for a bf16/fp16 model on a CPU computing half products in float32 when fastllava's C++ decode
    attention (fastllava/kernels/attention.cpp) is not available (``FASTLLAVA_KERNELS=0``, no compiler or no
    AVX2): torch's SDPA of one decode query over 800 cached bf16 tokens is 7x slower than over float32.

    Measured (AVX2 EPYC, one thread, 2 cores shared with other work; benchmarks/bench_engine.py --only
    decode-attention), one decode query, one layer, 16/16 heads x 64, 800 cached tokens, caches read cold (a
    rotation through 256 MB, as a real step reads them) / warm: the kernel over bf16 0.25 / 0.13 ms, over float32
    0.76 / 0.15 ms; SDPA over float32 1.01 / 0.22 ms, over bf16 2.28 / 1.71 ms (256 tokens: kernel bf16 0.12 /
    0.06, SDPA float32 0.34 / 0.08). 14/2 heads, 800 tokens: kernel bf16 0.18 / 0.11, float32 0.20 / 0.09, SDPA
    float32 0.38 / 0.18. Prefill chunks still run SDPA over the cache: a 750-token chunk over bf16 took 29.8 ms
    against 27.2 ms over float32 (78.3 vs 75.4 over 1500 positions), +4-9 % of the attention and ~1 % of the
    chunk's prefill (~250 ms a layer here); casting the view to float32 first did not recover it (31.0 / 78.5 ms), so it is not done.
    Whole engine decode step, 16 sequences at 760-820 cached tokens (llava-interleave-qwen-0.5b, bf16 weights;
    medians of 15 steps per mode, interleaved in one process): 0.632 s with SDPA over float32 caches (before),
    0.626 s with the kernel over float32, 0.446 s with the kernel over bf16 (-29 %; profiled attention 260, 218
    and 112 ms a step; KV memory 2.4 -> 1.2 GiB). So with the kernel the model's dtype is both the smaller and the
    faster cache."""
    if isinstance(kv_cache_dtype, torch.dtype):
        return kv_cache_dtype
    if kv_cache_dtype == "auto":
        if model_dtype in HALF_DTYPES and torch.device(device).type == "cpu" and half_products_in_float32() \
                and not gemv_kernels_available():
            return torch.float32
        return model_dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if kv_cache_dtype not in names:
        raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(names)}, got {kv_cache_dtype!r}")
    return names[kv_cache_dtype]
