"""Tokenizer: a checkpoint's ``tokenizer.json`` + ``tokenizer_config.json`` with transformers' AutoTokenizer behaviour.

Contract: ``Tokenizer.from_pretrained(dir_or_hub_id)`` (also ``AutoTokenizer.from_pretrained``) gives the same token
ids, attention masks, padding, truncation and decoded strings as transformers 5's ``AutoTokenizer`` on the same
files. Like transformers, the encoding pipeline is chosen from the files: a llava checkpoint (``config.json`` with a
model type that transformers maps to its generic tokenizers backend) uses ``tokenizer.json`` as is; otherwise a
``LlamaTokenizer`` or ``Qwen2Tokenizer`` named in ``tokenizer_config.json`` is rebuilt from the vocabulary and merges
with that class's own normalizer/pre-tokenizer/decoder (keeping the file's post-processor), and any other class uses
``tokenizer.json`` as is. Added tokens come from ``added_tokens_decoder`` (or the file), special tokens
(bos/eos/unk/pad/..., extra and model-specific ones such as ``image_token``) from the config, plus
``model_max_length``, ``padding_side``, ``truncation_side``, ``clean_up_tokenization_spaces`` and the chat template
(``chat_template.jinja``, ``chat_templates/*.jinja`` or the config's ``chat_template``). ``__call__`` returns a
``BatchFeature`` of ``input_ids`` and ``attention_mask`` (lists, or "pt"/"np" arrays). Only the ``tokenizers``
library is used; a checkpoint without ``tokenizer.json`` (SentencePiece/vocab files only) is refused with a clear error.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE
from tokenizers import normalizers, Regex

from fastllava.batch_feature import BatchFeature
from fastllava.chat_template import normalize_conversations, render_chat_template, resolve_chat_template

__all__ = ["Tokenizer", "AutoTokenizer", "resolve_pretrained_dir"]

VERY_LARGE_INTEGER = int(1e30)  # "no limit" for model_max_length, as transformers writes it
LARGE_INTEGER = int(1e20)

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Model types of config.json that transformers 5.24 maps to its generic `TokenizersBackend`: for them AutoTokenizer
# loads tokenizer.json as is, whatever `tokenizer_class` the tokenizer config names (llava-family subset + common LLMs).
_AS_IS_MODEL_TYPES = frozenset(
    {
        "llava", "llava_next", "vipllava", "mistral", "mistral3", "ministral", "mixtral", "pixtral", "phi3",
        "phi3_v", "granite", "stablelm", "olmo2", "glm", "glm4", "internlm2", "jamba", "nemotron", "persimmon",
    }
)  # fmt: skip
# Model types whose registered tokenizer class transformers uses even when tokenizer_config names another one.
_FORCED_CLASS_BY_MODEL_TYPE = {"qwen2": "Qwen2Tokenizer"}

# Qwen2Tokenizer's pre-tokenization regex (transformers rebuilds Qwen2 tokenizers with it).
_QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Per tokenizer class: default special tokens and padding side when the config does not give them.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "padding_side": "left"},
    "qwen2": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "as_is": {},
}

# Processor-level files to fetch for a hub id: configs, tokenizer and templates, never weights.
_TOKENIZER_FILE_PATTERNS = ["*.json", "*.jinja", "chat_templates/*.jinja", "*.txt"]


# --- locating files ----------------------------------------------------------------------------------------------------


def resolve_pretrained_dir(
    name_or_path: str | os.PathLike,
    *,
    allow_patterns: Sequence[str] | None = None,
    required: Sequence[str | tuple[str, ...]] = (),
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local directory for ``name_or_path``: the path itself, or the snapshot of a hub id.

    Hub ids are looked up in the local huggingface cache first; only when the cached snapshot is missing or lacks a
    ``required`` file (a name, or a tuple of alternatives) and ``local_files_only`` is False are the files matching
    ``allow_patterns`` downloaded.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise OSError(f"{name_or_path} is a file; give the directory that holds the checkpoint's files.")
    from huggingface_hub import snapshot_download

    def complete(directory: Path) -> bool:
        return all(
            any((directory / name).is_file() for name in ((need,) if isinstance(need, str) else need))
            for need in required
        )

    kwargs = dict(
        repo_id=str(name_or_path),
        allow_patterns=list(allow_patterns) if allow_patterns else None,
        cache_dir=cache_dir,
        revision=revision,
        token=token,
    )
    cached_error: Exception | None = None
    try:
        cached = Path(snapshot_download(local_files_only=True, **kwargs))
        if complete(cached) or local_files_only:
            return cached
    except Exception as error:  # not in the cache
        cached_error = error
        if local_files_only:
            raise OSError(
                f"{name_or_path!r} is neither a local directory nor in the local hub cache (local_files_only=True)."
            ) from error
    try:
        return Path(snapshot_download(**kwargs))
    except Exception as error:
        raise OSError(
            f"Could not find {name_or_path!r}: it is not a local directory and downloading it from the Hugging Face "
            f"hub failed ({type(error).__name__}: {error})."
        ) from (cached_error or error)


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _token_content(value: Any) -> str | None:
    """A special token from a config value: a string, or an AddedToken dict ``{"content": ...}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, AddedToken):
        return value.content
    return str(value)


