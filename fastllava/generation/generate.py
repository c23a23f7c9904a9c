"""``model.generate(**inputs, ...)``: transformers' generate() contract on the shared decoding core.

Returns the prompt ids followed by the new ids (B, T + N), like transformers. Greedy decoding reproduces
transformers' tokens exactly; sampling is reproducible from ``seed`` or a ``generator``. Rows that finished
(end-of-sequence token or stop string) are padded with ``pad_token_id`` while the others continue.
"""

from __future__ import annotations

from typing import Any

import torch

from fastllava.generation.config import GenerationConfig
from fastllava.generation.sampling import SamplingSettings, choose_tokens, process_scores
from fastllava.generation.session import DecodeSession
from fastllava.generation.stopping import StopStringMatcher

_IGNORED_MODEL_KWARGS = {"image_sizes", "token_type_ids", "use_cache", "return_dict_in_generate", "output_scores"}


def resolve_generation_config(model, generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    config = base.copy()
    config.update(**{k: v for k, v in kwargs.items() if k in GenerationConfig.defaults})
    return config


def sampling_settings(config: GenerationConfig) -> SamplingSettings:
    """The per-step token-choice settings of a generation config, validated."""
    settings = SamplingSettings(
        do_sample=bool(config.do_sample),
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_k=config.top_k,
        top_p=float(config.top_p if config.top_p is not None else 1.0),
        repetition_penalty=float(config.repetition_penalty or 1.0),
        min_new_tokens=int(config.min_new_tokens or 0),
        eos_token_ids=config.eos_token_ids(),
    )
    settings.validate()
    return settings


def pad_token_for(config: GenerationConfig) -> int:
    eos_ids = config.eos_token_ids()
    return config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)


def generate(
    model,
    input_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer: Any = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    vision_feature_layer: Any = None,
    vision_feature_select_strategy: str | None = None,
    compile: bool | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """See the module docstring. ``compile`` runs the decode step through torch.compile (default: the
    FASTLLAVA_COMPILE environment switch); eager and compiled give the same tokens."""
    if input_ids is None:
        raise ValueError("generate() needs input_ids (use the processor to build them)")
    settings_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in GenerationConfig.defaults}
    for key in list(kwargs):
        if key in _IGNORED_MODEL_KWARGS:
            kwargs.pop(key)
    if kwargs:
        raise TypeError(f"generate() got unexpected arguments: {sorted(kwargs)}")
    config = resolve_generation_config(model, generation_config, settings_kwargs)
    pad_id = pad_token_for(config)
    prompt_len = input_ids.shape[1]
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    elif "max_length" not in settings_kwargs and config.max_length == GenerationConfig.defaults["max_length"]:
        max_new = config.max_length  # transformers: the untouched default of 20 means 20 *new* tokens
    else:
        max_new = config.max_length - prompt_len
    if max_new <= 0:
        raise ValueError(
            f"nothing to generate: the prompt has {prompt_len} tokens and max_length is {config.max_length}; "
            "pass max_new_tokens"
        )
    settings = sampling_settings(config)
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    stops = StopStringMatcher(config.stop_strings, tokenizer)
    max_positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if max_positions and prompt_len + max_new > max_positions and model.config.text_config.rope_parameters["rope_type"] != "dynamic":
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's context of "
            f"{max_positions} positions"
        )

    session = DecodeSession(model, input_ids.shape[0], prompt_len + max_new, compile=compile)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = session.extend(input_ids, attention_mask, pixel_values,
                            vision_feature_layer=vision_feature_layer,
                            vision_feature_select_strategy=vision_feature_select_strategy)
    return decode_loop(session, logits, input_ids.to(model.device), settings, max_new, pad_id, stops, generator,
                       streamer)


def decode_loop(session: DecodeSession, logits: torch.Tensor, history: torch.Tensor, settings: SamplingSettings,
                max_new: int, pad_id: int, stops: StopStringMatcher, generator: torch.Generator | None = None,
                streamer: Any = None) -> torch.Tensor:
    """Choose, emit and feed back tokens until every row ends or ``max_new`` tokens exist.

    ``logits`` are those after the prompt (B, V); ``history`` (B, T) is what the repetition penalty looks at.
    Returns ``history`` with the new tokens appended. The last token is not fed to the cache (nothing needs
    its successor); a chat's next turn re-feeds it with the new prompt.
    """
    batch = history.shape[0]
    eos_ids = set(settings.eos_token_ids)
    unfinished = [True] * batch
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    # The per-step bookkeeping is Python on the token ids (one tolist a step), not tensor ops: after a step has
    # streamed the weights through the caches, each small op costs tens of microseconds (measured ~165 us a token
    # for where/cat/isin/any on llava-interleave-qwen-0.5b, ~1.5% of an int8 step). The history tensor grows each
    # step only when the repetition penalty reads it; else the new tokens are appended once at the end.
    penalty_reads_history = settings.repetition_penalty != 1.0
    chosen: list[torch.Tensor] = []
    for step in range(max_new):
        scores = process_scores(logits, history, step, settings)
        tokens = choose_tokens(scores, settings, generator)
        if not all(unfinished):  # finished rows are padded while the others go on
            tokens = torch.where(torch.tensor(unfinished, device=tokens.device), tokens,
                                 torch.full_like(tokens, pad_id))
        if penalty_reads_history:
            history = torch.cat([history, tokens[:, None]], dim=1)
        else:
            chosen.append(tokens)
        if streamer is not None:
            streamer.put(tokens.cpu())
        ids = tokens.tolist()
        for row, token in enumerate(ids):
            if not unfinished[row]:
                continue
            if token in eos_ids:
                unfinished[row] = False
            elif stops:
                new_tokens[row].append(token)
                if stops.completed_by_last_token(new_tokens[row]):
                    unfinished[row] = False
        if not any(unfinished) or step == max_new - 1:
            break
        logits = session.step(tokens)
    if chosen:
        history = torch.cat([history, torch.stack(chosen, dim=1)], dim=1)
    if streamer is not None:
        streamer.end()
    return history
