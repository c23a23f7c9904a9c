"""DecodeSession: prefill and decode over one KV cache. The loop core shared by generate(), the chat CLI and
the serving engine, so there is one implementation of positions, masks and cache bookkeeping.

A session holds a batch of B sequences in a preallocated ``KVCache``. ``extend`` appends tokens (a first
prompt with images, or a later chat turn) and returns the logits of each row's last token; ``step`` appends
one token per row. Position ids follow transformers' generate(): a left-padded row starts at 0 at its first
real token. ``truncate`` rolls the cache back to a shared prefix so that a new turn re-uses the KV of the
conversation so far and prefills only what changed.
"""

from __future__ import annotations

import torch

from fastllava.generation.decode_step import StepRunner, bucket_capacity
from fastllava.generation.kv_cache import KVCache
from fastllava.models.half_matmul import resolve_kv_dtype


class DecodeSession:
    def __init__(self, model, batch_size: int, capacity: int, dtype: torch.dtype | None = None,
                 compile: bool | None = None):
        self.model = model
        self.text_model = model.model.language_model
        # Capacities come in buckets so the fixed-shape decode step is reused (and compiled) per bucket.
        # dtype None: the model's, or float32 for a bf16 model on a CPU without bf16 arithmetic when the C++ decode
        # attention is unavailable (resolve_kv_dtype)
        self.cache = KVCache.for_config(model.config.text_config, batch_size, bucket_capacity(capacity),
                                        dtype or resolve_kv_dtype("auto", model.dtype, model.device), model.device)
        self.step_runner = StepRunner(model, compile)
        self.next_positions = torch.zeros(batch_size, dtype=torch.long, device=model.device)
        self.token_ids: list[list[int]] = [[] for _ in range(batch_size)]  # what the cache holds, per row

    @property
    def length(self) -> int:
        return self.cache.length

    def _run(self, embeds: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Append (B, T, C) embeddings with their (B, T) mask; return fp32 logits (B, V) at the last position."""
        past = self.cache.length
        positions = self.next_positions[:, None] + new_mask.cumsum(dim=1) - 1
        positions = positions.masked_fill(new_mask == 0, 1)
        attention_mask = torch.cat([self.cache.valid[:, :past], new_mask.bool()], dim=1)
        out = self.text_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                              past_key_values=self.cache)
        self.next_positions += new_mask.sum(dim=1)
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def extend(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
               vision_feature_layer=None, vision_feature_select_strategy: str | None = None) -> torch.Tensor:
        """Prefill (B, T) tokens, images included (the vision tower runs here, once)."""
        input_ids = input_ids.to(self.model.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.model.device).long()
        if pixel_values is not None and image_features is None:
            image_features = self.model.model.image_features(pixel_values.to(self.model.device),
                                                             vision_feature_layer, vision_feature_select_strategy)
        embeds = self.model.model.embed_inputs(input_ids, None, image_features)
        self.cache.reserve(bucket_capacity(self.cache.length + input_ids.shape[1]) - self.cache.length)
        logits = self._run(embeds, mask)
        for row, ids in enumerate(input_ids.tolist()):
            self.token_ids[row].extend(ids)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the next logits (B, V)."""
        tokens = tokens.to(self.next_positions.device).view(-1, 1)  # the model's device (model.device walks modules)
        self.cache.reserve(1)  # grows by doubling, so capacities stay multiples of the bucket
        logits = self.step_runner(self.cache, tokens, self.next_positions[:, None])
        self.next_positions += 1
        for row, token in enumerate(tokens[:, 0].tolist()):
            self.token_ids[row].append(token)
        return logits

    def truncate(self, length: int) -> None:
        """Forget every token from ``length`` on (batch of 1 without padding: positions equal slots)."""
        if self.cache.batch_size != 1:
            raise ValueError("truncate is for single-sequence sessions")
        self.cache.truncate(length)
        self.next_positions.fill_(length)
        self.token_ids[0] = self.token_ids[0][:length]

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` the cache already holds (row 0)."""
        held = self.token_ids[0]
        count = 0
        for a, b in zip(held, ids):
            if a != b:
                break
            count += 1
        return count
