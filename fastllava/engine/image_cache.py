"""Image-embedding cache: projector outputs keyed by the decoded pixels and the vision settings, LRU in bytes.

Contract: ``image_key(pixel_values_of_one_image, settings)`` is a 16-byte blake2b digest of the preprocessed
pixels (dtype, shape and bytes) and a settings string (feature layer(s), select strategy, model dtype), so the
same picture sent as a path, a URL, base64 or a PIL image hits the same entry, and a change of vision settings
never returns stale features. ``ImageEmbeddingCache.encode(model, pixel_values, keys)`` returns the features of
every image (N, tokens, C), running the vision tower once for all the misses together. ``max_bytes`` bounds
what it keeps (0 disables it); ``hits``/``misses`` count images.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import torch


def image_key(pixels: torch.Tensor, settings: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{settings}|{pixels.dtype}|{tuple(pixels.shape)}".encode())
    h.update(pixels.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if pixels.numel() else b"")
    return h.digest()


def vision_settings(model) -> str:
    config = model.config
    return f"{config.vision_feature_layer}|{config.vision_feature_select_strategy}|{model.dtype}"


class ImageEmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = value
        self.bytes += size

    def encode(self, model, pixel_values: torch.Tensor, keys: Sequence[bytes]) -> torch.Tensor:
        """(N, C, H, W) pixels -> (N, tokens, C_text) features, from the cache where possible."""
        found = [self.get(key) for key in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            pixels = pixel_values[missing].to(model.device)  # the tower casts to its own dtype, as in generate()
            fresh = model.model.image_features(pixels)  # (len(missing), tokens, C)
            for i, features in zip(missing, fresh):
                found[i] = features
                self.put(keys[i], features.clone())
        return torch.stack(found)
