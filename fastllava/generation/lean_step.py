"""The eager decode step without the module tree: the decoder's layers bound once to their tensors and C++ ops.

Why: a decode step of a 24-layer model calls ~500 small functions, and on a CPU the Python around them costs as
much as the work of small models. Measured (one thread, Zen 4, llava-interleave-qwen-0.5b architecture with a
64-wide text model, so the products cost almost nothing): 16.0 ms a step through the nn.Module path
(``decode_step``: module calls, attribute lookups, per-call kernel checks and joint-weight lookups) against the
~35 ms it takes to stream the real model's 0.93 GB of weights. ``LeanStep`` resolves every choice once per
session (which product kernel, which joint weights, which norm and attention ops) and then runs the same ops in
the same order on plain tensors, so its logits equal ``decode_step``'s bit for bit (tests/test_lean_step.py).
The layers, final norm and lm_head run as one C++ call (``kernels/decoder_layers.cpp``, bound once per model):
measured (int8 and bf16, two threads, 757-token prompt) ~1.5 ms a step less than the same ops called from a
Python loop (int8 15.5 -> 13.9 ms, bf16 27.5 -> 25.5 ms, interleaved runs).

It applies to bf16/fp16 text models on CPU with fastllava's C++ kernels built, whose layers are fastllava's own
(Linear, Int8Linear, Int4Linear products; RMSNorm; SiLU MLP; SDPA attention with a cache in the model's dtype),
for batches small enough for the few-row kernels; ``LeanStep.build`` returns None otherwise and the caller keeps
``decode_step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllava.generation.kv_cache import KVCache
from fastllava.kernels.build import load as kernels_loaded
from fastllava.models import llama
from fastllava.models.fused_ops import StoredProduct, joint_operator, stored_product
from fastllava.models.half_matmul import HALF_DTYPES, kernel_max_rows
from fastllava.models.rope import rotary_cos_sin


class _Unsupported(Exception):
    """A layer the lean step does not reproduce exactly; the caller keeps the module path."""


def _product(layer: torch.nn.Module, dtype: torch.dtype) -> tuple[StoredProduct, int]:
    """The C++ product the module would pick for a few rows of ``layer``, and the rows it takes."""
    product = stored_product(layer)
    if product is None:
        raise _Unsupported(f"a {type(layer).__name__} product")
    weight = product.weight
    if product.op == "gemv" and (weight.dtype != dtype or weight.dtype not in HALF_DTYPES
                                 or not weight.is_contiguous()):
        raise _Unsupported(f"a {weight.dtype} linear weight")
    return product, kernel_max_rows(weight.dtype)


def _products(owner: torch.nn.Module, names: tuple[str, ...], dtype: torch.dtype) -> tuple[list[StoredProduct], int]:
    """The products computing ``owner``'s layers ``names`` on one input: one over adjacent weights or codes when
    they lie back to back (``fused_ops.joint_operator``, as ``joint_product`` computes them), else one each."""
    linears = [getattr(owner, name) for name in names]
    bound = [_product(layer, dtype) for layer in linears]  # also rejects what the lean step cannot run
    max_rows = min(rows for _, rows in bound)
    joint = joint_operator(owner, linears)
    return ([joint] if joint is not None else [product for product, _ in bound]), max_rows


def _add(decoder, part: str, product: StoredProduct) -> None:
    decoder.add_product(part, product.op, product.weight, product.scales, product.zeros, product.group, product.bias,
                        list(product.sizes))


def _add_layer(decoder, layer: llama.DecoderLayer, dtype: torch.dtype) -> int:
    """Binds one decoder layer's tensors and products into ``decoder``; returns the rows its products take."""
    attention, mlp = layer.self_attn, layer.mlp
    if attention.attn_implementation != "sdpa" or mlp.act is not F.silu:
        raise _Unsupported("eager attention or a non-SiLU MLP")
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if type(norm) is not llama.RMSNorm or norm.weight.dtype != dtype:
            raise _Unsupported("a norm in another dtype")
    qkv, qkv_rows = _products(attention, ("q_proj", "k_proj", "v_proj"), dtype)
    o_proj, o_rows = _product(attention.o_proj, dtype)
    gate_up, mlp_rows = _products(mlp, ("gate_proj", "up_proj"), dtype)
    down, down_rows = _product(mlp.down_proj, dtype)
    decoder.add_layer(attention.layer_index, layer.input_layernorm.weight, layer.input_layernorm.eps,
                      layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps,
                      attention.head_dim ** -0.5)
    for part, products in (("qkv", qkv), ("o_proj", [o_proj]), ("gate_up", gate_up), ("down", [down])):
        for product in products:
            _add(decoder, part, product)
    return min(qkv_rows, o_rows, mlp_rows, down_rows)


