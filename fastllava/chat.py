"""ChatSession: a multi-turn conversation about an image that keeps its KV cache between turns.

Each turn renders the whole conversation with the checkpoint's chat template (so the prompt is exactly what
the model was trained on), finds how much of it the cache already holds, rolls the cache back to that common
prefix and prefills only the rest. The image is encoded once, on the turn that first needs it; a later turn
costs only its own new tokens. Decoding runs through the same ``decode_loop`` as ``model.generate``.
"""

from __future__ import annotations

from typing import Any

import torch

from fastllava.generation.config import GenerationConfig
from fastllava.generation.generate import decode_loop, pad_token_for, sampling_settings
from fastllava.generation.session import DecodeSession
from fastllava.generation.stopping import StopStringMatcher


class ChatSession:
    def __init__(self, model, processor, image: Any = None, max_context: int | None = None):
        self.model = model
        self.processor = processor
        self.max_context = max_context or getattr(model.config.text_config, "max_position_embeddings", 4096)
        self.messages: list[dict[str, Any]] = []
        self.image = image
        self.session: DecodeSession | None = None
        self.last_prefill_tokens = 0  # how many tokens the last turn had to prefill (for tests and the CLI)

    def reset(self, image: Any = None) -> None:
        """Forget the conversation (and its cache); optionally switch to another image."""
        self.messages = []
        self.session = None
        if image is not None:
            self.image = image

    def _user_message(self, text: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if self.image is not None and not self.messages:
            content.append({"type": "image", "image": self.image})
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    def ask(self, text: str, generation_config: GenerationConfig | None = None, streamer: Any = None,
            generator: torch.Generator | None = None, **overrides: Any) -> str:
        """Answer one user turn; the answer joins the history."""
        messages = self.messages + [self._user_message(text)]
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        ids = inputs["input_ids"]
        config = (generation_config or self.model.generation_config or GenerationConfig()).copy()
        config.update(**overrides)
        max_new = config.max_new_tokens or 256
        if ids.shape[1] + max_new > self.max_context:
            raise ValueError(
                f"the conversation ({ids.shape[1]} tokens) plus {max_new} new tokens exceeds the model's context of "
                f"{self.max_context}; reset the chat"
            )
        with torch.inference_mode():
            logits = self._prefill(ids, inputs.get("pixel_values"), max_new)
            if streamer is not None:
                streamer.put(ids)
            settings = sampling_settings(config)
            stops = StopStringMatcher(config.stop_strings, getattr(self.processor, "tokenizer", None))
            history = decode_loop(self.session, logits, ids.to(self.model.device), settings, max_new,
                                  pad_token_for(config), stops, generator, streamer)
        new = history[0, ids.shape[1]:].tolist()
        eos = set(settings.eos_token_ids)
        while new and new[-1] in eos:
            new.pop()
        answer = self.processor.decode(new, skip_special_tokens=True).strip()
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return answer

    def _prefill(self, ids: torch.Tensor, pixel_values: torch.Tensor | None, max_new: int) -> torch.Tensor:
        """Reuse the cached prefix of ``ids``; prefill the rest (with the image only if it is in the rest)."""
        wanted = ids[0].tolist()
        image_id = self.model.config.image_token_id
        reuse = self.session.common_prefix(wanted) if self.session is not None else 0
        if reuse == len(wanted):  # the logits of the last token are needed: re-feed it
            reuse -= 1
        if image_id in wanted[reuse:] and image_id in wanted[:reuse]:
            reuse = wanted.index(image_id)  # never split an image's placeholders across the boundary
        if self.session is None or reuse == 0:
            self.session = DecodeSession(self.model, 1, len(wanted) + max_new)
            reuse = 0
        else:
            self.session.truncate(reuse)
        rest = ids[:, reuse:]
        self.last_prefill_tokens = rest.shape[1]
        pixels = pixel_values if image_id in wanted[reuse:] else None
        return self.session.extend(rest, pixel_values=pixels)
