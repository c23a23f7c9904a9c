"""Tiny offline tokenizers and processor directories in the on-disk formats of real LLaVA checkpoints.

Test helper (no network, no hub): builds two tiny tokenizers with the ``tokenizers`` trainers on a small built-in
corpus and writes them the way the real checkpoints ship them, so that fastllava and the transformers oracle read
the very same files:

* ``"llava15"`` — like ``llava-hf/llava-1.5-7b-hf``: a Llama/SentencePiece-style BPE with byte fallback (``▁`` word
  marker, ``<0x00>``..``<0xFF>`` byte pieces), ``<unk>``/``<s>``/``</s>`` at ids 0-2, then the added special tokens
  ``<image>`` and ``<pad>`` right after the base vocabulary, ``tokenizer_class: LlamaTokenizer``, ``legacy: false``,
  ``padding_side: left``, and the real llava-1.5 chat template (``"USER: <image>\\n... ASSISTANT:"``).
* ``"interleave"`` — like ``llava-hf/llava-interleave-qwen-0.5b-hf``: a Qwen2-style byte-level BPE (NFC normalizer,
  Qwen split regex), added tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<image>`` after the base
  vocabulary, ``eos = <|im_end|>``, ``pad = <|endoftext|>``, no bos, ``tokenizer_class: Qwen2Tokenizer`` and the real
  llava-interleave chat template (``"<|im_start|>user <image>\\n...<|im_end|><|im_start|>assistant\\n"``).

Both vocabularies are ~500 tokens (``len(tokenizer) == TOKENIZER_SPECS[style]["len"]``) so tiny models can reuse them;
the ids of the special tokens are in ``TOKENIZER_SPECS``. Building is deterministic and takes milliseconds.

Public helpers:

* ``build_llava15_tokenizer_dir(path, ...) -> Path`` and ``build_interleave_tokenizer_dir(path, ...) -> Path``:
  tokenizer files only (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), hub style.
* ``build_tokenizer_dir(path, style, ...)``: the same, by style name.
* ``image_processor_config(kind, image_size)``: the ``preprocessor_config.json`` dict of a CLIP (llava-1.5) or SigLIP
  (interleave) image processor scaled down to ``image_size``.
* ``save_processor_files(path, style, image_processor_kind, patch_size, image_size, ...) -> Path``: a complete
  processor directory (tokenizer + image processor + processor config + chat template). ``layout="transformers"``
  (default) writes it with transformers' own ``LlavaProcessor.save_pretrained`` (``processor_config.json`` with the
  image processor nested in it, ``chat_template.jinja``); ``layout="hub"`` writes the older layout of the hub
  checkpoints (``preprocessor_config.json`` beside a flat ``processor_config.json``, chat template in
  ``chat_template.json``, ``chat_template.jinja`` or ``tokenizer_config.json`` as ``chat_template_in`` says).
* ``load_oracle_processor(path)`` / ``load_oracle_tokenizer(path)``: the transformers objects reading the same files
  (transformers is imported only there; the builders themselves need only ``tokenizers``).

A full tiny checkpoint is a processor directory plus the model's ``config.json`` and weights in the same folder; the
``image_token_index`` of the model config is ``TOKENIZER_SPECS[style]["image_token_id"]`` and its text ``vocab_size``
should be at least ``TOKENIZER_SPECS[style]["len"]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = [
    "CHAT_TEMPLATES",
    "LLAVA15_CHAT_TEMPLATE",
    "INTERLEAVE_CHAT_TEMPLATE",
    "QWEN_TEXT_CHAT_TEMPLATE",
    "TOKENIZER_SPECS",
    "build_llava15_tokenizer_dir",
    "build_interleave_tokenizer_dir",
    "build_tokenizer_dir",
    "image_processor_config",
    "save_processor_files",
    "load_oracle_processor",
    "load_oracle_tokenizer",
]

# --- chat templates: the text of the real checkpoints' chat_template.json -------------------------------------------

# llava-hf/llava-1.5-7b-hf (and -13b): images first, then text, "USER: " / "ASSISTANT: " role prefixes.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-interleave-qwen-0.5b-hf (and -7b): ChatML-like, role followed by a space, images first.
INTERLEAVE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen1.5-chat's own text template, as found in the tokenizer_config.json of Qwen-based checkpoints.
QWEN_TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATES = {"llava15": LLAVA15_CHAT_TEMPLATE, "interleave": INTERLEAVE_CHAT_TEMPLATE}

# --- the training corpus ---------------------------------------------------------------------------------------------

# Varied English chat/VQA text, digits and punctuation. Accented letters appear only rarely and emoji/CJK never, so
# the byte fallback (llava15) and multi-byte merges (interleave) are exercised by the tests.
CORPUS = [
    "USER: What is shown in this image? ASSISTANT: This image shows a red stop sign on a street corner.",
    "USER: Describe the image in more details. ASSISTANT: A cat is sitting on a mat next to a small dog.",
    "What colour is the car? The car is blue. What color is the sky? The sky is grey and cloudy today.",
    "How many people are there in the picture? There are three people: two adults and one child.",
    "Where is the cat standing? The cat is standing on the table, near the window and the plant.",
    "Is there a bus in the photo? Yes, there is a yellow school bus parked by the road.",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1,000 (one) [two] {three} <four> 'five' \"six\"!",
    "Please answer the question using a single word or phrase. Answer with the option's letter.",
    "The image features a busy city street with tall buildings, cars, trees and people walking.",
    "In the picture you can see a green square, a red circle and a white triangle on a black background.",
    "He said: don't worry, it's fine; we'll go tomorrow -- or maybe the day after... who knows?",
    "Le café est très bon. Naïve résumé.",
    "def main():\n    print('hello world')\n\treturn 0\n",
    "user assistant system image images picture photo describe question answer left right top bottom",
]


def _corpus() -> list[str]:
    return CORPUS * 4


# --- token layout of the two styles ----------------------------------------------------------------------------------

_LLAVA15_BASE = 500  # base vocab: 3 control pieces + 256 byte pieces + trained pieces
_INTERLEAVE_BASE = 500  # base vocab: 256 byte-level characters + merges

TOKENIZER_SPECS: dict[str, dict[str, Any]] = {
    "llava15": {
        "base_vocab_size": _LLAVA15_BASE,
        "len": _LLAVA15_BASE + 2,
        "unk_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "image_token_id": _LLAVA15_BASE,
        "pad_token_id": _LLAVA15_BASE + 1,
    },
    "interleave": {
        "base_vocab_size": _INTERLEAVE_BASE,
        "len": _INTERLEAVE_BASE + 4,
        "bos_token_id": None,
        "pad_token_id": _INTERLEAVE_BASE,  # <|endoftext|>
        "im_start_token_id": _INTERLEAVE_BASE + 1,
        "eos_token_id": _INTERLEAVE_BASE + 2,  # <|im_end|>
        "image_token_id": _INTERLEAVE_BASE + 3,
    },
}


def _added(token_id: int, content: str, special: bool = True) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": not special,
        "special": special,
    }


def _decoder_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key != "id"}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- llava-1.5 (Llama / SentencePiece-style BPE) ---------------------------------------------------------------------


def _train_llama_bpe(base_vocab_size: int) -> tuple[dict[str, int], list[list[str]]]:
    """Train a SentencePiece-like BPE: words start with ▁, merges never cross a word boundary."""
    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size - 256, special_tokens=specials, show_progress=False, min_frequency=2
    )
    trainer_tok.train_from_iterator(_corpus(), trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    # Llama layout: control pieces, then the 256 byte pieces, then the learned pieces in training order.
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [list(m) if isinstance(m, list) else m.split(" ") for m in trained["merges"]]
    if len(vocab) != base_vocab_size:
        raise RuntimeError(f"llava15 tiny vocab has {len(vocab)} pieces, expected {base_vocab_size}")
    return vocab, merges


def build_llava15_tokenizer_dir(
    path: str | os.PathLike,
    *,
    legacy_normalizer: bool = False,
    chat_template_in_config: bool = False,
    image_token_in_config: bool = False,
    padding_side: str = "left",
) -> Path:
    """Write a llava-1.5-style tokenizer (Llama BPE, byte fallback, ``<image>``, ``<pad>``) into ``path``.

    Files: ``tokenizer.json`` (``tokenizers`` serialization: no normalizer, ``Metaspace(prepend_scheme="first")``
    pre-tokenizer, ``<s> $A`` post-processor, Llama decoder), ``tokenizer_config.json`` (``LlamaTokenizer``,
    ``legacy: false``, ``add_bos_token: true``, ``added_tokens_decoder``, ``padding_side``) and
    ``special_tokens_map.json``.

    ``legacy_normalizer=True`` writes the older Llama ``tokenizer.json`` instead (``Prepend("▁")`` +
    ``Replace(" ", "▁")`` normalizer, no pre-tokenizer), which transformers ignores in favour of the
    ``LlamaTokenizer`` pipeline; ``chat_template_in_config`` stores the llava-1.5 template in
    ``tokenizer_config.json``; ``image_token_in_config`` adds ``"image_token": "<image>"`` to it (newer exports).
    Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = TOKENIZER_SPECS["llava15"]
    vocab, merges = _train_llama_bpe(spec["base_vocab_size"])
    added = [
        _added(0, "<unk>"),
        _added(1, "<s>"),
        _added(2, "</s>"),
        _added(spec["image_token_id"], "<image>"),
        _added(spec["pad_token_id"], "<pad>"),
    ]
    if legacy_normalizer:
        normalizer = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }
        pre_tokenizer = None
    else:
        normalizer = None
        pre_tokenizer = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    # Round-trip through the library so that the file is exactly what `tokenizers` itself would write.
    Tokenizer.from_str(json.dumps(tokenizer_json)).save(str(path / "tokenizer.json"))

    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": {str(a["id"]): _decoder_entry(a) for a in added},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": padding_side,
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if chat_template_in_config:
        config["chat_template"] = LLAVA15_CHAT_TEMPLATE
    if image_token_in_config:
        config["image_token"] = "<image>"
    _write_json(path / "tokenizer_config.json", config)
    special = {k: _decoder_entry(a) for k, a in (("bos_token", added[1]), ("eos_token", added[2]), ("unk_token", added[0]))}
    special["pad_token"] = _decoder_entry(added[4])
    _write_json(path / "special_tokens_map.json", special)
    return path