class LeanStep:
    """``decode_step`` for one model, eager, with every per-call decision taken once (see the module docstring)."""

    def __init__(self, model, decoder, max_rows: int, dtype: torch.dtype):
        self.model, self.decoder, self.max_rows, self.dtype = model, decoder, max_rows, dtype
        text = model.model.language_model
        self.text, self.config = text, text.config
        self.embed = text.embed_tokens  # a module call: plain or quantized table
        self.full_attention = all(window is None for window in text.sliding_windows)

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
        decoder = torch.classes.fastllava.DecoderLayers(llama.SILU_MUL_KERNEL_FASTER)
        try:
            max_rows = min(_add_layer(decoder, layer, dtype) for layer in text.layers)
            lm_head, head_rows = _product(model.lm_head, dtype)
        except _Unsupported:
            return None
        _add(decoder, "lm_head", lm_head)
        decoder.set_final_norm(text.norm.weight, text.norm.eps)
        return cls(model, decoder, min(head_rows, max_rows), dtype)

    def applies(self, cache: KVCache, batch: int) -> bool:
        """Few enough rows for the kernels, no autograd, and a cache in the model's dtype."""
        return batch < self.max_rows and not torch.is_grad_enabled() and cache.keys[0].dtype == self.dtype

    def __call__(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor | int,
                 inv_freq: torch.Tensor, kv_len: int) -> torch.Tensor:
        """tokens/positions (B, 1), slot (1,) or an int -> fp32 logits (B, V), as ``decode_step`` computes them."""
        batch = tokens.shape[0]
        x = self.embed(tokens)  # (B, 1, C)
        cos, sin = rotary_cos_sin(self.config, positions, x.dtype, inv_freq)
        position = slot if isinstance(slot, int) else int(slot[0])  # the cache slot this step writes
        valid = self._layer_masks(cache.valid[:, :kv_len], slot, batch)
        # per layer: norm, q/k/v, RoPE + cache write + attention, o_proj, norm, gate/up, SiLU, down; then the
        # final norm and lm_head on the last position (kernels/decoder_layers.cpp)
        return self.decoder.run(x, cos, sin, cache.keys, cache.values, position, kv_len, valid)

    def _layer_masks(self, valid: torch.Tensor, slot: torch.Tensor | int, batch: int) -> list[torch.Tensor]:
        """Each layer's (B, kv_len) mask of the slots the new token (at ``slot``) sees, from the cache's validity
        row(s) ``valid`` (B, kv_len)."""
        if self.full_attention:
            # the new token may see every valid slot, and no slot after it is valid (KVCache keeps
            # valid[:, length:] False), so the decoder mask is the validity row itself: one view for every layer
            # instead of ~6 small tensor ops a token
            return [valid] * len(self.text.layers)
        if not isinstance(slot, torch.Tensor):
            slot = torch.tensor([slot], device=valid.device)
        masks = self.text.layer_masks(slot, valid)  # (B, 1, 1, S) per layer
        rows: dict[int, torch.Tensor] = {}  # layers of one window share their mask: one (B, S) view each
        for mask in masks:
            if id(mask) not in rows:
                rows[id(mask)] = mask.reshape(mask.shape[0], mask.shape[-1]).expand(batch, valid.shape[1])
        return [rows[id(mask)] for mask in masks]

    def ragged(self, caches: list, tokens: torch.Tensor, positions: torch.Tensor, slots: list[int],
               inv_freq: torch.Tensor) -> torch.Tensor:
        """Several sequences with caches of their own (the engine's): tokens / positions (B, 1); ``caches[b]`` has
        per-layer ``keys``/``values`` (1, H_kv, L, D) and a validity row ``valid`` true up to ``slots[b]``, the
        slot row b's token writes -> fp32 logits (B, V), row b as ``__call__`` computes it for that sequence alone
        (the products see all rows at once, each row's sums unchanged)."""
        x = self.embed(tokens)
        cos, sin = rotary_cos_sin(self.config, positions, x.dtype, inv_freq)
        keys, values, valid = [], [], []
        for cache, slot in zip(caches, slots, strict=True):
            keys += cache.keys
            values += cache.values
            valid += self._layer_masks(cache.valid[:, :slot + 1], slot, 1)
        return self.decoder.run_ragged(x, cos, sin, keys, values, slots, valid, len(self.text.layers))
