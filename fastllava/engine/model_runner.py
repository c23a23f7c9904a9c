"""ModelRunner: one engine step through the model, all scheduled chunks packed into one (1, N, C) batch.

Contract: ``run(chunks) -> (R, V) fp32 logits``, one row per chunk that reaches the end of its sequence (in
chunk order). It builds the packed inputs - token embeddings (``LlavaModel.embed_inputs``) with the image
features written at the prompt's placeholder rows, per-token position ids and their RoPE tables
(``rotary_cos_sin``; per sequence for dynamic NTK scaling, whose frequencies depend on the sequence's length, as
in ``generate()``) - runs the shared decoder core ``TextModel.run_layers`` with a ``RaggedPlan`` and applies
``lm_head`` only to the rows whose logits are needed. No model code is duplicated here.
"""

from __future__ import annotations

import torch

from fastllava.engine.ragged_plan import RaggedPlan, Segment
from fastllava.models.rope import inverse_frequencies, rotary_cos_sin


class ModelRunner:
    def __init__(self, model):
        self.model = model
        self.text_model = model.model.language_model
        self.config = model.config.text_config
        self.dynamic_rope = self.config.rope_parameters["rope_type"] == "dynamic"
        self.inv_freq = None if self.dynamic_rope else inverse_frequencies(self.config, None, model.device)
        self.windows = list(self.text_model.sliding_windows)

    @torch.inference_mode()
    def run(self, chunks) -> torch.Tensor:
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
