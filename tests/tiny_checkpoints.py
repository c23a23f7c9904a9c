"""Tiny random LLaVA checkpoints made by transformers (the oracle), for parity tests.

Each family mirrors a real llava-hf architecture at toy size: ``clip_llama`` (llava-1.5), ``clip_mistral``
(a sliding window shorter than the prompts, GQA), ``siglip_qwen2`` (llava-interleave: tied embeddings,
"full" strategy, last layer), ``clip_llama_multilayer`` (a list of feature layers) and RoPE-scaling variants.
``make_checkpoint`` saves with transformers' own ``save_pretrained`` and returns the directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
IMAGE_TOKEN = 127
IMAGE_SIZE = 28
PATCH = 7  # 16 patches per image


def _vision(kind: str, layers: int = 3):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    return CLIPVisionConfig(**common) if kind == "clip" else SiglipVisionConfig(**common)


def _text(kind: str, vocab: int, **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    common.update(extra)
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind](**common)


FAMILIES = {
    "clip_llama": lambda vocab: dict(vision=_vision("clip"), text=_text("llama", vocab),
                                      vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "clip_mistral": lambda vocab: dict(vision=_vision("clip"), text=_text("mistral", vocab, sliding_window=8),
                                        vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "siglip_qwen2": lambda vocab: dict(vision=_vision("siglip"), text=_text("qwen2", vocab, tie_word_embeddings=True),
                                        vision_feature_layer=-1, vision_feature_select_strategy="full",
                                        tie_word_embeddings=True),
    # text widths of several 128-column blocks (int8's pair layout rearranges them)
    "clip_llama_wide": lambda vocab: dict(vision=_vision("clip"), text=_text("llama", vocab, hidden_size=256,
                                                                            intermediate_size=384),
                                           vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "siglip_qwen2_wide": lambda vocab: dict(vision=_vision("siglip"), text=_text(
        "qwen2", vocab, hidden_size=256, intermediate_size=384, tie_word_embeddings=True),
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True),
    "clip_llama_multilayer": lambda vocab: dict(vision=_vision("clip", layers=4), text=_text("llama", vocab),
                                                 vision_feature_layer=[-2, 1], vision_feature_select_strategy="default"),
    "llama_rope_linear": lambda vocab: dict(vision=_vision("clip"), text=_text(
        "llama", vocab, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "llama_rope_dynamic": lambda vocab: dict(vision=_vision("clip"), text=_text(
        "llama", vocab, max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
        vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "llama_rope_llama3": lambda vocab: dict(vision=_vision("clip"), text=_text(
        "llama", vocab, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
        vision_feature_layer=-2, vision_feature_select_strategy="default"),
}


def image_tokens_per_image(family: str) -> int:
    # CLIP adds a class token that "default" drops again; SigLIP has none and uses "full": 16 either way.
    return (IMAGE_SIZE // PATCH) ** 2


def build_hf_model(family: str, vocab: int = VOCAB, image_token: int = IMAGE_TOKEN, seed: int = 0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    spec = FAMILIES[family](vocab)
    config = LlavaConfig(
        vision_config=spec["vision"], text_config=spec["text"], image_token_index=image_token,
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        tie_word_embeddings=spec.get("tie_word_embeddings", False), image_seq_length=image_tokens_per_image(family),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # transformers initialises norms to exactly 1/0; perturb everything so a swapped or skipped weight shows.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def make_checkpoint(directory: Path, family: str, **kwargs) -> Path:
    model = build_hf_model(family, **kwargs)
    model.save_pretrained(directory)
    return directory


def sample_inputs(batch: int = 2, length: int = 30, image_tokens: int = 16, pad: tuple[int, ...] = (0, 5),
                  vocab: int = VOCAB, image_token: int = IMAGE_TOKEN, seed: int = 1):
    """input_ids with one image block per row (left padded by ``pad[i]``), attention mask, pixel values."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 1, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        p = pad[row] if row < len(pad) else 0
        ids[row, :p] = 0
        mask[row, :p] = 0
        ids[row, p + 2: p + 2 + image_tokens] = image_token
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return ids, mask, pixels


FULL_CHECKPOINTS = {
    # name: (model family, tokenizer style)
    "llava15": ("clip_llama", "llava15"),
    "interleave": ("siglip_qwen2", "interleave"),
}


def make_full_checkpoint(directory: Path, name: str, seed: int = 0) -> Path:
    """A complete tiny checkpoint: transformers-made model + processor files (tokenizer, chat template, image
    processor) in one directory, like a llava-hf repo. Images are 28 px with 7 px patches: 16 placeholders."""
    from tiny_tokenizers import TOKENIZER_SPECS, save_processor_files

    family, style = FULL_CHECKPOINTS[name]
    spec = TOKENIZER_SPECS[style]
    model = build_hf_model(family, vocab=spec["len"], image_token=spec["image_token_id"], seed=seed)
    text = model.config.text_config
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(text, key, spec.get(key))
        model.generation_config.__setattr__(key, spec.get(key))
    model.save_pretrained(directory)
    save_processor_files(directory, style, patch_size=PATCH, image_size=IMAGE_SIZE)
    return directory
