"""Engine: continuous batching over one LLaVA model, step by step (vLLM's LLMEngine contract, nano-vllm's size).

Contract::

    engine = Engine(model, processor, max_num_seqs=16, max_num_batched_tokens=512, kv_cache_bytes=4 << 30)
    engine.add_request("r1", conversation_or_prompt, SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step():   # RequestOutput: cumulative text/token ids per sample, the step's deltas
            ...
    engine.abort("r1"); engine.stats()

A prompt is a conversation (messages as ``LlavaProcessor.apply_chat_template`` takes them: image parts by
url/path/base64/PIL and OpenAI ``image_url`` parts), a plain string, vLLM's ``{"prompt": str,
"multi_modal_data": {"image": image | [images]}}``, or pre-tokenized ``{"prompt_token_ids": [...],
"pixel_values": tensor}`` (inputs.py). Images are loaded, preprocessed, hashed and tokenized in a bounded
worker pool (``preprocess_workers`` threads), off the step loop: a request joins the schedule once its inputs
are ready.
Errors a user can cause are that request's alone: invalid arguments raise from ``add_request``; a bad image or
a prompt longer than the context comes back as a finished ``RequestOutput`` whose ``error`` says what is wrong,
and the engine goes on serving the others.

Each step packs the scheduled tokens of all sequences (decode tokens and prefill chunks) into one batch
(model_runner.py), so the weights are read once per step whatever the number of requests. The vision tower
runs once per distinct image (image_cache.py); prompts that share a prefix with earlier or running ones -
a second question about the same image, the next turn of a chat, the n samples of a request - compute only
the rest (prefix_cache.py). Greedy outputs equal ``model.generate``'s for every request whatever the batch,
the chunking, preemption or cache hits; seeded sampling is reproducible per request.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import torch

from fastllava.engine.image_cache import ImageEmbeddingCache, vision_settings
from fastllava.engine.inputs import RequestError, prepare_prompt
from fastllava.engine.kv_pool import KVPool
from fastllava.engine.model_runner import ModelRunner
from fastllava.engine.prefix_cache import PrefixCache
from fastllava.engine.request import PreparedPrompt, Request, Sequence, Status
from fastllava.engine.sampler import Sampler, SampleRow, settings_for
from fastllava.engine.scheduler import Chunk, Scheduler
from fastllava.engine.types import CompletionOutput, RequestOutput, SamplingParams
from fastllava.models.half_matmul import resolve_kv_dtype

GiB = 1 << 30


def error_message(error: BaseException) -> str:
    """What a failed request's ``RequestOutput.error`` says: the message, named by its type unless it is ours."""
    message = str(error) or type(error).__name__
    return message if isinstance(error, RequestError) else f"{type(error).__name__}: {message}"


