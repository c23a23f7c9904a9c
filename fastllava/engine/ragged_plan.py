"""RaggedPlan: the attention plan of one engine step, a packed (1, N, C) batch of many sequences' tokens.

Contract: ``RaggedPlan(segments, sliding_windows)``; segment i covers rows [start, end) of the packed batch and
belongs to a sequence whose storage (``SequenceKV``) already holds ``past`` positions. ``attend`` is what the
decoder layers call (models/attention_plan.py): for each segment it writes the rows' new keys/values at
positions [past, past + T) of that sequence's own storage and runs SDPA of those queries over positions
[0, past + T) - causal within the chunk, everything before it visible, a sliding window where the layer has
one. So every linear layer of the model runs once per step over all N rows (prefill chunks and decode tokens
alike) and only attention is per sequence; the model code is the one ``TextModel.run_layers`` path.

Measured choices (see benchmarks/bench_engine.py --only kv-layout decode-attention): a decode row (T = 1) goes
through fastllava's C++ single-query kernel (``torch.ops.fastllava.decode_attention``, kernels/attention.cpp)
over the same strided view, in the storage's own dtype (bf16 for a bf16 model: half the bytes, and 0.25 against
1.0 ms a layer for SDPA over float32 at 800 cached tokens), a sliding window as its ``valid`` mask; prefill
chunks, and decode rows when the kernels are off, use SDPA with ``enable_gqa`` instead of repeating K/V heads (no
copy, 1.2-2x faster for grouped-query models) and masks only when needed (a decode row needs none, a first chunk
is ``is_causal``). The storage may have another dtype than the model (``kv_cache_dtype``; float32 by default
only without the kernels, see half_matmul.resolve_kv_dtype): SDPA's queries are then cast to it and its outputs
back, the kernel takes the model's queries and answers in their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastllava.engine.kv_pool import SequenceKV
from fastllava.models.attention import decode_kernel_applies


@dataclass
class Segment:
    start: int  # first row in the packed batch
    end: int
    kv: SequenceKV
    past: int  # positions already stored before this chunk


class RaggedPlan:
    def __init__(self, segments: list[Segment], sliding_windows: list[int | None]):
        self.segments = segments
        self.windows = sliding_windows
        self._masks: dict[tuple[int, int | None], torch.Tensor | None] = {}

    def _mask(self, index: int, segment: Segment, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(bool mask (T, L) or None, is_causal) for one segment under a layer's window."""
        length = segment.end - segment.start
        total = segment.past + length
        if window is not None and total - 1 < window:
            window = None  # no query can reach beyond the window
        if window is None:
            if length == 1:
                return None, False
            if segment.past == 0:
                return None, True
        key = (index, window)
        if key not in self._masks:
            device = segment.kv.data.device
            query_pos = torch.arange(segment.past, total, device=device)[:, None]
            distance = query_pos - torch.arange(total, device=device)[None, :]  # (T, L)
            allowed = distance >= 0
            if window is not None:
                allowed &= distance < window
            self._masks[key] = allowed
        return self._masks[key], False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, implementation: str = "sdpa",
               return_weights: bool = False, dropout: float = 0.0) -> tuple[torch.Tensor, None]:
        """q (1, H, N, D), new k/v (1, H_kv, N, D) of all packed rows -> output (1, H, N, D)."""
        if return_weights:
            raise ValueError("the engine's ragged attention does not return attention weights")
        out = torch.empty_like(q)
        window = self.windows[layer]
        gqa = q.shape[1] != k.shape[1]
        kernel = None
        for index, seg in enumerate(self.segments):
            a, b = seg.start, seg.end
            seg.kv.write(layer, seg.past, k[:, :, a:b], v[:, :, a:b])
            keys, values = seg.kv.view(layer, seg.past + b - a)  # (1, H_kv, L, D)
            if b - a == 1:
                if kernel is None:
                    kernel = decode_kernel_applies(q, keys, values)
                if kernel:  # a decode row: the C++ kernel, in the cache's dtype, a window as its `valid` mask
                    mask, _ = self._mask(index, seg, window)
                    out[:, :, a] = torch.ops.fastllava.decode_attention(q[:, :, a], keys, values, mask,
                                                                        q.shape[-1] ** -0.5)
                    continue
            query = q[:, :, a:b]
            if query.dtype != keys.dtype:
                query = query.to(keys.dtype)
            mask, causal = self._mask(index, seg, window)
            result = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal,
                                                    enable_gqa=gqa)
            out[:, :, a:b] = result
        return out, None
