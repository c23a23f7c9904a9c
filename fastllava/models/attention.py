"""Attention kernels and masks shared by the vision towers and the text decoder.

``attend`` computes softmax(q k^T / sqrt(d)) v with the implementation the model was loaded with: "sdpa"
(torch's fused kernels, the default), "eager" (plain matmuls; the only one that can return the weights) or
"flash_attention_2" (the flash-attn package on CUDA). Masks are boolean, True = may attend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllava.kernels.build import gemv_kernels_available

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_attn_implementation(name: str | None) -> str:
    name = name or "sdpa"
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
    if name == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ImportError(
                "attn_implementation='flash_attention_2' needs the flash-attn package on a CUDA GPU "
                "(pip install flash-attn); use 'sdpa' (the default) otherwise"
            ) from None
    return name


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv*groups, S, D) for grouped-query attention."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    implementation: str = "sdpa",
    causal_no_mask: bool = False,
    return_weights: bool = False,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, T, D), k/v (B, Hkv, S, D), mask (B|1, 1, T, S) bool -> out (B, H, T, D), weights or None."""
    groups = q.shape[1] // k.shape[1]
    if return_weights or implementation == "eager":
        k, v = _expand_kv(k, groups), _expand_kv(v, groups)
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        elif causal_no_mask:
            causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if mask is not None:  # rows that may attend to nothing give zeros, like SDPA, not a uniform average
            weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        if dropout:
            weights = F.dropout(weights, p=dropout)
        return torch.matmul(weights, v), (weights if return_weights else None)
    if implementation == "flash_attention_2" and mask is None:
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout,
                              causal=causal_no_mask)
        return out.transpose(1, 2), None
    if q.shape[2] == 1 and not dropout and q.device.type == "cpu" and (mask is not None or not causal_no_mask):
        return _single_query(q, k, v, mask), None
    if mask is None and not dropout and prefill_kernel_applies(q, k, v, causal_no_mask):
        return torch.ops.fastllava.prefill_attention(q, k, v, causal_no_mask, q.shape[-1] ** -0.5), None
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                         is_causal=causal_no_mask and mask is None)
    return out, None


def decode_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether fastllava's C++ single-query attention (``torch.ops.fastllava.decode_attention``, see
    fastllava/kernels/attention.cpp) can take this call: CPU tensors of fp32/bf16/fp16 with contiguous rows, no
    autograd (the kernel has no backward), and the kernels built (``FASTLLAVA_KERNELS=0`` keeps PyTorch's ops)."""
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        return False
    if q.dtype not in _KERNEL_DTYPES or k.dtype not in _KERNEL_DTYPES or v.dtype != k.dtype:
        return False
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return gemv_kernels_available()


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prefill_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether fastllava's AVX512-BF16 attention (``torch.ops.fastllava.prefill_attention``, see
    fastllava/kernels/prefill_attention.cpp) can take an unmasked or plainly causal call: bf16 CPU tensors with
    contiguous rows, no autograd, a CPU with AVX512-BF16 and the kernels built and switched on. Causal only when
    queries and keys are the same positions (SDPA's is_causal aligns them top-left; so does the kernel, but a
    shorter query block after a cache is a caller's mask, never this path). Measured (one thread, Zen 4): SigLIP
    [16 heads, 729, 72] 18.4 ms against SDPA's 35.4; causal Qwen2 [14/2 heads, 757, 64] 8.1 against 22.7."""
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        return False
    if q.dtype != torch.bfloat16 or k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16 or q.shape[2] < 2:
        return False
    if causal and q.shape[2] != k.shape[2]:
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return gemv_kernels_available() and torch.ops.fastllava.avx512_active()


def _single_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per sequence (a decode step) on CPU. With the C++ kernels: ``decode_attention``, which reads each
    K/V row once for all the query heads sharing it, in the cache's own dtype (measured in
    benchmarks/bench_engine.py --only decode-attention; the figures are in half_matmul.resolve_kv_dtype).
    Otherwise PyTorch: the query heads that share a K/V head are multiplied with it as one (groups, D) block, so
    K/V are never repeated per head. Measured (one thread, 14 query / 2 K/V heads, 760 cached fp32 positions, with
    a mask): 0.2 ms a layer against 0.9 ms for SDPA over repeated K/V."""
    batch, heads, _, dim = q.shape
    simple_mask = mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1)
                                   and mask.shape[0] in (1, batch) and mask.shape[3] == k.shape[2])
    if simple_mask and k.shape[0] == batch and decode_kernel_applies(q, k, v):
        valid = None
        if mask is not None:  # (B|1, 1, 1, S) -> (B, S), a view
            valid = mask.reshape(mask.shape[0], mask.shape[-1]).expand(batch, k.shape[2])
        out = torch.ops.fastllava.decode_attention(q.reshape(batch, heads, dim), k, v, valid, dim ** -0.5)
        return out.reshape(batch, heads, 1, dim)
    return _single_query_torch(q, k, v, mask)


def _single_query_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h reads K/V head h // groups
    scores = torch.matmul(grouped, k.transpose(-1, -2)).mul_(dim ** -0.5)  # (B, Hkv, groups, S)
    if mask is not None:  # (B|1, 1, 1, S)
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    if mask is not None:  # a query that may see nothing gets zeros, as SDPA gives (softmax of all -inf is nan)
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(weights, v).reshape(batch, heads, 1, dim)


def decoder_mask(
    query_slots: torch.Tensor,
    key_valid: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: key slot j is visible to query slot i when j <= i, j is not padding, and
    i - j < window. A query that may see nothing (a left-padding position) gets a zero output, as torch's
    SDPA gives and transformers therefore returns; it is never used for real tokens.

    query_slots: (T,) cache slot of each query; key_valid: (B, S) bool, False for padding/empty slots.
    """
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    distance = query_slots[:, None] - key_slots[None, :]  # (T, S)
    allowed = distance >= 0
    if sliding_window is not None:
        allowed = allowed & (distance < sliding_window)
    mask = allowed[None] & key_valid[:, None, :]  # (B, T, S)
    return mask[:, None]
