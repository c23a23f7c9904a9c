"""The eager decode step without the module tree: the decoder's layers bound once to their tensors and C++ ops.

Why: a decode step of a 24-layer model calls ~500 small functions, and on a CPU the Python around them costs as
much as the work of small models. Measured (one thread, Zen 4, llava-interleave-qwen-0.5b architecture with a
64-wide text model, so the products cost almost nothing): 16.0 ms a step through the nn.Module path
(``decode_step``: module calls, attribute lookups, per-call kernel checks and joint-weight lookups) against the
~35 ms it takes to stream the real model's 0.93 GB of weights. ``LeanStep`` resolves every choice once per
session (which product kernel, which joint weights, which norm and attention ops) and then runs the same ops in
the same order on plain tensors, so its logits equal ``decode_step``'s bit for bit (tests/test_lean_step.py).

It applies to bf16/fp16 text models on CPU with fastllava's C++ kernels built, whose layers are fastllava's own
(Linear, Int8Linear, Int4Linear products; RMSNorm; SiLU MLP; SDPA attention with a cache in the model's dtype),
for batches small enough for the few-row kernels; ``LeanStep.build`` returns None otherwise and the caller keeps
``decode_step``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastllava.generation.kv_cache import KVCache
from fastllava.kernels.build import load as kernels_loaded
from fastllava.models import llama
from fastllava.models.fused_ops import joint_operator
from fastllava.models.half_matmul import HALF_DTYPES, Linear, kernel_max_rows
from fastllava.models.rope import rotary_cos_sin
from fastllava.quantization import INT4_DECODE_KERNELS, Int4Linear, Int8Linear

Product = Callable[[torch.Tensor], torch.Tensor]


class _Unsupported(Exception):
    """A layer the lean step does not reproduce exactly; the caller keeps the module path."""


def _product(layer: torch.nn.Module, dtype: torch.dtype) -> tuple[Product, int]:
    """x (..., K) -> (..., N) with the op the module would pick for a few rows, and the rows it takes."""
    ops = torch.ops.fastllava
    bias = layer.bias
    if type(layer) is Linear:
        weight = layer.weight
        if weight.dtype not in HALF_DTYPES or not weight.is_contiguous() or weight.dtype != dtype:
            raise _Unsupported(f"a {weight.dtype} linear weight")
        return (lambda x: ops.gemv(x, weight, bias)), kernel_max_rows(weight.dtype)
    if type(layer) is Int8Linear and getattr(layer, "kernel", None) == "gemv":
        weight, scales = layer.weight, layer.scales
        return (lambda x: ops.gemv_int8(x, weight, scales, bias)), kernel_max_rows(weight.dtype)
    if type(layer) is Int4Linear and getattr(layer, "kernel", None) in INT4_DECODE_KERNELS:
        op = ops.gemv_int4_q8 if layer.kernel == "gemv_q8" else ops.gemv_int4
        qweight, scales, zeros, group = layer.qweight, layer.scales, layer.zeros, layer.group_size
        return (lambda x: op(x, qweight, scales, zeros, group, bias)), kernel_max_rows(qweight.dtype)
    raise _Unsupported(f"a {type(layer).__name__} product")


def _products(owner: torch.nn.Module, names: tuple[str, ...], dtype: torch.dtype) -> tuple[Callable, int]:
    """The outputs of ``owner``'s layers ``names`` on one input: one product over adjacent weights or codes when
    they lie back to back (``fused_ops.joint_operator``, as ``joint_product`` computes them), else one each."""
    linears = [getattr(owner, name) for name in names]
    bound = [_product(layer, dtype) for layer in linears]  # also rejects what the lean step cannot run
    max_rows = min(rows for _, rows in bound)
    joint = joint_operator(owner, linears)
    if joint is not None:
        return joint, max_rows
    products = [product for product, _ in bound]
    return (lambda x: tuple(product(x) for product in products)), max_rows


class _Layer:
    """One decoder layer's tensors and bound products."""

    def __init__(self, layer: llama.DecoderLayer, dtype: torch.dtype):
        attention, mlp = layer.self_attn, layer.mlp
        if attention.attn_implementation != "sdpa" or mlp.act is not F.silu:
            raise _Unsupported("eager attention or a non-SiLU MLP")
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not llama.RMSNorm or norm.weight.dtype != dtype:
                raise _Unsupported("a norm in another dtype")
        self.index = attention.layer_index
        self.heads, self.kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        self.scale = self.head_dim ** -0.5
        self.input_norm, self.input_eps = layer.input_layernorm.weight, layer.input_layernorm.eps
        self.post_norm, self.post_eps = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps
        self.qkv, qkv_rows = _products(attention, ("q_proj", "k_proj", "v_proj"), dtype)
        self.o_proj, o_rows = _product(attention.o_proj, dtype)
        self.gate_up, mlp_rows = _products(mlp, ("gate_proj", "up_proj"), dtype)
        self.down, down_rows = _product(mlp.down_proj, dtype)
        self.max_rows = min(qkv_rows, o_rows, mlp_rows, down_rows)


