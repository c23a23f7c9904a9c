"""CLIP vision tower: patch embedding plus a class token, pre-layernorm, the ViT encoder, post-layernorm.

Module names equal transformers' CLIPVisionTransformer keys (``embeddings.patch_embedding``,
``pre_layrnorm`` [sic], ``encoder.layers.N.*``, ``post_layernorm``) so a checkpoint loads by plain copy.
"""

from __future__ import annotations

import torch
from torch import nn

from fastllava.config import CLIPVisionConfig
from fastllava.models.half_matmul import PatchConv2d
from fastllava.models.vit import VisionEncoder, VisionOutput


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = PatchConv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, h, w)
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if patches.shape[1] + 1 != self.position_embedding.num_embeddings:
            raise ValueError(
                f"pixel_values of size {tuple(pixel_values.shape[-2:])} give {patches.shape[1]} patches; "
                f"this tower expects {self.position_embedding.num_embeddings - 1}"
            )
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1+h*w, C)


class CLIPVisionModel(nn.Module):
    config_class = CLIPVisionConfig

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(pixel_values))

    def hidden_states_at(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Hidden states at the given layer indices, running the encoder only as deep as needed."""
        return self.encoder.hidden_states_at(self.embed(pixel_values), layers)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False, **_: object) -> VisionOutput:
        last, _, every, attentions = self.encoder.run(self.embed(pixel_values), all_hidden_states=output_hidden_states,
                                                      output_attentions=output_attentions)
        return VisionOutput(
            last_hidden_state=last,
            pooler_output=self.post_layernorm(last[:, 0]),
            hidden_states=tuple(every) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
