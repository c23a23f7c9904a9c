"""The decoder-only text model behind LLaVA: Llama, Mistral and Qwen2 are one module with config flags.

Differences by family come from the config only: q/k/v (and o) biases, grouped-query attention, a sliding
window per layer, tied embeddings, RoPE scaling. Module names equal transformers' (``embed_tokens``,
``layers.N.self_attn.q_proj``, ``mlp.gate_proj``, ``norm``) so checkpoints load by plain copy.

``forward`` is the transformers-style entry (attention mask, position ids, optional cache);
``run_layers`` is the core (embeddings in, hidden states out) that every caller shares; where keys and values
live is the business of the attention plan it is given (models/attention_plan.py), so training, generate(),
the chat and the serving engine run the same layer code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastllava.config import TextConfig
from fastllava.generation.kv_cache import KVCache
from fastllava.models.activations import get_activation
from fastllava.models.half_matmul import Linear
from fastllava.models.attention import decoder_mask
from fastllava.models.attention_plan import AttentionPlan, DensePlan
from fastllava.models.fused_ops import joint_product, pointwise_ops_apply
from fastllava.models.rope import apply_rotary, rotary_cos_sin


# The C++ gated SiLU (AVX2) saves an op on AVX2 CPUs; where PyTorch runs AVX-512 its own silu and mul are faster
# (measured, one thread, bf16 x 2816: 8 vs 5 us at 1 row, 2.5 vs 1.8 ms at 757 rows).
SILU_MUL_KERNEL_FASTER = not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and pointwise_ops_apply(x, self.weight):  # one op (models/fused_ops.py)
            return torch.ops.fastllava.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 and cast back before the weight, as the reference does, so bf16 logits match.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class DecoderAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=config.o_proj_bias)
        self.attn_implementation = "sdpa"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = x.shape
        projected = joint_product(self, ("q_proj", "k_proj", "v_proj"), x)  # one product when it can be
        q, k, v = projected if projected is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos.dtype == q.dtype and pointwise_ops_apply(q):  # in place: q and k are this call's own tensors
            torch.ops.fastllava.rotary_(q, cos, sin)
            torch.ops.fastllava.rotary_(k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, weights = plan.attend(self.layer_index, q, k, v, self.attn_implementation, return_weights,
                                   self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, length, -1)  # (B, T, H*D)
        return self.o_proj(out), weights


class DecoderMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        bias = config.mlp_has_bias
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is F.silu and pointwise_ops_apply(x):  # gate/up as one product (models/fused_ops.py)
            projected = joint_product(self, ("gate_proj", "up_proj"), x)
            gate, up = projected if projected is not None else (self.gate_proj(x), self.up_proj(x))
            if SILU_MUL_KERNEL_FASTER:  # the gated SiLU as one op
                return self.down_proj(torch.ops.fastllava.silu_mul(gate, up))
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DecoderMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.self_attn(self.input_layernorm(x), cos, sin, plan, return_weights)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), weights


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class TextModel(nn.Module):
    """Embeddings, decoder layers and the final norm (transformers' LlamaModel / MistralModel / Qwen2Model)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sliding_windows = config.sliding_windows()
        self.gradient_checkpointing = False

    def layer_masks(self, query_slots: torch.Tensor, key_valid: torch.Tensor) -> list[torch.Tensor]:
        """One mask per layer, built once per distinct window size."""
        by_window = {w: decoder_mask(query_slots, key_valid, w) for w in set(self.sliding_windows)}
        return [by_window[w] for w in self.sliding_windows]

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan,
                   output_hidden_states: bool = False, output_attentions: bool = False):
        """The core: (B, T, C) embeddings -> (B, T, C) normed hidden states; the plan stores and reads K/V."""
        every, attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                every.append(x)
            if self.gradient_checkpointing and self.training:
                x, weights = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, plan, output_attentions,
                                                               use_reentrant=False)
            else:
                x, weights = layer(x, cos, sin, plan, output_attentions)
            if output_attentions:
                attentions.append(weights)
        x = self.norm(x)
        if output_hidden_states:
            every.append(x)
        return x, every, attentions

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **_: object,
    ) -> DecoderOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        cache = past_key_values
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(
                f"past_key_values must be the fastllava KVCache a previous call returned, got {type(cache).__name__}"
            )
        if cache is None and use_cache:
            cache = KVCache.for_config(self.config, batch, length, inputs_embeds.dtype, device)
        past = cache.length if cache is not None else 0
        total = past + length
        if position_ids is None:
            position_ids = torch.arange(past, total, device=device).unsqueeze(0).expand(batch, -1)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, total):
                raise ValueError(
                    f"attention_mask must have shape (batch, past + new tokens) = {(batch, total)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            key_valid = attention_mask.to(device=device, dtype=torch.bool)
        else:
            key_valid = None

        slots = torch.arange(past, total, device=device)
        if cache is not None:
            cache.reserve(length)
            if key_valid is None:
                cache.valid[:, past:total] = True
            else:
                cache.valid[:, :total] = key_valid
            key_valid = cache.valid[:, :total]
            cache.length = total
        # No padding, nothing cached, no window: SDPA's own causal path (no mask tensor; measured 0.64 s against
        # 1.03 s with an explicit 757x757 mask over 24 layers of a bf16 prefill on an AVX512-BF16 CPU).
        every_key_valid = key_valid is None or bool(key_valid.all())
        plain_causal = every_key_valid and past == 0 and all(w is None for w in self.sliding_windows)
        masks = [None] * len(self.layers) if plain_causal else self.layer_masks(
            slots, key_valid if key_valid is not None else torch.ones(batch, total, dtype=torch.bool, device=device)
        )
        cos, sin = rotary_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        plan = DensePlan(masks, cache, slots, total)
        hidden, every, attentions = self.run_layers(inputs_embeds, cos, sin, plan, output_hidden_states,
                                                    output_attentions)
        return DecoderOutput(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=tuple(every) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