class LeanStep:
    """``decode_step`` for one model, eager, with every per-call decision taken once (see the module docstring)."""

    def __init__(self, model, layers: list[_Layer], lm_head: Product, max_rows: int, dtype: torch.dtype):
        self.model, self.layers, self.lm_head, self.max_rows, self.dtype = model, layers, lm_head, max_rows, dtype
        text = model.model.language_model
        self.text, self.config = text, text.config
        self.embed = text.embed_tokens  # a module call: plain or quantized table
        self.final_norm, self.final_eps = text.norm.weight, text.norm.eps

    @classmethod
    def build(cls, model) -> "LeanStep | None":
        """A lean step for ``model``, or None where it would not reproduce the module path exactly."""
        text = model.model.language_model
        dtype = text.norm.weight.dtype  # the activations' (an int8 model's embedding table may be int8)
        if dtype not in HALF_DTYPES or text.norm.weight.device.type != "cpu" or not kernels_loaded():
            return None
        if kernel_max_rows(dtype) == 0:  # FASTLLAVA_HALF_MATMUL=native: PyTorch's products everywhere
            return None
        if type(text.norm) is not llama.RMSNorm:
            return None
        try:
            layers = [_Layer(layer, dtype) for layer in text.layers]
            lm_head, head_rows = _product(model.lm_head, dtype)
        except _Unsupported:
            return None
        return cls(model, layers, lm_head, min([head_rows] + [layer.max_rows for layer in layers]), dtype)

    def applies(self, cache: KVCache, batch: int) -> bool:
        """Few enough rows for the kernels, no autograd, and a cache in the model's dtype."""
        return batch < self.max_rows and not torch.is_grad_enabled() and cache.keys[0].dtype == self.dtype

    def __call__(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                 inv_freq: torch.Tensor, kv_len: int) -> torch.Tensor:
        """tokens/positions (B, 1), slot (1,) -> fp32 logits (B, V), as ``decode_step`` computes them."""
        ops = torch.ops.fastllava
        batch = tokens.shape[0]
        x = self.embed(tokens)  # (B, 1, C)
        cos, sin = rotary_cos_sin(self.config, positions, x.dtype, inv_freq)
        masks = self.text.layer_masks(slot, cache.valid[:, :kv_len])  # (B, 1, 1, S) per layer
        valid = [mask.reshape(mask.shape[0], mask.shape[-1]).expand(batch, kv_len) for mask in masks]
        keys, values = cache.keys, cache.values
        position = int(slot[0])  # the cache slot this step writes (one per step: slot is (1,))
        silu_kernel = llama.SILU_MUL_KERNEL_FASTER
        for layer in self.layers:
            q, k, v = layer.qkv(ops.rms_norm(x, layer.input_norm, layer.input_eps))  # (B, 1, heads * D) each
            # RoPE on q and k, the cache write and attention over kv_len rows: rotary_, cache_write_ and
            # decode_attention in one dispatch (kernels/attention_step.cpp)
            out = ops.decode_attention_step(q, k, v, cos, sin, keys[layer.index], values[layer.index], position,
                                            kv_len, valid[layer.index], layer.scale)
            x = x + layer.o_proj(out)
            gate, up = layer.gate_up(ops.rms_norm(x, layer.post_norm, layer.post_eps))
            x = x + layer.down(ops.silu_mul(gate, up) if silu_kernel else F.silu(gate) * up)
        hidden = ops.rms_norm(x, self.final_norm, self.final_eps)
        return self.lm_head(hidden[:, -1]).float()
