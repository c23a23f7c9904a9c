"""SigLIP vision tower: patch embedding (with bias, no class token), the ViT encoder, post-layernorm and the
attention-pooling head. Module names equal transformers' SiglipVisionTransformer keys.
"""

from __future__ import annotations

import torch
from torch import nn

from fastllava.config import SiglipVisionConfig
from fastllava.models.half_matmul import PatchConv2d
from fastllava.models.vit import VisionEncoder, VisionMLP, VisionOutput


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = PatchConv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, h, w)
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if patches.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(
                f"pixel_values of size {tuple(pixel_values.shape[-2:])} give {patches.shape[1]} patches; "
                f"this tower expects {self.position_embedding.num_embeddings}"
            )
        return patches + self.position_embedding.weight


class SiglipPoolingHead(nn.Module):
    """A learned probe attends over all patches; used for SigLIP's pooled output, not by LLaVA features."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)
        pooled = self.attention(probe, x, x, need_weights=False)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVisionModel(nn.Module):
    config_class = SiglipVisionConfig

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = SiglipPoolingHead(config) if getattr(config, "vision_use_head", True) else None

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def hidden_states_at(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        return self.encoder.hidden_states_at(self.embeddings(pixel_values), layers)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False, **_: object) -> VisionOutput:
        last, _, every, attentions = self.encoder.run(self.embeddings(pixel_values),
                                                      all_hidden_states=output_hidden_states,
                                                      output_attentions=output_attentions)
        last = self.post_layernorm(last)
        return VisionOutput(
            last_hidden_state=last,
            pooler_output=self.head(last) if self.head is not None else None,
            hidden_states=tuple(every) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