def _added_token(entry: dict[str, Any] | str, special: bool = True) -> AddedToken:
    if isinstance(entry, str):
        return AddedToken(entry, special=special)
    fields = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
    return AddedToken(entry["content"], **fields)


def read_chat_templates(directory: Path) -> str | dict[str, str] | None:
    """``chat_template.jinja`` plus ``chat_templates/*.jinja``: one string, a name -> template dict, or None."""
    templates: dict[str, str] = {}
    extra_dir = directory / "chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    main = directory / "chat_template.jinja"
    if main.is_file():
        templates["default"] = main.read_text(encoding="utf-8")
    if not templates:
        return None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


def _config_chat_template(value: Any) -> str | dict[str, str] | None:
    # tokenizer_config.json stores several templates as a list of {"name", "template"} dicts.
    if isinstance(value, (list, tuple)):
        return {item["name"]: item["template"] for item in value}
    return value


# --- building the backend the way transformers does --------------------------------------------------------------------


def _pipeline_kind(tokenizer_config: dict[str, Any], model_type: str | None, tokenizer_json_text: str) -> str:
    """Which encoding pipeline transformers' AutoTokenizer ends up with: "as_is", "llama" or "qwen2"."""
    declared = (tokenizer_config.get("tokenizer_class") or "").removesuffix("Fast")
    if model_type in _AS_IS_MODEL_TYPES:
        return "as_is"
    if model_type in _FORCED_CLASS_BY_MODEL_TYPE:
        declared = _FORCED_CLASS_BY_MODEL_TYPE[model_type]
    model = json.loads(tokenizer_json_text).get("model", {})
    if declared == "LlamaTokenizer":
        # Llama-3-style files declare LlamaTokenizer but are byte-level: transformers keeps them as they are.
        if '"ByteLevel"' in tokenizer_json_text or model.get("type") != "BPE":
            return "as_is"
        return "llama"
    if declared == "Qwen2Tokenizer" and model.get("type") == "BPE":
        return "qwen2"
    return "as_is"


