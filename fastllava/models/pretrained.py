"""Loading and saving whole models: ``from_pretrained`` and ``save_pretrained`` for fastllava's model classes.

Loading builds the model on the meta device (no memory, no random init), then fills every parameter from the
checkpoint: a zero-copy view of the memory-mapped file when the dtype already matches, a converted copy
(and the source pages released) otherwise. Every expected key must be present once with the right shape;
missing, unexpected or mis-shaped keys are errors that name them. Saving writes the hub key layout, which
transformers 4.x and 5.x both load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastllava.config import LlavaConfig
from fastllava.models.attention import check_attn_implementation
from fastllava.quantization import WeightQuantizer
from fastllava.weights import (
    IGNORED_CHECKPOINT_SUFFIXES,
    CheckpointError,
    CheckpointReader,
    hub_to_internal,
    internal_to_hub,
    resolve_checkpoint,
    save_safetensors,
)

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(set(_DTYPE_NAMES))} or 'auto'")
    return _DTYPE_NAMES[name]


def parse_device_map(device_map: Any) -> torch.device:
    """One device for the whole model: "auto" picks CUDA when present; a {"": device} dict is accepted."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError("fastllava places a model on one device; a device_map spreading layers is not supported")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _checkpoint_dtype(config: LlavaConfig, reader: CheckpointReader) -> torch.dtype:
    """The dtype "auto" means: what config.json declares, else the checkpoint's floating dtype."""
    for source in (config, config.text_config):
        declared = getattr(source, "dtype", None) or getattr(source, "torch_dtype", None)
        if declared:
            return parse_dtype(declared)
    floating = [d for d in reader.dtypes() if d.is_floating_point]
    return max(floating, key=lambda d: torch.finfo(d).bits) if floating else torch.float32


class PreTrainedModel(nn.Module):
    """Base of fastllava's LLaVA classes: config handling, loading, saving, device/dtype properties."""

    config_class = LlavaConfig

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config

    # -- properties users expect from transformers models
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def set_attn_implementation(self, name: str | None) -> None:
        name = check_attn_implementation(name)
        for module in self.modules():
            if hasattr(module, "attn_implementation"):
                module.attn_implementation = name
        self.config._attn_implementation = name

    def gradient_checkpointing_enable(self, **_: Any) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """Hook for subclasses with tied input/output embeddings."""

    # -- loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        config: LlavaConfig | None = None,
        dtype: str | torch.dtype | None = "auto",
        torch_dtype: str | torch.dtype | None = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        quantization_config: Any = None,
        **config_overrides: Any,
    ):
        directory = resolve_checkpoint(path_or_id, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token)
        if config is None:
            config = cls.config_class.from_pretrained(directory)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        reader = CheckpointReader(directory)
        if torch_dtype is not None:  # transformers 4.x spelling
            dtype = torch_dtype
        target_dtype = _checkpoint_dtype(config, reader) if dtype in ("auto", None) else parse_dtype(dtype)
        device = parse_device_map(device_map)
        with torch.device("meta"):
            model = cls(config)
        # Weight-only int8/int4: swaps target modules (still on meta) for quantized ones; None when not asked
        # for and the checkpoint is not a quantized one fastllava saved.
        quantizer = WeightQuantizer.for_load(model, reader, quantization_config)
        model.load_checkpoint(reader, target_dtype, device, quantizer=quantizer)
        model.set_attn_implementation(attn_implementation)
        model.name_or_path = str(path_or_id)
        model.after_load(directory)
        return model.eval()

    def after_load(self, directory: Path) -> None:
        """Hook: read side files (e.g. generation_config.json) after the weights are in."""

    def load_checkpoint(self, reader: CheckpointReader, dtype: torch.dtype, device: torch.device,
                        quantizer: WeightQuantizer | None = None) -> None:
        """Fill every parameter and buffer from the checkpoint; errors name the offending keys.

        With a ``quantizer``, the modules it quantizes expect their full-precision weights, which it quantizes
        one tensor at a time as they come out of the file map (whose pages are then released)."""
        expected = {name: tensor for name, tensor in self.state_dict(keep_vars=True).items()}
        if quantizer is not None:
            expected = quantizer.source_expectations(expected)
        tied = self.tied_parameter_names()
        found: dict[str, str] = {}
        unexpected: list[str] = []
        for key in reader.keys():
            if key.endswith(IGNORED_CHECKPOINT_SUFFIXES):
                continue
            name = hub_to_internal(key)
            if name not in expected:
                unexpected.append(key)
            elif name in found:
                raise CheckpointError(f"checkpoint has two tensors for {name!r}: {found[name]!r} and {key!r}")
            else:
                found[name] = key
        missing = [name for name in expected if name not in found and name not in tied]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:10]}" + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:10]}" + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
            raise CheckpointError(f"checkpoint {reader.directory} does not fit {type(self).__name__}: " + "; ".join(parts))
        for name, key in found.items():
            target = expected[name]
            if reader.shape(key) != tuple(target.shape):
                raise CheckpointError(
                    f"tensor {key!r} has shape {reader.shape(key)} in the checkpoint, the model expects {tuple(target.shape)}"
                )
            tensor = reader.tensor(key)
            if quantizer is not None and quantizer.takes(name):
                quantizer.load(name, tensor, dtype, device)
                del tensor
                reader.release(key)
                continue
            want = dtype if tensor.is_floating_point() else tensor.dtype
            if tensor.dtype != want or tensor.device != device:
                tensor = tensor.to(device=device, dtype=want)
                reader.release(key)
            self._assign(name, tensor)
        self.tie_weights()
        if quantizer is not None:
            quantizer.finish(self)
        if device.type == "cpu" and hasattr(self, "lm_head"):
            from fastllava.models.huge_pages import move_to_huge_pages

            def release(name: str) -> None:
                if name in found:
                    reader.release(found[name])

            move_to_huge_pages(self, release)

    def _assign(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
        else:
            module._buffers[attr] = tensor

    def tied_parameter_names(self) -> set[str]:
        return set()

    # -- saving
    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True, **_: Any) -> None:
        if not safe_serialization:
            raise ValueError("fastllava writes safetensors only (safe_serialization=True)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        self.config.save_pretrained(directory)
        tied = self.tied_parameter_names()
        state = {internal_to_hub(name): tensor for name, tensor in self.state_dict().items() if name not in tied}
        save_safetensors(state, directory, max_shard_size=max_shard_size)
        self.save_side_files(directory)

    def save_side_files(self, directory: Path) -> None:
        """Hook: write side files (e.g. generation_config.json) beside the weights."""
