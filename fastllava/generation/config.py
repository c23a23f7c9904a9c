"""GenerationConfig: decoding defaults read from a checkpoint's generation_config.json (transformers' format).

Values given to ``generate()`` override these; fields we do not use are kept and written back.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"


class GenerationConfig:
    defaults: dict[str, Any] = {
        "max_length": 20, "max_new_tokens": None, "min_new_tokens": 0, "do_sample": False,
        "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
        "eos_token_id": None, "pad_token_id": None, "bos_token_id": None, "stop_strings": None,
    }

    def __init__(self, **kwargs: Any):
        for key, value in self.defaults.items():
            setattr(self, key, copy.deepcopy(value))
        kwargs.pop("transformers_version", None)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {key: copy.deepcopy(value) for key, value in vars(self).items() if not key.startswith("_")}

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known fields among kwargs; return the others."""
        unused = {}
        for key, value in kwargs.items():
            if key in self.defaults or hasattr(self, key):
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused

    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def copy(self) -> "GenerationConfig":
        return GenerationConfig(**self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "GenerationConfig":
        path = Path(directory, GENERATION_CONFIG_NAME)
        try:
            return cls(**json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error

    @classmethod
    def from_model_dir(cls, directory: str | os.PathLike, model_config: Any = None) -> "GenerationConfig":
        """The checkpoint's generation_config.json, or defaults from the model config's special tokens."""
        if Path(directory, GENERATION_CONFIG_NAME).is_file():
            return cls.from_pretrained(directory)
        return cls.from_model_config(model_config)

    @classmethod
    def from_model_config(cls, model_config: Any) -> "GenerationConfig":
        text = getattr(model_config, "text_config", model_config)
        return cls(**{key: getattr(text, key, None) for key in ("eos_token_id", "pad_token_id", "bos_token_id")})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        Path(directory, GENERATION_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self.to_dict(), sort_keys=True)}"
