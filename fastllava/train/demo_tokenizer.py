"""The demo model's tokenizer: a small byte-level BPE trained on the synthetic generator's text.

Contract. ``build_demo_tokenizer()`` returns a ``tokenizers.Tokenizer`` whose ids 0-4 are the special tokens
``<unk> <s> </s> <pad> <image>`` (in that order, see ``SPECIAL_TOKENS``), whose BPE merges are learned from
``fastllava.train.synthetic_data.text_corpus()`` (every train and held-out phrasing, the answers and the chat
words ``USER:``/``ASSISTANT:``), and which adds ``<s>`` in front when asked for special tokens. It is byte-level,
so any text encodes (no ``<unk>`` ever appears for real text) and ``decode(encode(text))`` gives the text back
exactly. Its pre-tokenizer splits before every space-led word, so ``encode(prompt + " " + answer)`` is
``encode(prompt) + encode(" " + answer)``, which keeps label masking simple. Training is deterministic:
the same corpus gives the same tokenizer.json.

``save_demo_tokenizer(out_dir)`` writes ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` in the layout transformers' ``AutoTokenizer.from_pretrained`` loads as a
``PreTrainedTokenizerFast`` with the same ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)  # ids 0..4


def build_demo_tokenizer(vocab_size: int = 1024, texts: Iterable[str] | None = None,
                         lowercase: bool = False) -> Tokenizer:
    """Train the byte-level BPE on ``texts`` (default: the synthetic generator's whole text corpus).

    ``lowercase=True`` adds a lowercasing normalizer (then decoding no longer restores capitals).
    The vocabulary ends up smaller than ``vocab_size`` when the corpus has no more pairs to merge.
    """
    if texts is None:
        from fastllava.train.synthetic_data import text_corpus

        texts = text_corpus()
    tok = Tokenizer(models.BPE(unk_token=UNK))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    # GPT-2 style split: words keep their leading space, so tokens never straddle a word boundary.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, 1)]),
    ])
    return tok


def save_demo_tokenizer(out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None,
                        model_max_length: int = 2048, chat_template: str | None = None, **build_kwargs) -> Path:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json to ``out_dir``; return the dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_demo_tokenizer(**build_kwargs)
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "extra_special_tokens": {"image_token": IMAGE},
        "added_tokens_decoder": added,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        # Decoding must give the text back exactly: no space clean-up (" ." stays " .").
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                   "additional_special_tokens": [IMAGE]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return out