class Engine:
    def __init__(
        self,
        model,
        processor: Any = None,
        *,
        tokenizer: Any = None,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        kv_cache_bytes: int = 4 * GiB,
        kv_cache_tokens: int | None = None,
        kv_cache_dtype: str | torch.dtype = "auto",
        block_size: int = 16,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        image_cache_bytes: int = GiB // 4,
        preprocess_workers: int = 2,
    ):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        text = model.config.text_config
        kv_dtype = resolve_kv_dtype(kv_cache_dtype, model.dtype, model.device)
        if kv_cache_tokens is not None:  # the budget as a number of tokens (the server's --kv-cache-tokens)
            per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * kv_dtype.itemsize
            kv_cache_bytes = kv_cache_tokens * per_token
        self.pool = KVPool(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, kv_dtype, model.device,
                           kv_cache_bytes, block_size)
        context = getattr(text, "max_position_embeddings", None) or 4096
        self.max_model_len = min(max_model_len or context, context, self.pool.budget_tokens)
        self.prefix_cache = PrefixCache(self.pool, enable_prefix_caching)
        self.image_cache = ImageEmbeddingCache(image_cache_bytes)
        self.scheduler = Scheduler(self.pool, self.prefix_cache, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model)
        self.sampler = Sampler()
        self.vision_settings = vision_settings(model)
        self.eos_ids = self._eos_ids()
        self.requests: dict[str, Request] = {}
        self._preparing: dict[str, tuple[concurrent.futures.Future, SamplingParams]] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(max(1, preprocess_workers),
                                                               thread_name_prefix="fastllava-preprocess")
        self._pending_outputs: list[RequestOutput] = []
        self.counters = {"steps": 0, "tokens_generated": 0, "prompt_tokens_computed": 0, "requests_finished": 0,
                         "requests_aborted": 0, "requests_failed": 0}

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            ids.extend(generation_config.eos_token_ids())
        elif getattr(self.model.config.text_config, "eos_token_id", None) is not None:
            eos = self.model.config.text_config.eos_token_id
            ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tokenizer_eos is not None and tokenizer_eos not in ids:
            ids.append(tokenizer_eos)
        return ids

    # -- requests --------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Any, sampling_params: SamplingParams | None = None) -> None:
        """Queue a request. Raises ValueError/TypeError for arguments that can never work."""
        request_id = str(request_id)
        if request_id in self.requests or request_id in self._preparing:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: give the engine a processor or a tokenizer")
        settings_for(params, [])  # validates the combination as generate() would
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt and "multi_modal_data" not in prompt:
            self._start(request_id, self._prepare(prompt), params)  # nothing to load: no need for a worker
            return
        if not isinstance(prompt, (str, list, tuple, dict)):
            raise TypeError("a prompt is a conversation (list of messages), a string or a dict with 'prompt' or "
                            f"'prompt_token_ids', got {type(prompt).__name__}")
        if self.processor is None:
            raise ValueError("this engine has no processor: give pre-tokenized prompts ({'prompt_token_ids': ...})")
        self._preparing[request_id] = (self._executor.submit(self._prepare, prompt), params)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its memory; its final output (finish_reason "abort") comes with the next
        step. False if the request is unknown or already finished."""
        request_id = str(request_id)
        preparing = self._preparing.pop(request_id, None)
        if preparing is not None:
            future, params = preparing
            future.cancel()
            self.counters["requests_aborted"] += 1
            self._pending_outputs.append(RequestOutput(
                request_id, [CompletionOutput(index=i, finish_reason="abort") for i in range(params.n)], finished=True))
            return True
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                self.scheduler.abort(seq)
                seq.finish_reason = "abort"
                seq.new_text += seq.detokenizer.take_delta(final=True)
        request.features = None
        self.counters["requests_aborted"] += 1
        self._pending_outputs.append(request.output())
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._preparing or self._pending_outputs)

    # -- preparing inputs (worker threads) ---------------------------------------------------------------------
    def _prepare(self, prompt: Any) -> PreparedPrompt:
        return prepare_prompt(prompt, self.processor, self.model.config, self.vision_settings)

    def _start(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams) -> None:
        length = len(prompt.token_ids)
        if length >= self.max_model_len:
            raise RequestError(
                f"the prompt has {length} tokens ({len(prompt.image_positions)} of them image placeholders) but the "
                f"context is {self.max_model_len} tokens (prompt + generated); shorten the prompt or the conversation"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - length
        if length + max_tokens > self.max_model_len:
            raise RequestError(
                f"the prompt ({length} tokens) plus max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens; lower max_tokens to at most {self.max_model_len - length}"
            )
        stop_ids = ([] if params.ignore_eos else list(self.eos_ids)) + list(params.stop_token_ids or [])
        salt = b"" if self.prefix_cache.enabled else request_id.encode()
        request = Request(request_id, prompt, params, max_tokens, stop_ids, salt)
        request.sequences = [Sequence(request, i, self.tokenizer, self.pool.block_size, self.model.device)
                             for i in range(params.n)]
        self.requests[request_id] = request
        for seq in request.sequences:
            self.scheduler.add(seq)

    def _collect_prepared(self, wait: bool) -> None:
        if not self._preparing:
            return
        if wait:
            concurrent.futures.wait([f for f, _ in self._preparing.values()], timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for request_id, (future, params) in list(self._preparing.items()):
            if not future.done():
                continue
            del self._preparing[request_id]
            try:
                self._start(request_id, future.result(), params)
            except Exception as error:  # noqa: BLE001 - a user's input: fail that request alone
                self._fail(request_id, error)

    def _fail(self, request_id: str, error: BaseException) -> None:
        self.counters["requests_failed"] += 1
        request = self.requests.pop(request_id, None)
        if request is not None:
            for seq in request.sequences:
                if seq.status is not Status.FINISHED:
                    self.scheduler.abort(seq)
            request.features = None
        self._pending_outputs.append(RequestOutput(request_id, [], finished=True, error=error_message(error)))

    def fail_all(self, error: BaseException) -> None:
        """End every admitted request with ``error`` (after a failed step); their memory is freed."""
        for request_id in list(self.requests):
            self._fail(request_id, error)

    # -- the step ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return an output for every request with new tokens, finished or failed."""
        with torch.inference_mode():
            self._collect_prepared(wait=not self.scheduler.has_work())
            chunks = self._with_image_features(self.scheduler.schedule())
            if not chunks and self.scheduler.waiting and not self.scheduler.running:
                # Nothing runs and nothing can start: never spin forever; fail the oldest request instead.
                stuck = self.scheduler.waiting[0].request
                self._fail(stuck.request_id, RequestError(
                    f"request {stuck.request_id!r} cannot be scheduled within kv_cache_bytes="
                    f"{self.pool.budget_bytes}; give the engine more KV memory"))
            touched: dict[str, Request] = {}
            if chunks:
                logits = self.runner.run(chunks)
                self.counters["steps"] += 1
                self._advance(chunks, logits, touched)
        outputs, self._pending_outputs = self._pending_outputs, []
        for request in touched.values():
            outputs.append(request.output())
            if all(seq.status is Status.FINISHED for seq in request.sequences):
                self.requests.pop(request.request_id, None)
                self.counters["requests_finished"] += 1
        return outputs

    def _with_image_features(self, chunks: list[Chunk]) -> list[Chunk]:
        """Encode (or fetch) the images of requests whose chunks reach their placeholders; failures end the request."""
        failed = set()
        for chunk in chunks:
            request = chunk.seq.request
            first, last = chunk.seq.image_rows(chunk.start, chunk.end)
            if last == first or request.features is not None or request.request_id in failed:
                continue
            prompt = request.prompt
            try:
                features = self.image_cache.encode(self.model, prompt.pixel_values, prompt.image_keys)
                if features.shape[0] * features.shape[1] != len(prompt.image_positions):
                    raise RequestError(
                        f"the prompt has {len(prompt.image_positions)} image placeholder tokens but its "
                        f"{features.shape[0]} image(s) give {features.shape[1]} features each; use the processor "
                        "of this model to build the prompt"
                    )
                request.features = features.reshape(-1, features.shape[-1])
            except Exception as error:  # noqa: BLE001 - the image of one request, not the engine
                failed.add(request.request_id)
                self._fail(request.request_id, error)
        return [c for c in chunks if c.seq.request.request_id not in failed]

    def _advance(self, chunks: list[Chunk], logits: torch.Tensor, touched: dict[str, Request]) -> None:
        block = self.pool.block_size
        ready: list[Sequence] = []
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed = seq.kv.length = chunk.end
            self.counters["prompt_tokens_computed"] += max(0, min(chunk.end, seq.num_prompt) - chunk.start)
            self.prefix_cache.register(seq.kv, seq.block_keys(), chunk.end // block)
            if chunk.wants_logits:
                ready.append(seq)
        rows = [SampleRow(settings_for(s.request.params, s.request.stop_ids), s.request.params, s.token_ids,
                          s.num_generated, s.generator) for s in ready]
        for seq, (token, logprob) in zip(ready, self.sampler.choose(logits, rows)):
            self._append(seq, token, logprob)
            touched[seq.request.request_id] = seq.request
        for request in {c.seq.request.request_id: c.seq.request for c in chunks}.values():
            self._maybe_drop_features(request)

    def _append(self, seq: Sequence, token: int, logprob) -> None:
        request, params = seq.request, seq.request.params
        seq.token_ids.append(token)
        seq.new_tokens.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        self.counters["tokens_generated"] += 1
        count = seq.num_generated
        reason = stop_reason = None
        may_stop = count >= params.min_tokens  # vLLM: no stop token or string ends a sequence before min_tokens
        if may_stop and token in (params.stop_token_ids or ()):
            reason, stop_reason = "stop", token
        elif may_stop and not params.ignore_eos and token in self.eos_ids:
            reason = "stop"
        elif count >= request.max_tokens:
            reason = "length"
        stop_string = seq.detokenizer.update(seq.generated, final=reason is not None, check_stop=may_stop)
        if stop_string is not None:
            reason, stop_reason = "stop", stop_string
        if reason is None:
            seq.new_text += seq.detokenizer.take_delta(final=False)
            return
        seq.new_text += seq.detokenizer.take_delta(final=True)
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _maybe_drop_features(self, request: Request) -> None:
        """Features are kept only while some sequence still has image placeholders to compute."""
        if request.features is None:
            return
        last = request.prompt.image_positions[-1]
        if all(s.status is not Status.WAITING and (s.status is Status.FINISHED or s.num_computed > last)
               for s in request.sequences):
            request.features = None

    # -- introspection -------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        pool, prefix, images = self.pool, self.prefix_cache, self.image_cache
        return {
            "num_preparing": len(self._preparing),
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "num_requests": len(self.requests) + len(self._preparing),
            "preemptions": self.scheduler.preemptions,
            **self.counters,
            "kv_cache": {"budget_bytes": pool.budget_bytes, "used_bytes": pool.used_bytes,
                         "cached_bytes": prefix.retired_bytes, "peak_bytes": pool.peak_bytes,
                         "bytes_per_token": pool.bytes_per_token, "block_size": pool.block_size,
                         "dtype": str(pool.dtype).replace("torch.", "")},
            "prefix_cache": {"enabled": prefix.enabled, "hits": prefix.hits, "misses": prefix.misses,
                             "hit_tokens": prefix.hit_tokens, "queried_tokens": prefix.queried_tokens,
                             "cached_blocks": len(prefix.blocks), "evictions": prefix.evictions},
            "image_cache": {"hits": images.hits, "misses": images.misses, "entries": len(images),
                            "bytes": images.bytes, "max_bytes": images.max_bytes},
        }

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
