"""Turning what a user sends into engine inputs: token ids, pixel values, image hashes, placeholder positions.

Contract: ``prepare_prompt(prompt, processor, model_config, vision_settings) -> PreparedPrompt`` accepts a
conversation (a list of messages for ``LlavaProcessor.apply_chat_template``, images inside the messages), a plain
string, vLLM's ``{"prompt": str, "multi_modal_data": {"image": image | [images]}}`` or pre-tokenized
``{"prompt_token_ids": ids, "pixel_values": tensor}`` (or with ``multi_modal_data``). It loads and preprocesses
the images, hashes each image's pixels (image_cache.image_key) and checks what the model will need: ids inside
the vocabulary, as many placeholder runs as images. Everything it rejects raises ``RequestError`` (a ValueError
with a message for the user); the engine runs it in worker threads, off the step loop.
"""

from __future__ import annotations

from typing import Any

import torch

from fastllava.engine.image_cache import image_key
from fastllava.engine.request import PreparedPrompt


class RequestError(ValueError):
    """A request that cannot be served as given (bad image, prompt longer than the context...)."""


def _as_list(images: Any) -> list[Any]:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def prepare_prompt(prompt: Any, processor: Any, model_config: Any, vision_settings: str) -> PreparedPrompt:
    pixel_values = None
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        ids = ids.reshape(-1).tolist() if hasattr(ids, "tolist") else list(ids)
        pixel_values = prompt.get("pixel_values")
        images = (prompt.get("multi_modal_data") or {}).get("image")
        if images is not None:
            if processor is None or getattr(processor, "image_processor", None) is None:
                raise RequestError("images need a processor with an image processor")
            pixel_values = processor.image_processor(_as_list(images), return_tensors="pt")["pixel_values"]
    else:
        if isinstance(prompt, dict):
            if "prompt" not in prompt:
                raise RequestError("a dict prompt needs 'prompt' (text) or 'prompt_token_ids'")
            images = (prompt.get("multi_modal_data") or {}).get("image")
            out = processor(images=images, text=prompt["prompt"], return_tensors="pt")
        elif isinstance(prompt, str):
            out = processor(text=prompt, return_tensors="pt")
        else:
            out = processor.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        pixel_values = out.get("pixel_values")
    ids = [int(i) for i in ids]
    if not ids:
        raise RequestError("the prompt is empty")
    image_token = model_config.image_token_id
    vocab = model_config.text_config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab and i != image_token), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the model's vocabulary of {vocab}")
    positions = [i for i, token in enumerate(ids) if token == image_token]
    if pixel_values is None:
        if positions:
            raise RequestError(f"the prompt holds {len(positions)} image placeholder token(s) but no image")
        return PreparedPrompt(ids)
    pixel_values = torch.as_tensor(pixel_values)
    if pixel_values.dim() == 3:
        pixel_values = pixel_values.unsqueeze(0)
    count = pixel_values.shape[0]
    if not positions or len(positions) % count:
        raise RequestError(f"{count} image(s) but {len(positions)} image placeholder tokens in the prompt; each "
                           "image needs its full run of placeholders (use the processor to expand <image>)")
    keys = [image_key(pixel_values[i], vision_settings) for i in range(count)]
    return PreparedPrompt(ids, pixel_values, keys, positions)
