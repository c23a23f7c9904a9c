"""LlavaProcessor: images + text (or a chat conversation) in, model inputs out, as transformers' LlavaProcessor.

Contract: ``LlavaProcessor(image_processor, tokenizer, patch_size, vision_feature_select_strategy, chat_template,
image_token="<image>", num_additional_image_tokens=0)``. ``processor(images=..., text=...)`` checks that the prompts hold
exactly one ``<image>`` per image (a ``ValueError`` names both counts otherwise), preprocesses the images, expands the
i-th ``<image>`` into ``(H // patch_size) * (W // patch_size) + num_additional_image_tokens`` placeholders (one fewer
with the "default" feature strategy, which drops the CLS feature; H, W = the image's ``pixel_values`` size) and
tokenizes, giving a ``BatchFeature`` of ``input_ids``, ``attention_mask`` and ``pixel_values`` identical to
transformers'. ``apply_chat_template`` renders conversations (single or batched; images inside messages as
``{"type": "image", "url"|"path"|"image"|"base64": ...}`` or OpenAI ``{"type": "image_url", ...}``) and, with
``tokenize=True``, loads those images and runs the processor on the result. ``from_pretrained`` reads every on-disk
layout of llava checkpoints (``processor_config.json`` with the image processor nested, or ``preprocessor_config.json``
beside it; the chat template in ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``) from a
directory or a hub id (local cache first); ``save_pretrained`` writes the transformers 5 layout (or the older hub one).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

from fastllava.batch_feature import BatchFeature
from fastllava.chat_template import (
    normalize_conversations,
    openai_images_to_hf,
    render_chat_template,
    resolve_chat_template,
    template_variables,
)
from fastllava.tokenization import Tokenizer, read_chat_templates, resolve_pretrained_dir, _span_mask, _to_list

__all__ = ["LlavaProcessor", "AutoProcessor"]

# Keyword arguments of a processor call that belong to the tokenizer; everything else goes to the image processor.
_TEXT_KWARGS = frozenset(
    {
        "add_special_tokens", "padding", "truncation", "max_length", "stride", "pad_to_multiple_of", "padding_side",
        "return_attention_mask", "return_offsets_mapping", "return_length", "split_special_tokens",
        "return_token_type_ids", "verbose", "is_split_into_words",
    }
)  # fmt: skip
# Image preprocessing options a LLaVA image processor understands (CLIP/SigLIP/LLaVA fields).
_IMAGE_KWARGS = frozenset(
    {
        "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
        "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad", "pad_size", "input_data_format",
        "data_format", "device", "disable_grouping", "default_to_square",
    }
)  # fmt: skip
_INIT_KEYS = ("patch_size", "vision_feature_select_strategy", "chat_template", "image_token", "num_additional_image_tokens")
_TOKENIZER_OVERRIDES = frozenset({"padding_side", "truncation_side", "model_max_length", "pad_token", "bos_token", "eos_token"})
# Files a processor needs from a hub snapshot (never the weights).
_PROCESSOR_FILE_PATTERNS = ["*.json", "*.jinja", "chat_templates/*.jinja", "*.txt"]
_IMAGE_KEYS = ("image", "url", "path", "base64")  # where a message part may hold its image, in transformers' order


class LlavaProcessor:
    """Wraps a LLaVA image processor and a :class:`~fastllava.tokenization.Tokenizer` into one processor."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Tokenizer | None = None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | dict[str, str] | None = None,
        image_token: str = "<image>",
        num_additional_image_tokens: int = 0,
        **kwargs: Any,
    ):
        if tokenizer is None:
            raise ValueError("LlavaProcessor needs a tokenizer.")
        if kwargs:
            raise TypeError(f"LlavaProcessor got unexpected keyword arguments: {sorted(kwargs)}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.patch_size = patch_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = num_additional_image_tokens
        self.chat_template = chat_template
        # A tokenizer that names its image token (tokenizer_config "image_token") wins, as in transformers.
        self.image_token = getattr(tokenizer, "image_token", None) or image_token

    @property
    def image_token_id(self) -> int | None:
        """Id of the image placeholder token, or None when the tokenizer does not have it as one token."""
        token_id = self.tokenizer.backend_tokenizer.token_to_id(self.image_token)
        return token_id

    @property
    def model_input_names(self) -> list[str]:
        return [*self.tokenizer.model_input_names, "pixel_values"]

    # --- placeholders --------------------------------------------------------------------------------------------------

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholders for one preprocessed image of ``height`` x ``width`` pixels (its ``pixel_values`` size)."""
        if self.patch_size is None:
            raise ValueError(
                "processor.patch_size is not set, so the number of <image> placeholders is unknown. Set it from the "
                "model: processor.patch_size = model.config.vision_config.patch_size (and "
                "processor.vision_feature_select_strategy / num_additional_image_tokens, 1 for CLIP's CLS token)."
            )
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        if self.vision_feature_select_strategy == "default":
            count -= 1  # the "default" strategy drops the CLS feature
        return count

    # --- __call__ ----------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess ``images``, expand each ``<image>`` of ``text`` into its placeholders and tokenize.

        Tokenizer options (``padding``, ``truncation``, ``max_length``, ``padding_side``, ``add_special_tokens``...)
        and image options (``do_pad``, ``size``...) may be given flat, or as ``text_kwargs`` / ``images_kwargs``
        dicts; ``return_tensors`` ("pt"/"np"/None) applies to both. ``return_mm_token_type_ids=True`` adds a mask
        of the image placeholders.
        """
        out, _ = self._process(images, text, videos, audio, kwargs)
        return out

    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        text_kwargs: dict[str, Any] = {}
        image_kwargs: dict[str, Any] = {}
        flags: dict[str, Any] = {}
        common = dict(kwargs.pop("common_kwargs", None) or {})
        nested_text = dict(kwargs.pop("text_kwargs", None) or {})
        nested_images = dict(kwargs.pop("images_kwargs", None) or {})
        for key, value in {**common, **kwargs}.items():
            if key == "return_tensors":
                text_kwargs[key] = image_kwargs[key] = value
            elif key in ("return_mm_token_type_ids", "return_text_replacement_offsets"):
                flags[key] = value
            elif key in _TEXT_KWARGS:
                text_kwargs[key] = value
            elif key in _IMAGE_KWARGS or (self.image_processor is not None and hasattr(self.image_processor, key)):
                image_kwargs[key] = value
            else:
                warnings.warn(f"Keyword argument {key!r} is not a valid argument for this processor and will be ignored.")
        for key, value in nested_text.items():
            if key in kwargs:
                raise ValueError(f"Keyword argument {key} was passed twice: in text_kwargs and as a keyword argument.")
            text_kwargs[key] = value
        for key, value in nested_images.items():
            if key in kwargs:
                raise ValueError(f"Keyword argument {key} was passed twice: in images_kwargs and as a keyword argument.")
            image_kwargs[key] = value
        return text_kwargs, image_kwargs, flags

    def _process(
        self, images: Any, text: Any, videos: Any, audio: Any, kwargs: dict[str, Any]
    ) -> tuple[BatchFeature, list[list[tuple[int, int, int]]]]:
        """The processor call; also returns, per prompt, (original end, new end, gain) of each expanded placeholder."""
        if videos is not None or audio is not None:
            raise ValueError("LlavaProcessor takes images and text only (no videos or audio).")
        if images is None and text is None:
            raise ValueError("You need to provide at least one input to call LlavaProcessor (images or text).")
        if _looks_like_text(images) and text is not None and not _looks_like_text(text):
            images, text = text, images  # called the old way: processor(prompt, image)
        text_kwargs, image_kwargs, flags = self._split_kwargs(dict(kwargs))
        return_tensors = text_kwargs.get("return_tensors", image_kwargs.get("return_tensors"))

        texts: list[str] | None = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(sample, str) for sample in texts):
                raise ValueError("`text` must be a string or a list of strings.")
        flat_images = _flatten_images(images) if images is not None else None

        if texts is not None:
            counts = [sample.count(self.image_token) for sample in texts]
            if flat_images is not None and sum(counts) != len(flat_images):
                raise ValueError(
                    f"The prompts hold {sum(counts)} {self.image_token} token(s) (per prompt: {counts}) but "
                    f"{len(flat_images)} image(s) were passed; put exactly one {self.image_token} in the text for "
                    "each image, in order."
                )
            if flat_images is None and sum(counts):
                raise ValueError(
                    f"Found {sum(counts)} {self.image_token} token(s) in the text but no images were passed."
                )

        data: dict[str, Any] = {}
        replacements: list[str] = []
        if flat_images is not None:
            if self.image_processor is None:
                raise ValueError("This processor has no image processor, so it cannot take images.")
            loaded = [_load_image_source(image) for image in flat_images]
            pixel_values = self.image_processor(loaded, **image_kwargs)["pixel_values"]
            if texts is not None:
                for index in range(len(loaded)):
                    height, width = _spatial_size(pixel_values[index])
                    replacements.append(self.image_token * self.num_image_tokens(height, width))
            data["pixel_values"] = pixel_values

        offsets: list[list[tuple[int, int, int]]] = []
        if texts is not None:
            if replacements and self.image_token_id is None:
                raise ValueError(
                    f"The tokenizer has no single token for {self.image_token!r}; it must be an added token of the "
                    "vocabulary (as in llava checkpoints) so that each placeholder is one token."
                )
            texts, offsets = self._expand(texts, replacements)
            text_inputs = self.tokenizer(texts, **text_kwargs)
            self._check_placeholders(texts, text_inputs)
            if flags.get("return_mm_token_type_ids"):
                image_id = self.image_token_id
                text_inputs["mm_token_type_ids"] = [
                    [1 if token == image_id else 0 for token in row] for row in _to_list(text_inputs["input_ids"])
                ]
                if return_tensors:
                    text_inputs.convert_to_tensors(return_tensors)
            data = {**text_inputs, **data}
        return BatchFeature(data, tensor_type=return_tensors), offsets

    def _expand(self, texts: list[str], replacements: list[str]) -> tuple[list[str], list[list[tuple[int, int, int]]]]:
        """Replace the i-th image token (counting across the batch) by ``replacements[i]``."""
        if not replacements:
            return texts, [[] for _ in texts]
        pattern = re.compile(re.escape(self.image_token))
        queue = iter(replacements)
        expanded, offsets = [], []
        for sample in texts:
            pieces, last, gain, sample_offsets = [], 0, 0, []
            for match in pattern.finditer(sample):
                replacement = next(queue)
                pieces.append(sample[last : match.start()])
                pieces.append(replacement)
                gain += len(replacement) - (match.end() - match.start())
                sample_offsets.append((match.end(), match.end() + gain, gain))
                last = match.end()
            pieces.append(sample[last:])
            expanded.append("".join(pieces))
            offsets.append(sample_offsets)
        return expanded, offsets

    def _check_placeholders(self, texts: list[str], text_inputs: BatchFeature) -> None:
        """Truncation must not cut placeholders: the model needs one per image feature."""
        image_id = self.image_token_id
        if image_id is None:
            return
        rows = _to_list(text_inputs["input_ids"])
        if rows and not isinstance(rows[0], list):
            rows = [rows]
        in_ids = [list(row).count(image_id) for row in rows]
        in_text = [sample.count(self.image_token) for sample in texts]
        if in_ids != in_text:
            raise ValueError(
                f"Mismatch in {self.image_token} token count between text and input_ids: ids={in_ids}, "
                f"text={in_text}. Likely due to truncation='max_length'; disable truncation or increase max_length "
                "(an image needs all its placeholders)."
            )

    # --- chat --------------------------------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None) -> str:
        """The template to render: the argument (a name or a template), the processor's, else the tokenizer's."""
        templates = self.chat_template if self.chat_template is not None else self.tokenizer.chat_template
        return resolve_chat_template(templates, chat_template)

    def apply_chat_template(
        self,
        conversation: Any,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        return_assistant_tokens_mask: bool = False,
        tokenize: bool = False,
        return_tensors: str | None = None,
        return_dict: bool = False,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render a conversation (or a batch of them); with ``tokenize=True`` also load its images and process.

        Returns the prompt string(s); with ``tokenize=True`` the ``input_ids``, or with ``return_dict=True`` the whole
        ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values`` ...; ``.to(device, dtype)`` casts only
        ``pixel_values``). Keyword arguments that the template reads are template variables; the others are
        processor options (like ``processor_kwargs``).
        """
        template = self.get_chat_template(chat_template)
        options = dict(processor_kwargs or {})
        used_by_template = template_variables(template)
        variables = {}
        for key, value in kwargs.items():
            (variables if key in used_by_template else options)[key] = value
        if padding is not False:
            options["padding"] = padding
        if truncation is not None:
            options["truncation"] = truncation
        if max_length is not None:
            options["max_length"] = max_length
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")

        conversations, is_batched = normalize_conversations(conversation)
        conversations = openai_images_to_hf(conversations)
        batch_images = [_images_in_conversation(c) for c in conversations] if tokenize else []

        prompts, spans = render_chat_template(
            conversations,
            template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            return_generation_spans=return_assistant_tokens_mask,
            **{**self.tokenizer.special_tokens_map, **kwargs},
        )
        if not tokenize:
            return prompts if is_batched else prompts[0]

        # A template that writes bos itself must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):
            options["add_special_tokens"] = False
        if return_tensors is not None:
            options["return_tensors"] = return_tensors
        if return_assistant_tokens_mask:
            options["return_offsets_mapping"] = True
        images = options.pop("images", None)
        if images is not None:
            batch_images = [images] if not is_batched else images
        has_images = any(image is not None for row in batch_images for image in row)
        out, replaced = self._process(
            batch_images if has_images else None, prompts if is_batched else prompts[0], None, None, options
        )
        if not return_dict:
            return out["input_ids"]
        if return_assistant_tokens_mask:
            token_offsets = _to_list(out.pop("offset_mapping"))
            masks = []
            for row_offsets, row_spans, row_replaced in zip(token_offsets, spans, replaced):
                ends = [end for end, _, _ in row_replaced]
                gains = [0] + [gain for _, _, gain in row_replaced]

                def shift(char: int) -> int:
                    # characters gained by the placeholders expanded before this position
                    return char + gains[sum(1 for end in ends if end <= char)]

                masks.append(_span_mask(row_offsets, [(shift(a), shift(b)) for a, b in row_spans]))
            out["assistant_masks"] = masks
            if return_tensors:
                out.convert_to_tensors(return_tensors)
        return out

    # --- decoding ----------------------------------------------------------------------------------------------------

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """``tokenizer.batch_decode``."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str | list[str]:
        """``tokenizer.decode``."""
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs: Any) -> Any:
        """Decode generated ids (``skip_special_tokens`` by default), as transformers' pipelines do."""
        return self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    # --- loading and saving ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        backend: str = "torch",
        **kwargs: Any,
    ) -> "LlavaProcessor":
        """Load from a directory or hub id. ``backend``: "torch" (``LlavaImageProcessor``) or "pil".

        Keyword arguments override processor fields (``patch_size``, ``chat_template``...), tokenizer settings
        (``padding_side``...) or image processor fields (``do_pad=True``...).
        """
        directory = resolve_pretrained_dir(
            name_or_path,
            allow_patterns=_PROCESSOR_FILE_PATTERNS,
            required=("tokenizer.json", ("processor_config.json", "preprocessor_config.json")),
            cache_dir=cache_dir,
            revision=revision,
            local_files_only=local_files_only,
            token=token,
        )
        kwargs.pop("trust_remote_code", None)
        if kwargs.pop("use_fast", None) is False:
            backend = "pil"
        files = _ProcessorFiles(directory)
        declared = files.processor_class()
        if declared is not None and declared != "LlavaProcessor":
            raise ValueError(
                f"{name_or_path} declares processor class {declared!r}; fastllava implements LlavaProcessor only "
                "(llava-hf/llava-1.5-*, bakLlava, llava-interleave-* ...)."
            )

        init = {key: files.processor_dict[key] for key in _INIT_KEYS if key in files.processor_dict}
        templates = files.chat_templates()
        if templates is not None and "chat_template" not in init:
            init["chat_template"] = templates
        tokenizer_overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in _TOKENIZER_OVERRIDES}
        for key in _INIT_KEYS:
            if key in kwargs:
                init[key] = kwargs.pop(key)
        image_config = files.image_processor_dict()
        if image_config is None:
            raise OSError(
                f"No image processor configuration in {directory}: expected preprocessor_config.json or an "
                "'image_processor' entry in processor_config.json."
            )
        image_config = {**image_config, **kwargs}  # remaining keyword arguments are image processor fields
        tokenizer = Tokenizer.from_pretrained(directory, **tokenizer_overrides)
        image_processor = _image_processor_class(backend).from_dict(image_config)
        return cls(image_processor, tokenizer, **init)

    def to_dict(self) -> dict[str, Any]:
        """The ``processor_config.json`` content (transformers 5 layout: the image processor nested)."""
        out: dict[str, Any] = {}
        if self.image_processor is not None:
            out["image_processor"] = self.image_processor.to_dict()
        out.update(
            {
                "image_token": self.image_token,
                "num_additional_image_tokens": self.num_additional_image_tokens,
                "patch_size": self.patch_size,
                "processor_class": "LlavaProcessor",
                "vision_feature_select_strategy": self.vision_feature_select_strategy,
            }
        )
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, legacy_format: bool = False, **unused: Any) -> list[str]:
        """Write tokenizer files, the chat template and the processor config.

        Default: the transformers 5 layout (``processor_config.json`` with the image processor nested,
        ``chat_template.jinja``). ``legacy_format=True``: the older hub layout (``preprocessor_config.json``, flat
        ``processor_config.json``, ``chat_template.json``), which transformers 4 reads too.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer._processor_class = "LlavaProcessor"
        written = list(self.tokenizer.save_pretrained(directory))
        config = self.to_dict()
        image_config = config.pop("image_processor", None)
        template = self.chat_template
        if legacy_format:
            if image_config is not None:
                image_config = {**image_config, "processor_class": "LlavaProcessor"}
                written.append(_write_json(directory / "preprocessor_config.json", image_config))
            if isinstance(template, dict):
                raise ValueError("legacy_format=True stores a single chat template; this processor has several.")
            if template is not None:
                (directory / "chat_template.jinja").unlink(missing_ok=True)  # it would shadow the json
                written.append(_write_json(directory / "chat_template.json", {"chat_template": template}))
        else:
            if image_config is not None:
                config = {"image_processor": image_config, **config}
            if template is not None:
                from fastllava.tokenization import _write_chat_templates

                written += _write_chat_templates(directory, template)
        written.append(_write_json(directory / "processor_config.json", config))
        return written

    def __repr__(self) -> str:
        return (
            f"LlavaProcessor(image_processor={self.image_processor!r}, tokenizer={self.tokenizer!r}, "
            f"patch_size={self.patch_size}, vision_feature_select_strategy={self.vision_feature_select_strategy!r}, "
            f"num_additional_image_tokens={self.num_additional_image_tokens}, image_token={self.image_token!r})"
        )


class AutoProcessor:
    """``AutoProcessor.from_pretrained(dir_or_hub_id)`` -> :class:`LlavaProcessor` for llava checkpoints."""

    def __init__(self) -> None:
        raise OSError("AutoProcessor is not instantiable; use AutoProcessor.from_pretrained(path).")

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> LlavaProcessor:
        return LlavaProcessor.from_pretrained(name_or_path, **kwargs)


# --- on-disk layouts ---------------------------------------------------------------------------------------------------


class _ProcessorFiles:
    """The processor-related files of one checkpoint directory, in whichever layout it uses."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.processor_dict = self._json("processor_config.json") or {}
        self.preprocessor_dict = self._json("preprocessor_config.json")

    def _json(self, name: str) -> dict[str, Any] | None:
        path = self.directory / name
        if not path.is_file():
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except json.JSONDecodeError as error:
            raise OSError(f"{path} is not valid JSON: {error}") from error

    def processor_class(self) -> str | None:
        """The declared processor class (processor, image processor, tokenizer config), else from config.json."""
        for data in (self.processor_dict, self.preprocessor_dict, self._json("tokenizer_config.json")):
            if data and data.get("processor_class"):
                return data["processor_class"]
        model_config = self._json("config.json") or {}
        if model_config.get("processor_class"):
            return model_config["processor_class"]
        model_type = model_config.get("model_type")
        if model_type == "llava":
            return "LlavaProcessor"
        if model_type is not None:
            raise ValueError(
                f"{self.directory} holds a {model_type!r} model without a processor config; fastllava's processor is "
                "for llava checkpoints only."
            )
        if self.preprocessor_dict is None and not self.processor_dict:
            raise ValueError(
                f"Unrecognized processing class in {self.directory}: no processor_config.json, "
                "preprocessor_config.json or config.json naming a llava processor."
            )
        return None

    def chat_templates(self) -> str | dict[str, str] | None:
        """Legacy ``chat_template.json`` or ``chat_template.jinja`` (+ ``chat_templates/``), or the processor dict's."""
        if self.processor_dict.get("chat_template") is not None:
            return self.processor_dict["chat_template"]
        legacy = self._json("chat_template.json")
        if legacy is not None:
            if (self.directory / "chat_templates").is_dir():
                raise ValueError(
                    f"{self.directory} has both a legacy chat_template.json and chat_templates/*.jinja files; keep one."
                )
            return legacy["chat_template"]
        return read_chat_templates(self.directory)  # None: the tokenizer's template (tokenizer_config.json) is used

    def image_processor_dict(self) -> dict[str, Any] | None:
        nested = self.processor_dict.get("image_processor")
        if isinstance(nested, dict):
            return dict(nested)
        return dict(self.preprocessor_dict) if self.preprocessor_dict is not None else None


