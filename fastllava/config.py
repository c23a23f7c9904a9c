"""Model configurations read from and written to Hugging Face ``config.json`` files.

Each config is a small class whose attributes carry the Hugging Face field names and defaults, so that a
``config.json`` written by transformers 4.x or 5.x loads unchanged and ours loads in transformers. Fields we do
not know are kept as attributes and written back by ``to_dict``. RoPE settings are normalised into
``rope_parameters`` (the 5.x form) whether the file had that or 4.x's ``rope_theta`` + ``rope_scaling``.
The config says what the architecture is (``model_type``); an unknown one is an error naming the supported ones.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, ClassVar

CONFIG_NAME = "config.json"

# Keys that transformers writes for every config but that mean nothing here; dropped when reading so that
# `to_dict` stays readable, harmless to lose because transformers fills its own defaults back in.
_TRANSFORMERS_BOOKKEEPING = {
    "transformers_version", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path", "output_attentions",
    "_attn_implementation_autoset", "torchscript", "pruned_heads", "add_cross_attention", "tie_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "finetuning_task", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "_commit_hash",
}


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model."""


class BaseConfig:
    """Attributes with Hugging Face names and defaults; unknown keyword arguments are kept as attributes."""

    model_type: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any):
        for key, value in self.defaults.items():
            setattr(self, key, copy.deepcopy(value))
        for key in _TRANSFORMERS_BOOKKEEPING:
            kwargs.pop(key, None)
        kwargs.pop("model_type", None)
        for key, value in kwargs.items():
            setattr(self, key, value)
        self._post_init()

    def _post_init(self) -> None:
        """Derive dependent defaults (e.g. head_dim) once all fields are set."""

    def to_dict(self) -> dict[str, Any]:
        out = {key: copy.deepcopy(value) for key, value in vars(self).items() if not key.startswith("_")}
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseConfig":
        return cls(**copy.deepcopy(data))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------------------
# Vision towers


class VisionConfig(BaseConfig):
    """Common fields of the ViT-style vision towers."""

    has_class_token: ClassVar[bool] = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + (1 if self.has_class_token else 0)


class CLIPVisionConfig(VisionConfig):
    """CLIP ViT: class token, pre-layernorm, quick_gelu. Defaults are transformers' (ViT-B/32, 224 px)."""

    model_type = "clip_vision_model"
    has_class_token = True
    defaults = {
        "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
        "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0,
    }


class SiglipVisionConfig(VisionConfig):
    """SigLIP ViT: no class token, patch embedding with bias, attention-pooling head."""

    model_type = "siglip_vision_model"
    defaults = {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6, "attention_dropout": 0.0, "vision_use_head": True,
    }


# ----------------------------------------------------------------------------------------------------------
# Text decoders: Llama, Mistral and Qwen2 are one decoder with different flags.

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class TextConfig(BaseConfig):
    """Common fields of the decoder-only text models and the normalisation of RoPE settings."""

    def _post_init(self) -> None:
        if getattr(self, "num_key_value_heads", None) is None:
            self.num_key_value_heads = self.num_attention_heads
        if getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_parameters = self._normalise_rope()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    def _normalise_rope(self) -> dict[str, Any]:
        """One dict {rope_type, rope_theta, factor, ...} from either the 4.x or the 5.x config form."""
        params = dict(getattr(self, "rope_parameters", None) or {})
        legacy_scaling = vars(self).pop("rope_scaling", None)
        legacy_theta = vars(self).pop("rope_theta", None)
        if legacy_scaling:
            params = {**legacy_scaling, **params}
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.pop("type", None)
        params.setdefault("rope_type", "default")
        if "rope_theta" not in params:
            params["rope_theta"] = float(legacy_theta if legacy_theta is not None else self.default_rope_theta)
        if params["rope_type"] not in ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_type {params['rope_type']!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if params["rope_type"] != "default" and "factor" not in params:
            raise ConfigError(f"rope_type {params['rope_type']!r} needs a 'factor'")
        return params

    default_rope_theta: ClassVar[float] = 10000.0

    # Flags that make one decoder serve every family.
    @property
    def qkv_bias(self) -> bool:
        return bool(getattr(self, "attention_bias", False))

    @property
    def o_proj_bias(self) -> bool:
        return bool(getattr(self, "attention_bias", False))

    @property
    def mlp_has_bias(self) -> bool:
        return bool(getattr(self, "mlp_bias", False))

    def sliding_windows(self) -> list[int | None]:
        """Per layer: the sliding-window size, or None for full attention."""
        return [None] * self.num_hidden_layers

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # transformers 4.x reads rope_theta/rope_scaling, 5.x reads rope_parameters: write both forms.
        out["rope_theta"] = self.rope_parameters["rope_theta"]
        scaling = {k: v for k, v in self.rope_parameters.items() if k != "rope_theta"}
        out["rope_scaling"] = scaling if scaling.get("rope_type") != "default" else None
        return out


_COMMON_TEXT_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
    "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "attention_dropout": 0.0,
}