def _bpe_vocab_and_merges(tokenizer_json: dict[str, Any]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    if isinstance(vocab, list):
        vocab = {(item[0] if isinstance(item, list) else item): i for i, item in enumerate(vocab)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return vocab, merges


def _build_llama(tokenizer_json: dict[str, Any], config: dict[str, Any]) -> _Backend:
    """transformers' LlamaTokenizer: byte-fallback BPE, Metaspace pre-tokenizer, no normalizer."""
    vocab, merges = _bpe_vocab_and_merges(tokenizer_json)
    backend = _Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    # legacy=True prefixes "▁" after every added token too; legacy=False only at the very start of the text.
    if add_prefix_space:
        prepend_scheme = "always" if config.get("legacy", False) else "first"
    else:
        prepend_scheme = "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _build_qwen2(tokenizer_json: dict[str, Any], config: dict[str, Any]) -> _Backend:
    """transformers' Qwen2Tokenizer: byte-level BPE after NFC and Qwen's split regex."""
    vocab, merges = _bpe_vocab_and_merges(tokenizer_json)
    backend = _Backend(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.decoder = decoders.ByteLevel()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space") or False), use_regex=False),
        ]
    )
    return backend


# --- the tokenizer -----------------------------------------------------------------------------------------------------


class Tokenizer:
    """A fast tokenizer (``tokenizers`` backend) with the transformers tokenizer API used by LLaVA.

    Special tokens are attributes (``tokenizer.eos_token``, ``tokenizer.eos_token_id``, settable); model-specific ones
    from the config (``image_token``...) too. ``padding_side`` ("left"/"right") is a plain settable attribute.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, str | None] | None = None,
        extra_special_tokens: Iterable[str] = (),
        model_specific_special_tokens: dict[str, str] | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        chat_template: str | dict[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        split_special_tokens: bool = False,
        config: dict[str, Any] | None = None,
        name_or_path: str = "",
    ):
        self._backend = backend
        self._special: dict[str, str | None] = {name: None for name in SPECIAL_TOKENS_ATTRIBUTES}
        self._special.update(special_tokens or {})
        self._model_specific: dict[str, str] = dict(model_specific_special_tokens or {})
        self._extra_special: list[str] = [str(t) for t in extra_special_tokens]
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.split_special_tokens = bool(split_special_tokens)
        self.config = dict(config or {})  # the tokenizer_config.json this came from, kept for save_pretrained
        self.name_or_path = name_or_path
        self._processor_class: str | None = self.config.get("processor_class")
        self._pipeline = "as_is"  # which transformers class this pipeline matches (see _pipeline_kind)

    # --- loading -------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> "Tokenizer":
        """Load from a directory or hub id; ``overrides`` replace tokenizer_config entries (e.g. ``padding_side``)."""
        directory = resolve_pretrained_dir(
            name_or_path,
            allow_patterns=_TOKENIZER_FILE_PATTERNS,
            required=("tokenizer.json",),
            cache_dir=cache_dir,
            revision=revision,
            local_files_only=local_files_only,
            token=token,
        )
        overrides.pop("use_fast", None)  # always fast
        overrides.pop("trust_remote_code", None)
        tokenizer_json_path = directory / "tokenizer.json"
        if not tokenizer_json_path.is_file():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise OSError(
                f"No tokenizer.json in {directory} (found: {', '.join(found) or 'nothing'}). fastllava reads tokenizers "
                "only in the `tokenizers` format; convert a SentencePiece/vocab-file tokenizer once with "
                "transformers (AutoTokenizer.from_pretrained(...).save_pretrained(...))."
            )
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        model_type = None
        if (directory / "config.json").is_file():
            model_type = _read_json(directory / "config.json").get("model_type")
        return cls._from_files(directory, tokenizer_json_path, config, model_type, overrides)

    @classmethod
    def _from_files(
        cls,
        directory: Path,
        tokenizer_json_path: Path,
        config: dict[str, Any],
        model_type: str | None,
        overrides: dict[str, Any],
    ) -> "Tokenizer":
        saved_config = copy.deepcopy(config)
        config = {**config, **overrides}
        text = tokenizer_json_path.read_text(encoding="utf-8")
        kind = _pipeline_kind(config, model_type, text)
        as_is = _Backend.from_str(text)
        if kind == "as_is":
            backend = as_is
        else:
            tokenizer_json = json.loads(text)
            backend = _build_llama(tokenizer_json, config) if kind == "llama" else _build_qwen2(tokenizer_json, config)
            # transformers keeps the file's post-processor (e.g. the "<s> $A" template that adds bos).
            backend.post_processor = as_is.post_processor

        # Special tokens: class defaults < tokenizer_config (< special_tokens_map.json for configs of the old format).
        special: dict[str, str | None] = {}
        for name in SPECIAL_TOKENS_ATTRIBUTES:
            if name in config:
                special[name] = _token_content(config[name])
            else:
                special[name] = _CLASS_DEFAULTS[kind].get(name)
        added_decoder = config.get("added_tokens_decoder")
        special_map_path = directory / "special_tokens_map.json"
        extra = config.get("extra_special_tokens")
        if extra is None:
            extra = config.get("additional_special_tokens")
        if added_decoder is None and special_map_path.is_file():
            for name, value in _read_json(special_map_path).items():
                if name in overrides:
                    continue
                if name in SPECIAL_TOKENS_ATTRIBUTES:
                    special[name] = _token_content(value)
                elif name in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                    merged = list(extra or [])
                    for item in value:
                        if _token_content(item) not in [_token_content(e) for e in merged]:
                            merged.append(item)
                    extra = merged
        model_specific: dict[str, str] = {}
        if isinstance(extra, dict):
            model_specific.update({k: _token_content(v) for k, v in extra.items()})
            extra = []
        extra = [_token_content(t) for t in (extra or [])]
        for key, value in config.items():
            if key.endswith("_token") and key not in SPECIAL_TOKENS_ATTRIBUTES and isinstance(value, (str, dict)):
                content = _token_content(value)
                if content is not None:
                    model_specific[key] = content

        # Added tokens, in id order; re-adding a token already known updates its flags (lstrip, special, ...).
        if added_decoder is not None:
            entries = sorted(((int(i), e) for i, e in added_decoder.items()), key=lambda item: item[0])
            to_add = [_added_token(entry) for _, entry in entries]
        else:
            file_tokens = json.loads(text).get("added_tokens", [])
            to_add = [_added_token(entry) for entry in sorted(file_tokens, key=lambda e: e["id"])]
        # Named special tokens missing from both the backend and that list are added as special tokens.
        known = {t.content for t in to_add} | {t.content for t in backend.get_added_tokens_decoder().values()}
        named = {v for v in [*special.values(), *model_specific.values()] if v is not None}
        for value in [*special.values(), *model_specific.values(), *extra]:
            if value is not None and value not in known:
                to_add.append(AddedToken(value, special=True))
                known.add(value)
        for token in to_add:
            if not token.special and token.content in named:
                token.special = True
        if to_add:
            backend.add_tokens(to_add)
        if kind == "qwen2":
            # Qwen2Tokenizer re-adds all its special tokens as special, non-normalized tokens.
            all_special = _unique([*[v for v in special.values() if v], *model_specific.values(), *extra])
            backend.add_tokens([AddedToken(token, special=True) for token in all_special])

        padding_side = config.get("padding_side")
        if padding_side is None and as_is.padding is not None:
            padding_side = as_is.padding.get("direction")
        padding_side = padding_side or _CLASS_DEFAULTS[kind].get("padding_side", "right")

        # A template given by the caller wins, then chat_template.jinja files, then the config's entry.
        chat_template = overrides.get("chat_template") or read_chat_templates(directory)
        if chat_template is None:
            chat_template = _config_chat_template(config.get("chat_template"))
        model_max_length = config.get("model_max_length", config.get("max_len"))
        tokenizer = cls(
            backend,
            special_tokens=special,
            extra_special_tokens=[t for t in extra if t is not None],
            model_specific_special_tokens=model_specific,
            padding_side=padding_side,
            truncation_side=config.get("truncation_side") or "right",
            model_max_length=model_max_length,
            chat_template=chat_template,
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
            split_special_tokens=config.get("split_special_tokens", False),
            config=saved_config,
            name_or_path=str(directory),
        )
        tokenizer._pipeline = kind
        return tokenizer

    # --- special tokens ----------------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found normally: special tokens and their ids.
        if name.startswith("__") or "_special" not in self.__dict__:
            raise AttributeError(name)
        base = name.removesuffix("_ids").removesuffix("_id") if name.endswith(("_id", "_ids")) else name
        if base in SPECIAL_TOKENS_ATTRIBUTES or base in self._model_specific:
            value = self._special.get(base) if base in SPECIAL_TOKENS_ATTRIBUTES else self._model_specific[base]
            if name == base or value is None:
                return value
            return self.convert_tokens_to_ids(value)
        if base == "extra_special_tokens":
            return list(self._extra_special) if name == base else self.convert_tokens_to_ids(self._extra_special)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if "_special" in self.__dict__:
            base = name.removesuffix("_id") if name.endswith("_id") else name
            if base in SPECIAL_TOKENS_ATTRIBUTES or base in self.__dict__.get("_model_specific", {}):
                if name != base and value is not None:
                    value = self.convert_ids_to_tokens(int(value))
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{base} must be a string token (or None), got {value!r}")
                if base in SPECIAL_TOKENS_ATTRIBUTES:
                    self._special[base] = value
                else:
                    self._model_specific[base] = value
                return
        object.__setattr__(self, name, value)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens that are set (``bos_token``, ..., and model-specific ones such as ``image_token``)."""
        out = {name: value for name, value in self._special.items() if value is not None}
        out.update({name: value for name, value in self._model_specific.items() if value is not None})
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        return _unique([*self.special_tokens_map.values(), *self._extra_special])

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    # --- vocabulary --------------------------------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> _Backend:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._backend.get_added_tokens_decoder().items()))

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {token.content: index for index, token in self.added_tokens_decoder.items()}

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if tokens is None:
            return None
        if isinstance(tokens, str):
            index = self._backend.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self._backend.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._backend.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def add_tokens(self, tokens: str | AddedToken | Sequence[str | AddedToken], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (at its end); returns how many were new."""
        if isinstance(tokens, (str, AddedToken)):
            tokens = [tokens]
        if special_tokens:
            return self._backend.add_special_tokens(list(tokens))
        return self._backend.add_tokens(list(tokens))

    # --- encoding ----------------------------------------------------------------------------------------------------

    def _strategies(
        self, padding: Any, truncation: Any, max_length: int | None
    ) -> tuple[str, str | None, int | None]:
        """Normalize (padding, truncation, max_length) as transformers does; returns the padding and truncation modes."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # giving only max_length means truncating to it
        if padding is True or padding == "longest":
            pad_mode = "longest"
        elif padding in (False, None, "do_not_pad"):
            pad_mode = "do_not_pad"
        elif padding == "max_length":
            pad_mode = "max_length"
        else:
            raise ValueError(f"padding must be True/False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation is True:
            trunc_mode: str | None = "longest_first"
        elif truncation in (False, None, "do_not_truncate"):
            trunc_mode = None
        elif truncation in ("longest_first", "only_first", "only_second"):
            trunc_mode = truncation
        else:
            raise ValueError(f"truncation must be True/False or a strategy name, got {truncation!r}")
        if max_length is None:
            if pad_mode == "max_length":
                if self.model_max_length > LARGE_INTEGER:
                    pad_mode = "do_not_pad"
                else:
                    max_length = self.model_max_length
            if trunc_mode is not None:
                if self.model_max_length > LARGE_INTEGER:
                    trunc_mode = None
                else:
                    max_length = self.model_max_length
        if pad_mode != "do_not_pad" and (self.pad_token is None or self.pad_token_id is None):
            raise ValueError(
                "Asking to pad but the tokenizer has no padding token: set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`."
            )
        return pad_mode, trunc_mode, max_length

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        split_special_tokens: bool | None = None,
        **unused: Any,
    ) -> BatchFeature:
        """Tokenize one text or a batch; returns ``input_ids`` and ``attention_mask`` (+ ``offset_mapping``).

        ``padding``: False, True/"longest" or "max_length"; ``padding_side`` overrides ``self.padding_side`` for this
        call. ``truncation``: True/"longest_first" cuts to ``max_length`` (default ``model_max_length``) on
        ``self.truncation_side``. A single string without ``return_tensors`` gives flat lists, otherwise one row per
        text. ``return_tensors``: "pt", "np" or None (lists).
        """
        if isinstance(text, str):
            batched, texts = False, [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            batched, texts = True, list(text)
        else:
            raise ValueError("text must be a string or a list of strings")
        for key, value in unused.items():
            if key == "is_split_into_words" and value:
                raise NotImplementedError("Pre-tokenized input (is_split_into_words=True) is not supported.")
            if key not in ("verbose", "is_split_into_words", "return_token_type_ids"):
                raise TypeError(f"Tokenizer.__call__ got an unexpected keyword argument {key!r}")
        pad_mode, trunc_mode, max_length = self._strategies(padding, truncation, max_length)
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        backend = self._backend
        backend.encode_special_tokens = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        try:
            # The backend pads/truncates exactly like transformers' fast tokenizers (it is what they call).
            if trunc_mode is not None:
                backend.enable_truncation(
                    max_length=max_length, stride=stride, strategy=trunc_mode, direction=self.truncation_side
                )
            else:
                backend.no_truncation()
            if pad_mode != "do_not_pad":
                backend.enable_padding(
                    direction=side,
                    pad_id=self.pad_token_id,
                    pad_type_id=0,
                    pad_token=self.pad_token,
                    length=max_length if pad_mode == "max_length" else None,
                    pad_to_multiple_of=pad_to_multiple_of,
                )
            else:
                backend.no_padding()
            encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        finally:
            backend.no_truncation()
            backend.no_padding()

        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_attention_mask is None or return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_offsets_mapping:
            data["offset_mapping"] = [e.offsets for e in encodings]
        if return_length:
            data["length"] = [len(e.ids) for e in encodings]
        if return_tensors is not None:
            lengths = {len(ids) for ids in data["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(
                    "Cannot make a tensor of sequences of different lengths: pass padding=True (or 'max_length') "
                    "together with return_tensors."
                )
            return BatchFeature(data, tensor_type=return_tensors)
        if not batched:
            data = {key: value[0] for key, value in data.items()}
        return BatchFeature(data)

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None, **kwargs: Any) -> Any:
        """Token ids of one text (a list, or a ``(1, T)`` tensor/array with ``return_tensors``)."""
        return self(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors, **kwargs)["input_ids"]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The token strings of ``text``."""
        self._backend.encode_special_tokens = self.split_special_tokens
        return self._backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def pad(
        self,
        encoded_inputs: dict[str, Any] | list[dict[str, Any]],
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
    ) -> BatchFeature:
        """Pad already tokenized inputs (a dict of lists, or a list of dicts as a DataLoader collate gives)."""
        if isinstance(encoded_inputs, (list, tuple)):
            encoded_inputs = {key: [example[key] for example in encoded_inputs] for key in encoded_inputs[0]}
        encoded = {key: _to_list(value) for key, value in encoded_inputs.items()}
        ids = encoded["input_ids"]
        single = bool(ids) and not isinstance(ids[0], list)
        rows = {key: ([value] if single else value) for key, value in encoded.items()}
        pad_mode, _, max_length = self._strategies(padding, False, max_length)
        if pad_mode == "longest":
            max_length = max((len(r) for r in rows["input_ids"]), default=0)
        side = padding_side or self.padding_side
        want_mask = return_attention_mask is None or return_attention_mask
        if want_mask and "attention_mask" not in rows:
            rows["attention_mask"] = [[1] * len(r) for r in rows["input_ids"]]
        if pad_mode != "do_not_pad" and max_length is not None:
            if pad_to_multiple_of and max_length % pad_to_multiple_of:
                max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
            fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}
            for key, values in rows.items():
                if key not in fill:
                    continue
                for i, row in enumerate(values):
                    extra = [fill[key]] * max(0, max_length - len(row))
                    values[i] = extra + row if side == "left" else row + extra
        out = {key: (value[0] if single else value) for key, value in rows.items()}
        if return_tensors is not None and single:
            out = {key: [value] for key, value in out.items()}
        return BatchFeature(out, tensor_type=return_tensors)

    # --- decoding ----------------------------------------------------------------------------------------------------

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **unused: Any,
    ) -> str | list[str]:
        """Text of a sequence of ids (a batch of sequences gives a list of texts)."""
        ids = _to_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]
        return self._decode_one(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **unused: Any,
    ) -> list[str]:
        """Texts of a batch of id sequences (a 2-D tensor/array or a list of lists)."""
        rows = _to_list(sequences)
        if not rows:
            return []
        if not isinstance(rows[0], list):
            rows = [rows]
        return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in rows]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        # transformers skips this cleanup for BPE models: it is meant for WordPiece and corrupts BPE output.
        if clean_up and type(self._backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    # --- chat --------------------------------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """The template to render: ``chat_template`` (a name or a template), else this tokenizer's own."""
        return resolve_chat_template(self.chat_template, chat_template, tools)

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> Any:
        """Render a conversation (or a batch) with the chat template; tokenize it unless ``tokenize=False``.

        Returns the prompt string(s), or — tokenized, special tokens never added — a ``BatchFeature`` (``return_dict``)
        or the ``input_ids``. ``return_assistant_tokens_mask`` adds ``assistant_masks`` marking the tokens written in
        the template's ``{% generation %}`` blocks. Extra keyword arguments are template variables.
        """
        if not tokenize:
            return_dict = False
        if return_assistant_tokens_mask and not (return_dict and tokenize):
            raise ValueError("return_assistant_tokens_mask=True needs return_dict=True and tokenize=True")
        template = self.get_chat_template(chat_template, tools)
        conversations, is_batched = normalize_conversations(conversation)
        variables = {**self.special_tokens_map, **template_kwargs}
        prompts, spans = render_chat_template(
            conversations,
            template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            return_generation_spans=return_assistant_tokens_mask,
            **variables,
        )
        if not tokenize:
            return prompts if is_batched else prompts[0]
        out = self(
            prompts if is_batched else prompts[0],
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            add_special_tokens=False,
            return_tensors=return_tensors,
            return_offsets_mapping=return_assistant_tokens_mask,
            **(tokenizer_kwargs or {}),
        )
        if not return_dict:
            return out["input_ids"]
        if return_assistant_tokens_mask:
            offsets = _to_list(out.pop("offset_mapping"))
            rows = offsets if (is_batched or return_tensors) else [offsets]
            masks = [_span_mask(row_offsets, row_spans) for row_offsets, row_spans in zip(rows, spans)]
            out["assistant_masks"] = masks if (is_batched or return_tensors) else masks[0]
            if return_tensors:
                out.convert_to_tensors(return_tensors)
        return out

    # --- saving ------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **unused: Any) -> tuple[str, ...]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and the chat template(s) (``chat_template.jinja``).

        The config keeps the loaded entries (so transformers rebuilds the same pipeline) with the current special
        tokens, padding side, limits and ``added_tokens_decoder``.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.pop("chat_template", None)
        for key in ("name_or_path", "tokenizer_file", "special_tokens_map_file", "is_local", "local_files_only"):
            config.pop(key, None)
        config.update({name: value for name, value in self._special.items()})
        config.update(self._model_specific)
        if self._extra_special:
            config["extra_special_tokens"] = list(self._extra_special)
            config.pop("additional_special_tokens", None)
        config["padding_side"] = self.padding_side
        config["truncation_side"] = self.truncation_side
        config["model_max_length"] = self.model_max_length
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        config["split_special_tokens"] = self.split_special_tokens
        config["added_tokens_decoder"] = {
            str(index): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for index, token in self.added_tokens_decoder.items()
        }
        declared = (config.get("tokenizer_class") or "").removesuffix("Fast")
        if not declared or (self._pipeline == "as_is" and declared in ("LlamaTokenizer", "Qwen2Tokenizer")):
            # The file's pipeline is used as it is (e.g. loaded from a llava checkpoint): name the generic class
            # so that transformers (4 and 5) reloads it as it is rather than rebuilding a Llama/Qwen2 pipeline.
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self._processor_class is not None:
            config["processor_class"] = self._processor_class
        written = []
        written += _write_chat_templates(directory, self.chat_template)
        config_path = directory / "tokenizer_config.json"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        tokenizer_path = directory / "tokenizer.json"
        self._backend.save(str(tokenizer_path))
        return (str(config_path), *written, str(tokenizer_path))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)}, "
            f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )


