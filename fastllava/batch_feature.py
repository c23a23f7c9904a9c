"""BatchFeature: the dict of model inputs a processor returns.

A plain ``dict`` subclass with attribute access and ``.to(device, dtype)``. ``.to`` moves every tensor to the
device but casts only floating-point tensors to the dtype, so ``input_ids`` stay integer while
``pixel_values`` become half precision, as in transformers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class BatchFeature(dict):
    """Processor output: ``input_ids``, ``attention_mask``, ``pixel_values`` ... as tensors, arrays or lists."""

    def __init__(self, data: dict[str, Any] | None = None, tensor_type: str | None = None):
        super().__init__(data or {})
        if tensor_type is not None:
            self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error

    def convert_to_tensors(self, tensor_type: str) -> "BatchFeature":
        """Turn every value into a torch tensor ("pt") or numpy array ("np")."""
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {tensor_type!r}")
        for key, value in self.items():
            if tensor_type == "pt" and not isinstance(value, torch.Tensor):
                if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                    value = torch.stack(value)
                self[key] = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
            elif tensor_type == "np" and not isinstance(value, np.ndarray):
                self[key] = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return self

    def to(self, *args: Any, **kwargs: Any) -> "BatchFeature":
        """Move tensors to a device; cast only floating tensors when a dtype is given."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for key, value in self.items():
            if not isinstance(value, torch.Tensor):
                continue
            if dtype is not None and value.is_floating_point():
                self[key] = value.to(device=device, dtype=dtype)
            elif device is not None:
                self[key] = value.to(device=device)
        return self
