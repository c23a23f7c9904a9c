"""Token choice for the engine: the logits processors of fastllava.generation.sampling, per sequence.

Contract: ``settings_for(params, stop_ids)`` turns a request's ``SamplingParams`` into the ``SamplingSettings``
that ``generate()`` uses (temperature 0 = greedy; ``min_tokens`` suppresses end-of-sequence and stop tokens),
so the engine chooses tokens exactly as ``generate()`` does. ``Sampler.choose(logits, rows)`` picks one token
per row: rows that are plain greedy are one batched argmax; any other row runs the processors on its own, with
its own ``torch.Generator`` (per-request seeds, so a seeded request draws the same tokens whatever else is in
the batch). OpenAI's presence/frequency penalties (over the generated tokens, vLLM's semantics) are applied
before the transformers processors. Log-probabilities are those of the model's raw distribution (vLLM's
default), the chosen token's plus the ``logprobs`` most likely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastllava.engine.types import SamplingParams, TokenLogprob
from fastllava.generation.sampling import SamplingSettings, choose_tokens, greedy_tokens, process_scores


def settings_for(params: SamplingParams, stop_ids: list[int]) -> SamplingSettings:
    settings = SamplingSettings(
        do_sample=not params.greedy,
        temperature=params.temperature if not params.greedy else 1.0,
        top_k=params.top_k or None,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        min_new_tokens=params.min_tokens,
        eos_token_ids=list(stop_ids),
    )
    settings.validate()
    return settings


@dataclass
class SampleRow:
    settings: SamplingSettings
    params: SamplingParams
    history: list[int]  # prompt + generated ids (what the repetition penalty looks at)
    num_generated: int
    generator: torch.Generator | None

    @property
    def plain_greedy(self) -> bool:
        p = self.params
        return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and self.num_generated >= self.settings.min_new_tokens)


def apply_openai_penalties(scores: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    if not generated or (not presence and not frequency):
        return scores
    ids = torch.tensor(generated, device=scores.device).clamp(0, scores.shape[-1] - 1)
    counts = torch.zeros(scores.shape[-1], device=scores.device).index_add_(0, ids, torch.ones(len(generated), device=scores.device))
    return scores - frequency * counts - presence * (counts > 0).float()


class Sampler:
    def choose(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[tuple[int, TokenLogprob | None]]:
        """logits (R, V) fp32 -> one (token, logprob or None) per row."""
        tokens: list[int | None] = [None] * len(rows)
        greedy = [i for i, row in enumerate(rows) if row.plain_greedy]
        if greedy:
            picked = greedy_tokens(logits[greedy]).tolist()
            for i, token in zip(greedy, picked):
                tokens[i] = token
        for i, row in enumerate(rows):
            if tokens[i] is not None:
                continue
            scores = logits[i:i + 1].clone()
            p = row.params
            generated = row.history[len(row.history) - row.num_generated:] if row.num_generated else []
            scores[0] = apply_openai_penalties(scores[0], generated, p.presence_penalty, p.frequency_penalty)
            history = torch.tensor([row.history], device=logits.device) if p.repetition_penalty != 1.0 else None
            scores = process_scores(scores, history, row.num_generated, row.settings)
            tokens[i] = int(choose_tokens(scores, row.settings, row.generator)[0])
        out = []
        wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        logprobs = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
        by_row = {i: n for n, i in enumerate(wanted)}
        for i, row in enumerate(rows):
            entry = None
            if i in by_row:
                lp = logprobs[by_row[i]]
                top = {}
                if row.params.logprobs:
                    values, ids = torch.topk(lp, row.params.logprobs)
                    top = dict(zip(ids.tolist(), values.tolist()))
                entry = TokenLogprob(token_id=tokens[i], logprob=float(lp[tokens[i]]), top=top)
            out.append((tokens[i], entry))
        return out
