"""The transformer encoder shared by the CLIP and SigLIP vision towers (same layer layout and key names).

``VisionEncoder.run`` executes only as many layers as the caller needs and keeps only the hidden states it
asks for, so a LLaVA that reads layer -2 of a 24-layer tower runs 23 layers and holds one extra activation.
Hidden state i is the input of layer i (0 = embeddings), i = num_layers the output of the last layer,
negative i counts from the end as in transformers' ``hidden_states`` tuple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastllava.config import VisionConfig
from fastllava.models.activations import get_activation
from fastllava.models.half_matmul import Linear
from fastllava.models.attention import attend


@dataclass
class VisionOutput:
    """What a vision tower returns: transformers' BaseModelOutputWithPooling fields."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, index: int) -> torch.Tensor:
        return [v for v in (self.last_hidden_state, self.pooler_output, self.hidden_states, self.attentions)
                if v is not None][index]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.q_proj = Linear(config.hidden_size, config.hidden_size)
        self.k_proj = Linear(config.hidden_size, config.hidden_size)
        self.v_proj = Linear(config.hidden_size, config.hidden_size)
        self.out_proj = Linear(config.hidden_size, config.hidden_size)
        self.attn_implementation = "sdpa"

    def forward(self, x: torch.Tensor, return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

        out, weights = attend(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), None,
                              self.attn_implementation, return_weights=return_weights,
                              dropout=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, length, -1)  # (B, N, H*D)
        return self.out_proj(out), weights


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = get_activation(config.hidden_act)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.self_attn(self.layer_norm1(x), return_weights)
        x = x + attn_out
        return x + self.mlp(self.layer_norm2(x)), weights


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def normalise_index(self, index: int) -> int:
        depth = len(self.layers)
        normalised = index + depth + 1 if index < 0 else index
        if not 0 <= normalised <= depth:
            raise IndexError(f"vision feature layer {index} is outside 0..{depth} (or -{depth + 1}..-1)")
        return normalised

    def hidden_states_at(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Hidden states at the given layer indices of embeddings ``x``, running only as deep as needed."""
        deepest = max(self.normalise_index(i) for i in layers)
        _, kept, _, _ = self.run(x, keep=layers, stop_after=deepest)
        return [kept[self.normalise_index(i)] for i in layers]

    def run(
        self,
        x: torch.Tensor,
        keep: list[int] | None = None,
        all_hidden_states: bool = False,
        output_attentions: bool = False,
        stop_after: int | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Run layers up to ``stop_after`` (default: all). Returns the last hidden state computed, the hidden
        states named in ``keep`` by normalised index, all hidden states if asked, and attention weights."""
        wanted = {self.normalise_index(i) for i in (keep or [])}
        depth = len(self.layers) if stop_after is None else stop_after
        kept: dict[int, torch.Tensor] = {}
        every: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        for index in range(depth + 1):
            if index in wanted:
                kept[index] = x
            if all_hidden_states:
                every.append(x)
            if index == depth:
                break
            layer = self.layers[index]
            if self.gradient_checkpointing and self.training:
                x, weights = torch.utils.checkpoint.checkpoint(layer, x, output_attentions, use_reentrant=False)
            else:
                x, weights = layer(x, output_attentions)
            if output_attentions:
                attentions.append(weights)
        return x, kept, every, attentions
