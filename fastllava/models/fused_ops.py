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

from dataclasses import dataclass

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
    their adjacent weights (bf16/fp16, or int8/int4 codes); None when that does not apply (the caller then runs
    the layers one by one). Not inside torch.compile: binding the product builds and caches Python objects keyed
    on data pointers, which dynamo cannot trace; a compiled step runs the layers one by one (the same rows of the
    same kernels, so the same outputs)."""
    if torch.compiler.is_compiling():
        return None
    linears = [getattr(owner, name) for name in names]
    rows = x.numel() // max(1, x.shape[-1])
    if type(linears[0]) is Linear and x.dtype not in HALF_DTYPES:
        return None
    stored = _stored(linears[0])
    if stored is None or x.dtype not in _DTYPES or not few_row_kernel_applies(x, stored, rows):
        return None
    product = joint_operator(owner, linears)
    return None if product is None else product(x)


@dataclass(frozen=True)
class StoredProduct:
    """A few-row C++ product (kernels/gemv.cpp) over stored weights, bound once: the op's name, its tensors, and the
    output widths its result is split into (one width: returned whole). Callable from Python; the lean decode
    step hands its fields to the C++ decoder (kernels/decoder_layers.cpp)."""

    op: str  # gemv, gemv_int8, gemv_int8_pairs, gemv_int4 or gemv_int4_q8
    weight: torch.Tensor  # (N, K) half weights, int8 weights or int4 codes
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group: int = 0  # int4 group size
    bias: torch.Tensor | None = None
    sizes: tuple[int, ...] = ()

    def __call__(self, x: torch.Tensor):
        ops = torch.ops.fastllava
        if self.op == "gemv":
            y = ops.gemv(x, self.weight, self.bias)
        elif self.op in ("gemv_int8", "gemv_int8_pairs"):
            y = getattr(ops, self.op)(x, self.weight, self.scales, self.bias)
        else:
            y = getattr(ops, self.op)(x, self.weight, self.scales, self.zeros, self.group, self.bias)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


def joint_operator(owner: nn.Module, linears: list[nn.Module]) -> StoredProduct | None:
    """x -> the layers' outputs as one C++ few-row product over weights stored back to back (which
    ``models/huge_pages.py`` arranges): fastllava Linear layers of one half dtype (``gemv``), Int8Linear layers on
    the ``gemv`` kernel (``gemv_int8``, their per-row scales concatenated) or Int4Linear layers on one decode kernel
    and group size (``gemv_int4_q8``/``gemv_int4``, scales and zeros concatenated). Measured (int8
    llava-interleave-qwen-0.5b, two threads): 169 product calls a token became 97 and ~5 us of fixed cost went with
    each. None when the layers are of mixed kinds or not adjacent. Cached on ``owner``, rebuilt when a weight moves,
    a layer's kernel is switched or a bias changes (its version counter)."""
    first = linears[0]
    op = _op_name(first)
    if op is None or any(_op_name(layer) != op or _group(layer) != _group(first) for layer in linears):
        return None
    extra_names = {"gemv": (), "gemv_int8": ("scales",), "gemv_int8_pairs": ("scales",)}.get(op, ("scales", "zeros"))
    stored = [_stored(layer) for layer in linears]
    extras = [[getattr(layer, name) for layer in linears] for name in extra_names]
    biases = [layer.bias for layer in linears]
    key = tuple((getattr(layer, "kernel", None), getattr(layer, "group_size", None)) for layer in linears) + tuple(
        (t.data_ptr(), t.shape, t.dtype) for t in stored) + tuple(
        (b.data_ptr(), b._version) if b is not None else None for b in biases) + tuple(
        t.data_ptr() for group in extras for t in group)
    cached = owner.__dict__.get("_joint_operator_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    product = None
    view = _adjacent_view(stored)
    if view is not None and (all(b is None for b in biases) or all(b is not None for b in biases)):
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        joined = [torch.cat([t.detach() for t in group]) for group in extras]
        scales, zeros = (joined + [None, None])[:2]
        product = StoredProduct(op, view, scales, zeros, _group(first), bias,
                                tuple(layer.out_features for layer in linears))
    owner.__dict__["_joint_operator_cache"] = (key, product)
    return product


def stored_product(layer: nn.Module) -> StoredProduct | None:
    """One layer's few-row C++ product: a fastllava Linear (half weights), an Int8Linear on the ``gemv`` kernel or
    an Int4Linear on a decode kernel; None for anything else."""
    op = _op_name(layer)
    if op is None:
        return None
    return StoredProduct(op, _stored(layer), getattr(layer, "scales", None), getattr(layer, "zeros", None),
                         _group(layer), layer.bias, (layer.out_features,))


def _op_name(layer: nn.Module) -> str | None:
    """The C++ product that computes ``layer`` for a few rows, or None."""
    from fastllava.quantization import INT4_DECODE_KERNELS, Int4Linear, Int8Linear

    kernel = getattr(layer, "kernel", None)
    if type(layer) is Linear:
        return "gemv"
    if type(layer) is Int8Linear and kernel in ("gemv", "gemv_pairs"):
        return "gemv_int8" if kernel == "gemv" else "gemv_int8_pairs"
    if type(layer) is Int4Linear and kernel in INT4_DECODE_KERNELS:
        return "gemv_int4_q8" if kernel == "gemv_q8" else "gemv_int4"
    return None


def _group(layer: nn.Module) -> int:
    return getattr(layer, "group_size", 0) if hasattr(layer, "qweight") else 0


def _stored(layer: nn.Module) -> torch.Tensor | None:
    """The tensor a layer's product streams: its weight, or its int4 codes (None in torch's int4 layout)."""
    return getattr(layer, "qweight", None) if hasattr(layer, "qweight") else getattr(layer, "weight", None)


def _adjacent_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One (sum of rows, columns) view over contiguous 2-D tensors of one dtype and width stored back to back in
    one storage, or None."""
    first = tensors[0]
    adjacent = all(
        t.dtype == first.dtype and t.is_contiguous() and t.dim() == 2 and t.shape[1] == first.shape[1]
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for t in tensors
    ) and all(a.data_ptr() + a.nbytes == b.data_ptr() for a, b in zip(tensors, tensors[1:]))
    if not adjacent:
        return None
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))
