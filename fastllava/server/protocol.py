"""Request bodies of the OpenAI-compatible API as pydantic models (what a client may send, and its bounds).

``ChatCompletionRequest``, ``CompletionRequest`` and ``TokenizeRequest`` validate types and ranges; anything wrong is
a 400 in OpenAI's error shape (see errors.py). Fields OpenAI defines that this server cannot honour
(``tools``, ``response_format`` other than text, ``echo``, ``suffix``...) are refused with a clear 400 by
``unsupported_fields``, never silently ignored; fields nobody defines are ignored and logged (``unknown_fields``).
``to_sampling_params`` maps a request onto the engine's ``SamplingParams``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from fastllava.engine.types import SamplingParams

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


class _Open(BaseModel):
    """Unknown fields are kept aside (``model_extra``) so that they can be reported, not rejected."""

    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str = Field(max_length=200_000_000)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL | str  # OpenAI sends {"url": ...}; some clients send the URL itself

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]


class _Sampling(_Open):
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    user: str | None = None

    def stop_list(self) -> list[str] | None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not stop:
            return None
        if len(stop) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS or not s for s in stop):
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} non-empty strings of at most {MAX_STOP_CHARS} chars")
        return list(stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    add_generation_prompt: bool = True

    def unsupported_fields(self) -> list[str]:
        problems = []
        if self.tools or self.functions:
            problems.append("tools/functions (tool calling) are not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            problems.append(f"response_format {self.response_format.type!r} is not supported (only 'text')")
        if self.top_logprobs is not None and not self.logprobs:
            problems.append("top_logprobs needs logprobs=true")
        return problems

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field()
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported_fields(self) -> list[str]:
        problems = []
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            problems.append("prompt: give one prompt per request (a string, or a list of exactly one string)")
        if self.echo:
            problems.append("echo is not supported")
        if self.suffix:
            problems.append("suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            problems.append("best_of is not supported")
        return problems

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Open):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def unsupported_fields(self) -> list[str]:
        if (self.prompt is None) == (self.messages is None):
            return ["give exactly one of 'prompt' or 'messages'"]
        return []


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Names of fields no model declares, recursively (bounded), so that the server can log them."""
    names = [prefix + key for key in (model.model_extra or {})][:20]
    for name, value in model:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items[:64]):
            if isinstance(item, BaseModel):
                where = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                names.extend(unknown_fields(item, where))
    return names[:20]


def to_sampling_params(request: ChatCompletionRequest | CompletionRequest,
                       default_max_tokens: int | None) -> SamplingParams:
    """The engine's SamplingParams for a request; raises ValueError (-> 400) on inconsistent values."""
    top_k = request.top_k if request.top_k is not None else 0
    max_tokens = request.max_new_tokens()
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        min_tokens=request.min_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(0, top_k),
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        seed=request.seed,
        stop=request.stop_list(),
        stop_token_ids=request.stop_token_ids,
        n=request.n,
        logprobs=request.logprobs_count(),
        ignore_eos=request.ignore_eos,
        skip_special_tokens=request.skip_special_tokens,
    )