class AutoTokenizer:
    """``AutoTokenizer.from_pretrained(dir_or_hub_id)`` -> :class:`Tokenizer` (every checkpoint uses one class)."""

    def __init__(self) -> None:
        raise OSError("AutoTokenizer is not instantiable; use AutoTokenizer.from_pretrained(path).")

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Tokenizer:
        return Tokenizer.from_pretrained(name_or_path, *args, **kwargs)


# --- helpers -------------------------------------------------------------------------------------------------------------


def _write_chat_templates(directory: Path, chat_template: str | dict[str, str] | None) -> list[str]:
    """``chat_template.jinja`` (+ ``chat_templates/<name>.jinja`` for named templates), as transformers 5 writes."""
    written: list[str] = []
    if chat_template is None:
        return written
    templates = chat_template if isinstance(chat_template, dict) else {"default": chat_template}
    for name, template in templates.items():
        if name == "default":
            path = directory / "chat_template.jinja"
        else:
            extra_dir = directory / "chat_templates"
            extra_dir.mkdir(exist_ok=True)
            path = extra_dir / f"{name}.jinja"
            if path.resolve().parent != extra_dir.resolve():  # a template name must not escape the folder
                raise ValueError(f"Invalid chat template name: {name!r}")
        path.write_text(template, encoding="utf-8")
        written.append(str(path))
    return written


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def _to_list(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_list(v) for v in value]
    return value


def _span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token overlapping a character span (padding and added tokens have empty offsets)."""
    mask = [0] * len(offsets)
    for position, (start, end) in enumerate(offsets):
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            mask[position] = 1
    return mask


def _clean_up_tokenization(text: str) -> str:
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
        (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text