class LlamaConfig(TextConfig):
    model_type = "llama"
    defaults = {**_COMMON_TEXT_DEFAULTS, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


class MistralConfig(TextConfig):
    """Mistral: Llama plus a sliding attention window on every layer."""

    model_type = "mistral"
    defaults = {
        **_COMMON_TEXT_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "sliding_window": 4096,
    }

    def sliding_windows(self) -> list[int | None]:
        return [self.sliding_window] * self.num_hidden_layers


class Qwen2Config(TextConfig):
    """Qwen2: bias on q/k/v; an optional sliding window on the layers named in layer_types."""

    model_type = "qwen2"
    defaults = {
        **_COMMON_TEXT_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016,
        "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 28, "layer_types": None, "bos_token_id": None, "eos_token_id": None,
    }

    def _post_init(self) -> None:
        super()._post_init()
        window = self.sliding_window if self.use_sliding_window else None
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if window is not None and i >= self.max_window_layers else "full_attention"
                for i in range(self.num_hidden_layers)
            ]

    @property
    def qkv_bias(self) -> bool:
        return True

    def sliding_windows(self) -> list[int | None]:
        window = self.sliding_window if self.use_sliding_window else None
        return [window if kind == "sliding_attention" else None for kind in self.layer_types]


# ----------------------------------------------------------------------------------------------------------
# Registry and LLaVA

VISION_CONFIGS: dict[str, type[VisionConfig]] = {c.model_type: c for c in (CLIPVisionConfig, SiglipVisionConfig)}
TEXT_CONFIGS: dict[str, type[TextConfig]] = {c.model_type: c for c in (LlamaConfig, MistralConfig, Qwen2Config)}
# Full CLIP/SigLIP configs nest the vision part; llava checkpoints sometimes name them so.
_VISION_ALIASES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def _sub_config(value: Any, registry: dict[str, type], default: BaseConfig, what: str) -> BaseConfig:
    if value is None:
        return default
    if isinstance(value, BaseConfig):
        if value.model_type not in registry:
            raise ConfigError(f"unsupported {what} model_type {value.model_type!r}; supported: {', '.join(registry)}")
        return value
    if not isinstance(value, dict):
        # An object shaped like a transformers config (duck typing: transformers is never imported).
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        else:
            raise ConfigError(f"{what} must be a dict or a config, got {type(value).__name__}")
    value = dict(value)
    model_type = value.get("model_type", default.model_type)
    if what == "vision_config" and model_type in _VISION_ALIASES:
        value = dict(value.get("vision_config", value))
        model_type = _VISION_ALIASES[model_type]
    if model_type not in registry:
        raise ConfigError(
            f"unsupported {what} model_type {model_type!r}; supported: {', '.join(sorted(registry))}"
        )
    return registry[model_type].from_dict(value)


class LlavaConfig(BaseConfig):
    """LLaVA: a vision tower, a two-layer projector, a decoder. Defaults give llava-1.5-7b's shape."""

    model_type = "llava"
    defaults = {
        "image_token_index": 32000, "image_seq_length": 576, "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default", "vision_feature_layer": -2,
        "multimodal_projector_bias": True, "tie_word_embeddings": False,
    }

    def __init__(self, vision_config: Any = None, text_config: Any = None, **kwargs: Any):
        # transformers 5 names the field image_token_id in code and image_token_index on disk.
        if "image_token_id" in kwargs:
            kwargs["image_token_index"] = kwargs.pop("image_token_id")
        self.vision_config = _sub_config(
            vision_config, VISION_CONFIGS,
            CLIPVisionConfig(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336,
                             num_hidden_layers=24, num_attention_heads=16, vocab_size=32000, projection_dim=768),
            "vision_config",
        )
        self.text_config = _sub_config(text_config, TEXT_CONFIGS, LlamaConfig(), "text_config")
        super().__init__(**kwargs)

    def _post_init(self) -> None:
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        layers = self.vision_feature_layers
        depth = self.vision_config.num_hidden_layers
        for layer in layers:
            if not -(depth + 1) <= layer <= depth:
                raise ConfigError(f"vision_feature_layer {layer} is outside the tower's {depth} layers")
        # Older checkpoints keep tie_word_embeddings only in text_config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    @property
    def vision_feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        out.setdefault("architectures", ["LlavaForConditionalGeneration"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlavaConfig":
        data = copy.deepcopy(data)
        model_type = data.get("model_type", "llava")
        if model_type != "llava":
            raise ConfigError(f"unsupported model_type {model_type!r}; supported: llava")
        return cls(data.pop("vision_config", None), data.pop("text_config", None), **data)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> "LlavaConfig":
        from fastllava.weights import resolve_checkpoint

        directory = resolve_checkpoint(path_or_id, **{k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS})
        config = cls.from_dict(read_config_json(directory))
        for key, value in kwargs.items():
            setattr(config, key, value)
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        Path(directory, CONFIG_NAME).write_text(self.to_json_string())


_HUB_KWARGS = {"revision", "cache_dir", "local_files_only", "token"}


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory, CONFIG_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from error


class AutoConfig:
    """Pick the config class from ``model_type``; only LLaVA checkpoints are supported as whole models."""

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **kwargs: Any) -> LlavaConfig:
        return LlavaConfig.from_pretrained(path_or_id, **kwargs)

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> BaseConfig:
        registry = {"llava": LlavaConfig, **VISION_CONFIGS, **TEXT_CONFIGS}
        if model_type not in registry:
            raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(registry))}")
        return registry[model_type](**kwargs)
