"""fastllava: the LLaVA vision-language model family, fast, with the transformers API.

Public names are imported lazily so that ``import fastllava`` stays cheap (no torch model code is loaded until a
class is used) and so that each module can be developed on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "BatchFeature": "fastllava.batch_feature",
    # configs
    "LlavaConfig": "fastllava.config",
    "CLIPVisionConfig": "fastllava.config",
    "SiglipVisionConfig": "fastllava.config",
    "LlamaConfig": "fastllava.config",
    "MistralConfig": "fastllava.config",
    "Qwen2Config": "fastllava.config",
    "AutoConfig": "fastllava.config",
    # models
    "LlavaModel": "fastllava.models.llava",
    "LlavaForConditionalGeneration": "fastllava.models.llava",
    "LlavaCausalLMOutputWithPast": "fastllava.models.llava",
    "AutoModelForImageTextToText": "fastllava.models.llava",
    "AutoModelForVision2Seq": "fastllava.models.llava",
    "CLIPVisionModel": "fastllava.models.clip",
    "SiglipVisionModel": "fastllava.models.siglip",
    # processing
    "LlavaImageProcessor": "fastllava.image_processing",
    "LlavaImageProcessorPil": "fastllava.image_processing",
    "load_image": "fastllava.image_loading",
    "LlavaProcessor": "fastllava.processing",
    "AutoProcessor": "fastllava.processing",
    "AutoTokenizer": "fastllava.tokenization",
    "Tokenizer": "fastllava.tokenization",
    # serving
    "LLM": "fastllava.engine.llm",
    "SamplingParams": "fastllava.engine.types",
    "QuantizationConfig": "fastllava.quantization",
    # generation
    "GenerationConfig": "fastllava.generation.config",
    "TextIteratorStreamer": "fastllava.generation.streaming",
    "TextStreamer": "fastllava.generation.streaming",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastllava' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
