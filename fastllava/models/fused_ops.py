"""Inference shortcuts of the decoder layer: one C++ op where PyTorch runs several, and one product where
several linear layers read the same input.

Why: on a CPU a decode step is bound by streaming the weights, and everything around the products is overhead
paid per op (measured, llava-interleave-qwen-0.5b text model, one thread: 22-30 ms a step with every product
stubbed out, against ~67 ms of weights). ``fastllava/kernels/pointwise.cpp`` has RMSNorm, RoPE and the gated
SiLU as single ops with PyTorch's roundings (bf16 results bit-identical; fp32 may differ in the last bit of a
reduction); ``joint_product`` runs q/k/v (or gate/up) as one product when their weights lie back to back in
memory, which ``models/huge_pages.py`` arranges, so the joint weight is a view and costs no memory.

All of it only without autograd (the ops have no backward), on CPU, and with the kernels built; otherwise the
callers keep their PyTorch expressions (training, GPUs, ``FASTLLAVA_KERNELS=0``).
"""

from __future__ import annotations

import torch
from torch import nn

from fastllava.kernels.build import load as kernels_loaded
from fastllava.models.half_matmul import HALF_DTYPES, Linear, few_row_kernel_applies

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pointwise_ops_apply(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the C++ pointwise ops may replace PyTorch's for this input (and these parameters)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return kernels_loaded()


def joint_product(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The outputs of ``owner``'s linear layers ``names`` on the same ``x``, computed as one few-row product over
    their adjacent weights; None when that does not apply (the caller then runs the layers one by one)."""
    linears = [getattr(owner, name) for name in names]
    if any(type(layer) is not Linear for layer in linears) or x.dtype not in HALF_DTYPES:
        return None
    rows = x.numel() // max(1, x.shape[-1])
    if not few_row_kernel_applies(x, linears[0].weight, rows):
        return None
    joint = _joint_weight(owner, linears)
    if joint is None:
        return None
    weight, bias = joint
    out = torch.ops.fastllava.gemv(x, weight, bias)
    return out.split([layer.out_features for layer in linears], dim=-1)


def _joint_weight(owner: nn.Module, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A (sum of outputs, inputs) view over weights stored back to back, and the concatenated biases; cached on
    ``owner`` and rebuilt whenever a weight moves or a bias changes (its version counter)."""
    weights = [layer.weight for layer in linears]
    biases = [layer.bias for layer in linears]
    key = tuple((w.data_ptr(), w.shape, w.dtype) for w in weights) + tuple(
        (b.data_ptr(), b._version) if b is not None else None for b in biases)
    cached = owner.__dict__.get("_joint_weight_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    joint = None
    first = weights[0]
    adjacent = all(
        w.dtype == first.dtype and w.is_contiguous() and w.shape[1] == first.shape[1]
        and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for w in weights
    ) and all(a.data_ptr() + a.nbytes == b.data_ptr() for a, b in zip(weights, weights[1:]))
    if adjacent and (all(b is None for b in biases) or all(b is not None for b in biases)):
        rows = sum(w.shape[0] for w in weights)
        weight = first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        joint = (weight, bias)
    owner.__dict__["_joint_weight_cache"] = (key, joint)
    return joint
