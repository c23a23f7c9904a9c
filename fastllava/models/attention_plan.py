"""Attention plans: how a decoder layer's attention reads and writes keys/values for one forward call.

The decoder layers compute q/k/v, RoPE and the MLP the same way for every caller; what differs is where the
keys and values live. A plan's ``attend(layer, q, k, v)`` stores the new k/v and attends over what the
sequence may see. ``DensePlan`` serves training, the transformers-style forward, ``generate`` and the chat: a
rectangular batch, an optional preallocated ``KVCache`` whose slots are shared by all rows, and per-layer
boolean masks (None = plain causal). The serving engine supplies its own plan for ragged batches, so the
model code stays one path.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fastllava.generation.kv_cache import KVCache
from fastllava.models.attention import attend


class AttentionPlan(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, implementation: str,
               return_weights: bool = False, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, T, D), new k/v (B, Hkv, T, D) -> output (B, H, T, D) and optional weights."""


class DensePlan:
    def __init__(self, masks: list[torch.Tensor | None], cache: KVCache | None = None,
                 slots: torch.Tensor | None = None, kv_len: int = 0):
        self.masks = masks
        self.cache = cache
        self.slots = slots
        self.kv_len = kv_len

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, implementation: str,
               return_weights: bool = False, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is not None:
            self.cache.write(layer, self.slots, k, v)
            k = self.cache.keys[layer][:, :, : self.kv_len]
            v = self.cache.values[layer][:, :, : self.kv_len]
        mask = self.masks[layer]
        if q.dtype == k.dtype:
            return attend(q, k, v, mask, implementation, causal_no_mask=mask is None, return_weights=return_weights,
                          dropout=dropout)
        # a float32 cache for a bf16 model (resolve_kv_dtype): attend in the cache's dtype, answer in the model's
        out, weights = attend(q.to(k.dtype), k, v, mask, implementation, causal_no_mask=mask is None,
                              return_weights=return_weights, dropout=dropout)
        return out.to(q.dtype), None if weights is None else weights.to(q.dtype)
