"""ModelRunner: one engine step through the model, all scheduled chunks packed into one (1, N, C) batch.

Contract: ``run(chunks) -> (R, V) fp32 logits``, one row per chunk that reaches the end of its sequence (in
chunk order). It builds the packed inputs - token embeddings (``LlavaModel.embed_inputs``) with the image
features written at the prompt's placeholder rows, per-token position ids and their RoPE tables
(``rotary_cos_sin``; per sequence for dynamic NTK scaling, whose frequencies depend on the sequence's length, as
in ``generate()``) - runs the shared decoder core ``TextModel.run_layers`` with a ``RaggedPlan`` and applies
``lm_head`` only to the rows whose logits are needed. No model code is duplicated here.

A step that is one sequence's one new token (a single conversation decoding) goes through the lean decode step
instead (generation/lean_step.py: the same ops as the packed path, without the module tree, one C++ call for all
layers, as ``generate()`` decodes). Measured (llava-interleave-qwen-0.5b, one request, 8-token prompt, two threads):
bf16 35.7 -> 30.5 ms a token, int4 17.6 -> 10.4 ms (``generate()`` in the same processes: 30.8 / 10.6 ms).
Requests decoding together (no prompt chunk in the step) take it too, each row attending over its own cache
(``LeanStep.ragged``): int4, 8-53-token prompts, 48 tokens each, 2 requests 97 -> 156 tok/s, 4 requests 138 ->
211.
"""

from __future__ import annotations

import weakref

import torch

from fastllava.engine.kv_pool import SequenceKV
from fastllava.engine.ragged_plan import RaggedPlan, Segment
from fastllava.generation.lean_step import LeanStep
from fastllava.models.rope import inverse_frequencies, rotary_cos_sin


class _SequenceCache:
    """An engine sequence's storage as the KV cache a LeanStep reads: per-layer views, and a validity row of ones
    (an engine sequence has no padding: every position below its length is valid)."""

    def __init__(self, kv: SequenceKV, valid: torch.Tensor):
        self.keys, self.values = kv.layer_views()
        self.valid = valid


class ModelRunner:
    def __init__(self, model):
        self.model = model
        self.text_model = model.model.language_model
        self.config = model.config.text_config
        self.dynamic_rope = self.config.rope_parameters["rope_type"] == "dynamic"
        self.inv_freq = None if self.dynamic_rope else inverse_frequencies(self.config, None, model.device)
        self.windows = list(self.text_model.sliding_windows)
        # the lean step and the sequences it has served: rebound when a new one decodes (as generate() binds one per
        # call, so a model whose layers were switched since is picked up); a validity row of ones
        self._lean: LeanStep | None = None
        self._bound: weakref.WeakSet = weakref.WeakSet()
        self._ones = torch.ones(1, 0, dtype=torch.bool, device=model.device)

    def _lean_decode(self, chunks) -> torch.Tensor | None:
        """(B, V) fp32 logits through the lean decode step when the step is B sequences' one new token each (no
        image row, logits wanted, a RoPE that does not depend on the length); None otherwise."""
        if not chunks or self.dynamic_rope:
            return None
        for chunk in chunks:
            first, last = chunk.seq.image_rows(chunk.start, chunk.end)
            if chunk.end - chunk.start != 1 or not chunk.wants_logits or last > first or chunk.seq.kv.data is None:
                return None
        kvs = [chunk.seq.kv for chunk in chunks]
        if self._lean is None or any(kv not in self._bound for kv in kvs):
            self._lean, self._bound = LeanStep.build(self.model), weakref.WeakSet(kvs)
        lean = self._lean
        if lean is None:
            return None
        longest = max(chunk.end for chunk in chunks)
        if self._ones.shape[1] < longest:
            self._ones = torch.ones(1, max(longest, 2 * self._ones.shape[1]), dtype=torch.bool,
                                    device=self._ones.device)
        caches = [_SequenceCache(kv, self._ones) for kv in kvs]
        if not lean.applies(caches[0], len(chunks)):
            return None
        device = self._ones.device  # the model's (model.device walks the module tree)
        tokens = torch.tensor([[chunk.seq.token_ids[chunk.start]] for chunk in chunks], device=device)
        positions = torch.tensor([[chunk.start] for chunk in chunks], device=device)
        if len(chunks) == 1:
            return lean(caches[0], tokens, positions, chunks[0].start, self.inv_freq, chunks[0].end)
        return lean.ragged(caches, tokens, positions, [chunk.start for chunk in chunks], self.inv_freq)

    @torch.inference_mode()
    def run(self, chunks) -> torch.Tensor:
        logits = self._lean_decode(chunks)
        if logits is not None:
            return logits
        device = self.model.device
        ids: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        feature_rows: list[int] = []
        features: list[torch.Tensor] = []
        logit_rows: list[int] = []
        for chunk in chunks:
            seq, row = chunk.seq, len(ids)
            ids.extend(seq.token_ids[chunk.start:chunk.end])
            positions.extend(range(chunk.start, chunk.end))
            first, last = seq.image_rows(chunk.start, chunk.end)
            if last > first:
                placeholders = seq.request.prompt.image_positions[first:last]
                feature_rows.extend(row + p - chunk.start for p in placeholders)
                features.append(seq.request.features[first:last])
            segments.append(Segment(row, len(ids), seq.kv, chunk.start))
            if chunk.wants_logits:
                logit_rows.append(len(ids) - 1)
        input_ids = torch.tensor([ids], device=device)
        embeds = self.model.model.embed_inputs(input_ids, None, None)  # (1, N, C)
        if feature_rows:
            embeds[0, torch.tensor(feature_rows, device=device)] = torch.cat(features).to(embeds.dtype)
        position_ids = torch.tensor([positions], device=device)  # (1, N)
        if self.dynamic_rope:
            tables = [rotary_cos_sin(self.config, position_ids[:, s.start:s.end], embeds.dtype) for s in segments]
            cos, sin = torch.cat([t[0] for t in tables], dim=1), torch.cat([t[1] for t in tables], dim=1)
        else:
            cos, sin = rotary_cos_sin(self.config, position_ids, embeds.dtype, self.inv_freq)
        hidden, _, _ = self.text_model.run_layers(embeds, cos, sin, RaggedPlan(segments, self.windows))
        if not logit_rows:
            return hidden.new_zeros(0, 0, dtype=torch.float32)
        return self.model.lm_head(hidden[0, logit_rows]).float()