# --- llava-interleave (Qwen2-style byte-level BPE) -------------------------------------------------------------------

# The split regex of Qwen2's tokenizer.json (GPT-4 style, digits one by one).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen_pipeline(tok: Tokenizer) -> None:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def build_interleave_tokenizer_dir(
    path: str | os.PathLike,
    *,
    chat_template_in_config: bool = False,
    text_chat_template_in_config: bool = False,
    padding_side: str | None = None,
) -> Path:
    """Write a llava-interleave-style tokenizer (Qwen2 byte-level BPE + ChatML tokens + ``<image>``) into ``path``.

    Files: ``tokenizer.json`` (NFC, Qwen split regex + ByteLevel, ByteLevel decoder/post-processor, added tokens
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<image>``), ``tokenizer_config.json`` (``Qwen2Tokenizer``,
    ``eos_token: <|im_end|>``, ``pad_token: <|endoftext|>``, ``bos_token: null``, ``added_tokens_decoder``) and
    ``special_tokens_map.json``. ``chat_template_in_config`` stores the interleave template in
    ``tokenizer_config.json``; ``text_chat_template_in_config`` stores Qwen's text-only template there instead.
    ``padding_side=None`` leaves the key out (transformers then pads on the right). Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = TOKENIZER_SPECS["interleave"]
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    _qwen_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=spec["base_vocab_size"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != spec["base_vocab_size"]:
        raise RuntimeError(f"interleave tiny vocab has {tok.get_vocab_size()} tokens, expected {spec['base_vocab_size']}")
    tokenizer_json = json.loads(tok.to_str())
    base = spec["base_vocab_size"]
    added = [
        _added(base, "<|endoftext|>"),
        _added(base + 1, "<|im_start|>"),
        _added(base + 2, "<|im_end|>"),
        _added(base + 3, "<image>"),
    ]
    tokenizer_json["added_tokens"] = added
    # Same BPE flags as Qwen2's file: empty prefix/suffix strings rather than null.
    tokenizer_json["model"].update(
        {"continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False}
    )
    Tokenizer.from_str(json.dumps(tokenizer_json)).save(str(path / "tokenizer.json"))

    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): _decoder_entry(a) for a in added},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "processor_class": "LlavaProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if padding_side is not None:
        config["padding_side"] = padding_side
    if chat_template_in_config:
        config["chat_template"] = INTERLEAVE_CHAT_TEMPLATE
    elif text_chat_template_in_config:
        config["chat_template"] = QWEN_TEXT_CHAT_TEMPLATE
    _write_json(path / "tokenizer_config.json", config)
    _write_json(
        path / "special_tokens_map.json",
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": _decoder_entry(added[2]),
            "pad_token": _decoder_entry(added[0]),
        },
    )
    return path


def build_tokenizer_dir(path: str | os.PathLike, style: str, **kwargs: Any) -> Path:
    """``build_llava15_tokenizer_dir`` or ``build_interleave_tokenizer_dir`` by ``style`` ("llava15"/"interleave")."""
    if style == "llava15":
        return build_llava15_tokenizer_dir(path, **kwargs)
    if style == "interleave":
        return build_interleave_tokenizer_dir(path, **kwargs)
    raise ValueError(f"unknown tokenizer style {style!r}; use 'llava15' or 'interleave'")


# --- image processor and processor directories -----------------------------------------------------------------------


def image_processor_config(kind: str = "clip", image_size: int = 30) -> dict[str, Any]:
    """The ``preprocessor_config.json`` dict of the real checkpoints' image processor, scaled to ``image_size``.

    ``"clip"`` (llava-1.5): resize the shortest edge to ``image_size``, center-crop ``image_size`` square, CLIP
    mean/std. ``"siglip"`` (interleave): resize to ``image_size`` x ``image_size``, mean = std = 0.5, no crop.
    """
    if kind == "clip":
        return {
            "crop_size": {"height": image_size, "width": image_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": image_size},
        }
    if kind == "siglip":
        return {
            "do_convert_rgb": None,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"height": image_size, "width": image_size},
        }
    raise ValueError(f"unknown image processor kind {kind!r}; use 'clip' or 'siglip'")


def save_processor_files(
    path: str | os.PathLike,
    style: str = "llava15",
    image_processor_kind: str | None = None,
    patch_size: int = 6,
    image_size: int = 30,
    *,
    vision_feature_select_strategy: str | None = None,
    num_additional_image_tokens: int | None = None,
    layout: str = "transformers",
    chat_template_in: str = "jinja",
    tokenizer_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write a complete LLaVA processor directory (tokenizer + image processor + processor config + chat template).

    ``style`` picks the tokenizer and chat template ("llava15" or "interleave"); ``image_processor_kind`` defaults to
    "clip" for llava15 and "siglip" for interleave. ``num_additional_image_tokens`` defaults to 1 for CLIP (its CLS
    token) and 0 for SigLIP; ``vision_feature_select_strategy`` to "default" for llava15 and "full" for interleave,
    as in the real checkpoints. With the defaults an image becomes ``(image_size // patch_size) ** 2`` placeholders.

    ``layout="transformers"``: the files transformers 5 writes — built by loading the hub layout with transformers'
    ``AutoProcessor`` and calling its ``save_pretrained`` (``processor_config.json`` with the image processor nested,
    ``chat_template.jinja``, tokenizer files). ``layout="hub"``: the older layout of the llava-hf repos
    (``preprocessor_config.json``, flat ``processor_config.json``, tokenizer files as built) with the chat template in
    ``chat_template_in`` = "json" (legacy ``chat_template.json``, as on the hub), "jinja" (``chat_template.jinja``) or
    "tokenizer_config" (only in ``tokenizer_config.json``; transformers' processor then has no template of its own).
    ``tokenizer_kwargs`` go to the tokenizer builder. Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if image_processor_kind is None:
        image_processor_kind = "clip" if style == "llava15" else "siglip"
    if num_additional_image_tokens is None:
        num_additional_image_tokens = 1 if image_processor_kind == "clip" else 0
    if vision_feature_select_strategy is None:
        vision_feature_select_strategy = "default" if style == "llava15" else "full"
    if layout not in ("transformers", "hub"):
        raise ValueError(f"unknown layout {layout!r}; use 'transformers' or 'hub'")
    if chat_template_in not in ("json", "jinja", "tokenizer_config"):
        raise ValueError(f"unknown chat_template_in {chat_template_in!r}; use 'json', 'jinja' or 'tokenizer_config'")

    target = path if layout == "hub" else path / "_hub_layout"
    tokenizer_kwargs = dict(tokenizer_kwargs or {})
    if chat_template_in == "tokenizer_config" and layout == "hub":
        tokenizer_kwargs["chat_template_in_config"] = True
    build_tokenizer_dir(target, style, **tokenizer_kwargs)
    _write_json(target / "preprocessor_config.json", image_processor_config(image_processor_kind, image_size))
    _write_json(
        target / "processor_config.json",
        {
            "image_token": "<image>",
            "num_additional_image_tokens": num_additional_image_tokens,
            "patch_size": patch_size,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": vision_feature_select_strategy,
        },
    )
    template = CHAT_TEMPLATES[style]
    if layout == "hub" and chat_template_in == "json":
        _write_json(target / "chat_template.json", {"chat_template": template})
    elif layout == "transformers" or chat_template_in == "jinja":
        (target / "chat_template.jinja").write_text(template, encoding="utf-8")

    if layout == "transformers":
        processor = load_oracle_processor(target)
        processor.save_pretrained(str(path))
        _rmtree(target)
    return path


def _rmtree(path: Path) -> None:
    for child in path.iterdir():
        _rmtree(child) if child.is_dir() else child.unlink()
    path.rmdir()


# --- the transformers oracle -----------------------------------------------------------------------------------------


def load_oracle_processor(path: str | os.PathLike, **kwargs: Any) -> Any:
    """transformers' ``AutoProcessor`` on ``path`` (imports transformers; test oracle only)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), **kwargs)


def load_oracle_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """transformers' ``AutoTokenizer`` on ``path`` (imports transformers; test oracle only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)
