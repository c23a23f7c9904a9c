"""LLM: vLLM's offline API on the engine - many prompts in, one ``RequestOutput`` per prompt out, in order.

Contract::

    from fastllava import LLM, SamplingParams
    llm = LLM("llava-hf/llava-interleave-qwen-0.5b-hf", dtype="bfloat16", quantization=None | "int8" | "int4")
    outs = llm.chat(conversation_or_list_of_them, SamplingParams(max_tokens=64), use_tqdm=True)
    outs = llm.generate(["a prompt", {"prompt": "USER: <image>\\nWhat is it? ASSISTANT:",
                                      "multi_modal_data": {"image": pil_or_path}}], sampling)
    outs[0].outputs[0].text, .token_ids, .finish_reason, .logprobs

A conversation uses ``apply_chat_template``'s message format (image parts by url/path/base64/PIL, OpenAI
``image_url`` parts); ``generate`` takes raw prompts (no chat template), each a string or a dict with
``prompt`` and ``multi_modal_data`` (or pre-tokenized ``prompt_token_ids``), as vLLM does. A list of sampling
parameters gives one per prompt. All prompts go to the engine at once, so they are batched continuously; a
prompt that cannot be served (a bad image, too long) gives an output with ``error`` set instead of stopping
the others. Keyword arguments other than the loading ones (``dtype``, ``quantization``, ``device``) are
``Engine`` options (``max_num_seqs``, ``max_num_batched_tokens``, ``kv_cache_bytes``, ...).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fastllava.engine.engine import Engine
from fastllava.engine.types import RequestOutput, SamplingParams


def load_model_and_processor(model: str, dtype: str | torch.dtype = "auto", quantization: Any = None,
                             device: str | None = None) -> tuple[Any, Any]:
    from fastllava.models.llava import LlavaForConditionalGeneration
    from fastllava.processing import AutoProcessor

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device is not None:
        kwargs["device_map"] = device
    if quantization is not None:  # "int8" | "int4" | a QuantizationConfig: weight-only, applied while loading
        kwargs["quantization_config"] = quantization
    loaded = LlavaForConditionalGeneration.from_pretrained(model, **kwargs)
    return loaded, AutoProcessor.from_pretrained(model)


class LLM:
    def __init__(self, model: str, dtype: str | torch.dtype = "auto", quantization: Any = None,
                 device: str | None = None, **engine_kwargs: Any):
        loaded, processor = load_model_and_processor(model, dtype, quantization, device)
        self.engine = Engine(loaded, processor, **engine_kwargs)
        self._counter = 0

    @classmethod
    def from_model(cls, model, processor, **engine_kwargs: Any) -> "LLM":
        """An LLM over a model and processor already in memory."""
        llm = cls.__new__(cls)
        llm.engine = Engine(model, processor, **engine_kwargs)
        llm._counter = 0
        return llm

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Answer one conversation or a list of them (each a list of messages)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        for conversation in conversations:
            if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
                raise TypeError("chat() takes a conversation (a list of message dicts) or a list of conversations")
        return self._run([list(c) for c in conversations], sampling_params, use_tqdm)

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete raw prompts: strings or {"prompt": str, "multi_modal_data": {"image": ...}} dicts."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[Any], sampling_params: Any, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts; give one or one each")
        ids = []
        for prompt, param in zip(prompts, params):
            self._counter += 1
            request_id = f"llm-{self._counter}"
            self.engine.add_request(request_id, prompt, param)
            ids.append(request_id)
        results: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm and len(prompts) > 1:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(prompts), desc="Processed prompts", dynamic_ncols=True)
        try:
            while len(results) < len(ids):
                wanted = set(ids)
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted and output.request_id not in results:
                        results[output.request_id] = output
                        if progress is not None:
                            progress.update(1)
        except BaseException:
            for request_id in ids:
                if request_id not in results:
                    self.engine.abort(request_id)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [results[request_id] for request_id in ids]
