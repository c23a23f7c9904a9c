"""The decode step: one new token per sequence through embeddings, decoder layers, final norm and lm_head.

``decode_step`` is a tensor function with fixed shapes for a given cache: it attends over the whole
preallocated cache (``kv_len`` = its capacity) with a mask of the valid slots, writes the new K/V at a slot
given as a tensor, and takes RoPE frequencies as an input, so nothing in it depends on Python values that change
from token to token. That makes it compilable (``torch.compile``) once per cache capacity; capacities are
rounded up to ``CAPACITY_BUCKET`` so a chat or a server does not recompile for every prompt length.
``StepRunner`` runs it eagerly or compiled; both give the same tokens. Eagerly on CPU it runs
``generation/lean_step.py``'s ``LeanStep`` where that applies: the same ops with the module tree taken out.
"""

from __future__ import annotations

import os

import torch

from fastllava.generation.kv_cache import KVCache
from fastllava.generation.lean_step import LeanStep
from fastllava.models.attention_plan import DensePlan
from fastllava.models.rope import inverse_frequencies, rotary_cos_sin

CAPACITY_BUCKET = 256
WINDOW_STEP = 64


def bucket_capacity(length: int) -> int:
    return -(-length // CAPACITY_BUCKET) * CAPACITY_BUCKET


def decode_step(model, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                inv_freq: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    """tokens/positions (B, 1), slot (1,) -> fp32 logits (B, V); K/V written at ``slot`` (already marked valid).
    Attends over the first ``kv_len`` cache slots (default: all of them, the fixed shape compilation wants)."""
    kv_len = cache.capacity if kv_len is None else kv_len
    text = model.model.language_model
    x = text.embed_tokens(tokens)  # (B, 1, C)
    cos, sin = rotary_cos_sin(text.config, positions, x.dtype, inv_freq)
    masks = text.layer_masks(slot, cache.valid[:, :kv_len])
    hidden, _, _ = text.run_layers(x, cos, sin, DensePlan(masks, cache, slot, kv_len))
    return model.lm_head(hidden[:, -1]).float()


def eager_window(length: int, capacity: int) -> int:
    """Cache slots an eager step attends over: the filled ones rounded up to WINDOW_STEP (not the whole
    capacity: one decode query over a 1024-slot cache holding 20 tokens cost 0.3 ms a layer in masked work)."""
    return min(capacity, -(-length // WINDOW_STEP) * WINDOW_STEP)


def compile_enabled(requested: bool | None) -> bool:
    """Explicit argument first, then FASTLLAVA_COMPILE=0/1; default off (see StepRunner)."""
    if requested is not None:
        return requested
    return os.environ.get("FASTLLAVA_COMPILE", "0").lower() in ("1", "true", "yes", "on")


class StepRunner:
    """Calls decode_step for a session, eagerly or through torch.compile (one compiled graph per capacity)."""

    _compiled = None  # shared by all runners: inductor caches graphs per shape, and on disk across processes

    def __init__(self, model, compile: bool | None = None):
        self.model = model
        self.config = model.config.text_config
        self.compile = compile_enabled(compile)
        self.dynamic_rope = self.config.rope_parameters["rope_type"] == "dynamic"
        self._inv_freq = inverse_frequencies(self.config, device=model.device)
        self._lean: LeanStep | None | bool = False  # built on the first eager step (False: not yet)

    def _function(self):
        if not self.compile:
            return decode_step
        if StepRunner._compiled is None:
            StepRunner._compiled = torch.compile(decode_step, dynamic=False, options={"freezing": True})
        return StepRunner._compiled

    def __call__(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        slot = cache.length
        if slot >= cache.capacity:
            raise RuntimeError(f"KV cache full ({cache.capacity} slots): reserve capacity before decoding")
        cache.valid[:, slot] = True
        cache.length = slot + 1
        inv_freq = self._inv_freq
        if self.dynamic_rope:  # NTK scaling depends on the longest position so far
            inv_freq = inverse_frequencies(self.config, int(positions.max()) + 1, positions.device)
        if self.compile:  # one fixed shape per capacity
            return self._function()(self.model, cache, tokens, positions, torch.tensor([slot], device=tokens.device),
                                    inv_freq)
        window = eager_window(slot + 1, cache.capacity)
        if self._lean is False:
            self._lean = LeanStep.build(self.model)
        if self._lean is not None and self._lean.applies(cache, tokens.shape[0]):
            return self._lean(cache, tokens, positions, slot, inv_freq, window)  # same logits, less Python
        return decode_step(self.model, cache, tokens, positions, torch.tensor([slot], device=tokens.device), inv_freq,
                           window)
