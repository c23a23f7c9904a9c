"""Requests and sequences: what the engine knows about each piece of work.

Contract: a ``Request`` is one prompt (token ids, optional pixel values with one hash per image, the positions
of its image placeholders) with its ``SamplingParams``; it owns ``n`` ``Sequence`` objects, one per sample.
A sequence is ``token_ids`` (prompt, then generated) of which the first ``num_computed`` have their keys and
values in its ``SequenceKV``; every step computes the next chunk of them, and when a chunk reaches the end
of ``token_ids`` the logits of its last row choose the next token. Prefill, chunked prefill, decode and the
recomputation after a preemption are therefore one mechanism. The block keys of a sequence (for the prefix
cache) are extended lazily as its tokens grow.
"""

from __future__ import annotations

import enum
import itertools
from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from fastllava.engine.detokenizer import IncrementalDetokenizer
from fastllava.engine.kv_pool import SequenceKV
from fastllava.engine.prefix_cache import ImageSpan, block_hashes
from fastllava.engine.types import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class PreparedPrompt:
    """A prompt after the processor: token ids, and for images their pixels, hashes and placeholder positions."""

    token_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_keys: list[bytes] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)  # indices of the placeholder tokens, ascending

    @property
    def num_images(self) -> int:
        return len(self.image_keys)

    def image_spans(self) -> list[ImageSpan]:
        if not self.image_keys:
            return []
        per_image = len(self.image_positions) // len(self.image_keys)
        return [(self.image_positions[i * per_image], self.image_positions[(i + 1) * per_image - 1] + 1, key)
                for i, key in enumerate(self.image_keys)]


class Request:
    def __init__(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams, max_tokens: int,
                 stop_ids: list[int], salt: bytes):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids  # end-of-sequence ids (unless ignore_eos) and stop_token_ids
        self.salt = salt
        self.arrival = next(_arrivals)
        self.sequences: list[Sequence] = []
        self.features: torch.Tensor | None = None  # (placeholders, C) while some sequence still needs them
        self.num_cached_tokens = 0
        self.cache_recorded = False
        self._prompt_keys: list[bytes] | None = None
        self.finished = False

    def prompt_keys(self, block_size: int) -> list[bytes]:
        """Keys of the prompt's full blocks (computed once, shared by the samples)."""
        if self._prompt_keys is None:
            self._prompt_keys = block_hashes(self.prompt.token_ids, self.prompt.image_spans(), block_size, self.salt)
        return self._prompt_keys

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            outputs=[seq.completion() for seq in self.sequences],
            prompt_token_ids=list(self.prompt.token_ids),
            num_image_tokens=len(self.prompt.image_positions),
            num_cached_tokens=self.num_cached_tokens,
            finished=all(seq.status is Status.FINISHED for seq in self.sequences),
        )


class Sequence:
    def __init__(self, request: Request, index: int, tokenizer, block_size: int, device: torch.device | str = "cpu"):
        self.request = request
        self.index = index
        self.token_ids = list(request.prompt.token_ids)
        self.num_prompt = len(self.token_ids)
        self.num_computed = 0
        self.kv: SequenceKV | None = None
        self.status = Status.WAITING
        self.block_size = block_size
        self.keys: list[bytes] = list(request.prompt_keys(block_size))
        params = request.params
        self.generator = None
        if params.seed is not None:
            # vLLM: sample i of a seeded request uses seed + i; on the model's device, as generate() does
            self.generator = torch.Generator(device=device).manual_seed(int(params.seed) + index)
        self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.stop)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.new_tokens: list[int] = []  # generated since the last output
        self.new_text = ""
        self.reported = False  # the final output was handed out

    # -- identity and ordering
    @property
    def priority(self) -> tuple[int, int]:
        """Earlier arrivals first; the newest is preempted first."""
        return (self.request.arrival, self.index)

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def remaining(self) -> int:
        """Tokens whose K/V are still to be computed before the next token can be chosen."""
        return len(self.token_ids) - self.num_computed

    @property
    def limit(self) -> int:
        return self.num_prompt + self.request.max_tokens

    def block_keys(self) -> list[bytes]:
        """Keys of every full block of token_ids (extended as tokens are added)."""
        full = len(self.token_ids) // self.block_size
        if len(self.keys) < full:
            parent = self.keys[-1] if self.keys else None
            spans = self.request.prompt.image_spans()
            self.keys.extend(block_hashes(self.token_ids, spans, self.block_size, self.request.salt, parent,
                                          start_block=len(self.keys)))
        return self.keys

    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """Range of the request's feature rows used by the prompt's placeholders in token range [start, end)."""
        positions = self.request.prompt.image_positions
        return bisect_left(positions, start), bisect_left(positions, end)

    # -- results
    def completion(self) -> CompletionOutput:
        out = CompletionOutput(
            index=self.index,
            text=self.detokenizer.emitted_text,
            token_ids=self.generated,
            text_delta=self.new_text,
            token_ids_delta=self.new_tokens,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        self.new_tokens, self.new_text = [], ""
        return out
