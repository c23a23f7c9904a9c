"""Rotary position embeddings with the scaling types real checkpoints use: default, linear, dynamic, llama3.

``inverse_frequencies`` follows the published formulas (and transformers' choices of dtype, so logits match);
``rotary_cos_sin`` turns position ids (B, T) into cos/sin tables (B, T, D) and ``apply_rotary`` rotates q or k.
Dynamic NTK scaling depends on the longest position seen in the call, so it is recomputed per forward.
"""

from __future__ import annotations

import math

import torch

from fastllava.config import TextConfig


def inverse_frequencies(config: TextConfig, seq_len: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies for the config's rope type; seq_len matters only for "dynamic"."""
    params = config.rope_parameters
    dim = int(config.head_dim * params.get("partial_rotary_factor", 1.0))
    base = params["rope_theta"]
    rope_type = params["rope_type"]
    if rope_type == "dynamic":
        length = max(seq_len or 0, config.max_position_embeddings)
        factor = params["factor"]
        base = base * ((factor * length / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, params)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by factor, blend smoothly in between."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_cos_sin(
    config: TextConfig, position_ids: torch.Tensor, dtype: torch.dtype, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, D) in ``dtype`` for position ids (B, T); the angles are computed in fp32."""
    if inv_freq is None:
        seq_len = int(position_ids.max()) + 1 if config.rope_parameters["rope_type"] == "dynamic" else None
        inv_freq = inverse_frequencies(config, seq_len, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    return x * cos + rotate_half(x) * sin
