"""LLaVA: vision tower -> feature layer(s) -> select -> projector -> scattered into the text embeddings at the
image placeholder tokens -> text decoder -> lm_head.

``LlavaModel`` and ``LlavaForConditionalGeneration`` follow transformers' forward signature and semantics
(modeling_llava.py is the reference); module names follow its 5.x in-memory layout
(``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastllava.config import CLIPVisionConfig, LlavaConfig, SiglipVisionConfig
from fastllava.models.activations import get_activation
from fastllava.models.half_matmul import Linear
from fastllava.models.clip import CLIPVisionModel
from fastllava.models.init_control import skip_init_on_meta
from fastllava.models.llama import TextModel
from fastllava.models.outputs import ImageFeaturesOutput, LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast
from fastllava.models.pretrained import PreTrainedModel
from fastllava.models.siglip import SiglipVisionModel


def build_vision_tower(config: LlavaConfig) -> nn.Module:
    if isinstance(config.vision_config, CLIPVisionConfig):
        return CLIPVisionModel(config.vision_config)
    if isinstance(config.vision_config, SiglipVisionConfig):
        return SiglipVisionModel(config.vision_config)
    raise ValueError(f"unsupported vision tower {config.vision_config.model_type!r}")


class LlavaMultiModalProjector(nn.Module):
    """Two linear layers mapping (concatenated) vision features to the text model's width."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        width_in = config.vision_config.hidden_size * len(config.vision_feature_layers)
        width = config.text_config.hidden_size
        self.linear_1 = Linear(width_in, width, bias=config.multimodal_projector_bias)
        self.act = get_activation(config.projector_hidden_act)
        self.linear_2 = Linear(width, width, bias=config.multimodal_projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class ImagePlaceholderError(ValueError):
    """The prompt's image placeholder tokens do not match the image features."""


class LlavaModel(PreTrainedModel):
    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = TextModel(config.text_config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def _feature_settings(self, layer: Any, strategy: str | None) -> tuple[list[int], str]:
        layer = self.config.vision_feature_layer if layer is None else layer
        strategy = strategy or self.config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        return ([layer] if isinstance(layer, int) else list(layer)), strategy

    def image_features(self, pixel_values: torch.Tensor, vision_feature_layer: Any = None,
                       vision_feature_select_strategy: str | None = None) -> torch.Tensor:
        """(N_images, C, H, W) pixels -> (N_images, tokens_per_image, text_hidden) projected features."""
        layers, strategy = self._feature_settings(vision_feature_layer, vision_feature_select_strategy)
        selected = self.vision_tower.hidden_states_at(pixel_values, layers)
        if strategy == "default":  # drop the class token
            selected = [h[:, 1:] for h in selected]
        return self.multi_modal_projector(torch.cat(selected, dim=-1))

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer: Any = None,
                           vision_feature_select_strategy: str | None = None, **_: Any) -> ImageFeaturesOutput:
        features = self.image_features(pixel_values, vision_feature_layer, vision_feature_select_strategy)
        return ImageFeaturesOutput(pooler_output=list(features))

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor) -> torch.Tensor:
        """(B, T) bool mask of image placeholder positions; an error naming both counts when they differ."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_tokens = int(mask.sum())
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ImagePlaceholderError(
                f"Image features and image tokens do not match: tokens: {n_tokens}, features: {n_features} "
                f"({image_features.shape[0]} image(s) of {image_features.shape[1]} features each). Each image needs "
                "exactly that many image tokens in input_ids; use the processor to expand <image>."
            )
        return mask

    def embed_inputs(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                     image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features written at the placeholder positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            ids = input_ids
            embeddings = self.get_input_embeddings()
            if self.config.image_token_id >= embeddings.num_embeddings:  # the placeholder id may lie outside the vocab
                ids = input_ids.masked_fill(input_ids == self.config.image_token_id, 0)
            inputs_embeds = embeddings(ids)
        if image_features is not None:
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1),
                                                         image_features.to(inputs_embeds.dtype))
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache: Any = None,
        image_features: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **_: Any,
    ) -> LlavaModelOutputWithPast | tuple:
        past_key_values = past_key_values if past_key_values is not None else cache
        if pixel_values is not None and image_features is None:
            image_features = self.image_features(pixel_values, vision_feature_layer, vision_feature_select_strategy)
        inputs_embeds = self.embed_inputs(input_ids, inputs_embeds, image_features)
        out = self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
        )
        output = LlavaModelOutputWithPast(
            last_hidden_state=out.last_hidden_state, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions, image_hidden_states=image_features,
        )
        return output.to_tuple() if return_dict is False else output


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts label t+1; -100 labels are ignored."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)


class LlavaForConditionalGeneration(PreTrainedModel):
    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        with skip_init_on_meta():
            self.model = LlavaModel(config)
            self.lm_head = Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.generation_config = None
        if not self.lm_head.weight.is_meta:
            self.init_weights()
        self.tie_weights()

    # -- weights
    def init_weights(self) -> None:
        """Random initialisation for training from scratch: transformers' scheme (normal(0, 0.02), zero bias)."""
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.xavier_uniform_(module.in_proj_weight)
                nn.init.zeros_(module.in_proj_bias)
        for name, parameter in self.named_parameters():
            if name.endswith(("class_embedding", "head.probe")):
                nn.init.normal_(parameter, std=std)

    def tied_parameter_names(self) -> set[str]:
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def language_model(self) -> TextModel:
        return self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> LlavaMultiModalProjector:
        return self.model.multi_modal_projector

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer: Any = None,
                           vision_feature_select_strategy: str | None = None, **kwargs: Any) -> ImageFeaturesOutput:
        return self.model.get_image_features(pixel_values, vision_feature_layer, vision_feature_select_strategy)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        image_features: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> LlavaCausalLMOutputWithPast | tuple:
        out = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            image_features=image_features, **kwargs,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        output = LlavaCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states,
            attentions=out.attentions, image_hidden_states=out.image_hidden_states,
        )
        return output.to_tuple() if return_dict is False else output

    # -- generation (the decoding core lives in fastllava.generation)
    def after_load(self, directory: Path) -> None:
        from fastllava.generation.config import GenerationConfig

        self.generation_config = GenerationConfig.from_model_dir(directory, self.config)

    def save_side_files(self, directory: Path) -> None:
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)

    @torch.inference_mode()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        from fastllava.generation.generate import generate

        return generate(self, *args, **kwargs)


class AutoModelForImageTextToText:
    """transformers' auto class for LLaVA checkpoints: resolves to LlavaForConditionalGeneration."""

    @staticmethod
    def from_pretrained(*args: Any, **kwargs: Any) -> LlavaForConditionalGeneration:
        return LlavaForConditionalGeneration.from_pretrained(*args, **kwargs)

    @staticmethod
    def from_config(config: LlavaConfig) -> LlavaForConditionalGeneration:
        return LlavaForConditionalGeneration(config)


AutoModelForVision2Seq = AutoModelForImageTextToText