def _image_processor_class(backend: str) -> Any:
    from fastllava import image_processing  # imported here: it pulls in the torch image pipeline

    if backend == "torch":
        return image_processing.LlavaImageProcessor
    if backend == "pil":
        return image_processing.LlavaImageProcessorPil
    raise ValueError(f"backend must be 'torch' or 'pil', got {backend!r}")


def _write_json(path: Path, data: dict[str, Any]) -> str:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return str(path)


# --- images --------------------------------------------------------------------------------------------------------------


def _looks_like_text(value: Any) -> bool:
    """A prompt or a list of prompts (strings that are not image paths/URLs)."""
    if isinstance(value, str):
        return not _is_image_reference(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return any(not _is_image_reference(v) for v in value)
    return False


def _is_image_reference(value: str) -> bool:
    return value.startswith(("http://", "https://", "data:image/", "file://")) or (len(value) < 4096 and os.path.isfile(value))


def _flatten_images(images: Any) -> list[Any]:
    """A single image, a list, a list of lists (one per prompt) or a 4-D batch array/tensor -> flat list, in order."""
    if getattr(images, "ndim", None) == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        flat: list[Any] = []
        for item in images:
            flat.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return flat
    return [images]


def _load_image_source(source: Any) -> Any:
    """Load references (path, URL, bytes, base64) into PIL images; pass arrays, tensors and PIL images through."""
    if isinstance(source, (str, bytes, os.PathLike)):
        from fastllava.image_loading import load_image

        if isinstance(source, str) and not source.startswith(("http://", "https://", "data:")):
            raw = _maybe_base64(source)
            if raw is not None:
                return load_image(raw)
        return load_image(source)
    return source


def _maybe_base64(text: str) -> bytes | None:
    """Raw base64 image data (no ``data:`` prefix), as message parts may carry; None if ``text`` is a path."""
    if len(text) < 64 or os.path.exists(text) or not re.fullmatch(r"[A-Za-z0-9+/=\s]+", text):
        return None
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return None


def _images_in_conversation(conversation: list[dict[str, Any]]) -> list[Any]:
    """Images referenced by the typed parts of a conversation's messages, in order."""
    images: list[Any] = []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                images.extend(part[key] for key in _IMAGE_KEYS if key in part)
    return images


def _spatial_size(pixel_values: Any) -> tuple[int, int]:
    """(height, width) of one image's pixel values, channels first (C, H, W) or last (H, W, C)."""
    shape = tuple(pixel_values.shape)
    if len(shape) != 3:
        raise ValueError(f"Expected one image's pixel values of shape (C, H, W), got {shape}")
    if shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return shape[1], shape[2]
    if shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
        return shape[0], shape[1]
    return shape[1], shape[2]  # ambiguous (tiny images): transformers' processors produce channels first
