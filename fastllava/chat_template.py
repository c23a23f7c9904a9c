"""Chat templates: render a checkpoint's jinja template over a conversation exactly as transformers does.

Contract: ``render_chat_template(conversations, template, add_generation_prompt=..., continue_final_message=...,
**variables)`` returns one prompt string per conversation (plus, on request, the character spans written inside
``{% generation %}`` blocks). Templates run in a sandboxed, immutable jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}...{% endgeneration %}`` block, the globals
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace`` and transformers' ``tojson`` filter (no HTML
escaping, ``indent``/``separators``/``sort_keys``). Messages may carry a string ``content`` or a list of typed parts
(``{"type": "text", "text": ...}``, ``{"type": "image", ...}``); whatever the template sees is first rebuilt from plain
JSON types, so images and tensors inside messages appear only as inert ``"<TypeName>"`` strings. With
``continue_final_message`` the prompt ends right after the final message's text, without the end-of-turn text the
template writes after it. Checkpoint templates are untrusted code: nothing here gives them access to Python objects.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterator

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

__all__ = [
    "compile_chat_template",
    "template_variables",
    "normalize_conversations",
    "openai_images_to_hf",
    "render_chat_template",
    "resolve_chat_template",
]

# A marker appended to the final message's text; the rendered prompt is cut where it appears.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names under which a message's reasoning may be given; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# (rendered blocks so far, spans found) while a render that tracks {% generation %} blocks is running.
_generation_tracking: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "fastllava_generation_tracking", default=None
)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and, when tracking, records its char span."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    def _render_block(self, caller: Any) -> str:
        text = caller()
        tracking = _generation_tracking.get()
        if tracking is not None:
            # The block's output is appended right after what has been yielded so far.
            blocks, spans = tracking
            start = sum(len(block) for block in blocks)
            spans.append((start, start + len(text)))
        return text


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore attributes, so templates cannot reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja's Namespace (self in args)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
        )


class _TemplateDict:
    """``dict(...)`` for templates: builds plain dicts without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters (<, >, &, '), which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` in the sandboxed chat-template environment (cached per template text)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


@lru_cache(maxsize=64)
def template_variables(source: str) -> frozenset[str]:
    """The free variables a template reads (e.g. ``messages``, ``add_generation_prompt``, ``bos_token``)."""
    template = compile_chat_template(source)
    return frozenset(jinja2.meta.find_undeclared_variables(template.environment.parse(source)))


def resolve_chat_template(templates: str | dict[str, str] | None, chat_template: str | None = None, tools: Any = None) -> str:
    """Pick the template text: ``chat_template`` may be a template name (in a dict of templates) or a template.

    With several templates and no name, "tool_use" is used when tools are given, else "default".
    """
    if isinstance(templates, dict):
        if chat_template is not None and chat_template in templates:
            return templates[chat_template]
        if chat_template is None:
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(
                "This checkpoint has several chat templates and none is named 'default'; pass chat_template=<name>, "
                f"one of {sorted(templates)}."
            )
    if chat_template is not None:
        return chat_template
    if templates is None:
        raise ValueError(
            "No chat template: this checkpoint ships none (no chat_template.jinja, chat_template.json or "
            "'chat_template' in tokenizer_config.json). Pass chat_template='<jinja template>' or set "
            "processor.chat_template."
        )
    return templates


# --- conversations ---------------------------------------------------------------------------------------------------


def _objects_to_dicts(value: Any) -> Any:
    # Message objects (dataclasses, pydantic models such as OpenAI SDK messages) become dicts; media stay untouched
    # because the processor still has to load them from the content parts.
    if isinstance(value, Mapping):
        return {key: _objects_to_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_objects_to_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_objects_to_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _objects_to_dicts(value.model_dump())
    return value


def _normalize_messages(conversation: Any) -> list[dict[str, Any]]:
    messages = _objects_to_dicts(getattr(conversation, "messages", conversation))
    normalized = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts with 'role' and 'content', got {message!r}.")
        # APIs return content=None / tool_calls=None; templates handle a missing key but would print "None".
        normalized.append({key: value for key, value in message.items() if value is not None})
    return normalized


def normalize_conversations(conversation: Any) -> tuple[list[list[dict[str, Any]]], bool]:
    """Return ``(conversations, is_batched)``: a batch is a list whose first item is itself a list of messages.

    Messages are copied into fresh dicts (the caller's are never modified) without the keys whose value is None.
    """
    if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
        raise ValueError("Cannot apply a chat template to an empty conversation; give at least one message.")
    if isinstance(conversation, (list, tuple)) and (
        isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    ):
        return [_normalize_messages(c) for c in conversation], True
    return [_normalize_messages(conversation)], False


def openai_images_to_hf(conversations: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Rewrite OpenAI ``{"type": "image_url", "image_url": {"url": u}}`` parts as ``{"type": "image", "url": u}``."""
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part:
                    info = part["image_url"]
                    url = info.get("url", "") if isinstance(info, dict) else info
                    parts.append({"type": "image", "url": url})
                else:
                    parts.append(part)
            message["content"] = parts
    return conversations


def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types; anything else becomes the inert string ``"<TypeName>"``.

    Templates only test whether media keys exist, so replacing images/arrays by placeholders changes no prompt, and
    the sandbox never sees an object with dangerous methods (e.g. PIL's ``save``).
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # drop subclass methods (enums, numpy strings)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())  # np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[Any]) -> list[Any]:
    # Templates read `reasoning_content` (gpt-oss ones read `thinking`): fill both from whichever name was given.
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


@contextmanager
def _track_generation(blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
    token = _generation_tracking.set((blocks, spans))
    try:
        yield
    finally:
        _generation_tracking.reset(token)


def _mark_final_message(chat: list[dict[str, Any]], field: str, source: str) -> str:
    """Append the continue tag to the final message's text; return that text (before the tag)."""
    if not chat:
        raise ValueError("continue_final_message is set but the conversation is empty.")
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue.')
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in source for f in fields):
        raise ValueError(f'continue_final_message is set to "{field}" but the chat template never reads that field.')
    if isinstance(final, (list, tuple)):
        # Typed parts: continue the last part that has text.
        for part in reversed(final):
            if isinstance(part, dict) and "text" in part:
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text part to continue.")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _cut_at_final_message(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the rendered chat; the chat "
            "template changes or drops part of it.\n"
            f"Final message: {final_text.strip()}\nRendered chat:\n{rendered}"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    # The template stripped trailing whitespace of the message; strip what precedes the tag the same way.
    return rendered[:at].rstrip()


def render_chat_template(
    conversations: list[list[dict[str, Any]]],
    chat_template: str,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    return_generation_spans: bool = False,
    **variables: Any,
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Render each conversation; return ``(prompts, generation_spans)`` (spans are empty unless requested).

    ``continue_final_message`` (True or the name of the message field to continue, default "content") ends each
    prompt right after the final message's text so that the model continues it; it cannot be combined with
    ``add_generation_prompt``. ``variables`` (e.g. ``bos_token``) are visible to the template.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt are not compatible: use continue_final_message to let "
            "the model continue the final message, add_generation_prompt to open a new assistant turn."
        )
    if continue_final_message and return_generation_spans:
        raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, dict):
                raise ValueError(
                    "Tools must be given as JSON-schema dicts ({'type': 'function', 'function': {...}}); "
                    "fastllava does not convert Python functions to schemas."
                )
    if documents is not None:
        for document in documents:
            if not isinstance(document, dict):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys.")
    template = compile_chat_template(chat_template)
    tools, documents, variables = _plain(tools), _plain(documents), _plain(variables)
    field = continue_final_message if isinstance(continue_final_message, str) else "content"

    prompts: list[str] = []
    all_spans: list[list[tuple[int, int]]] = []
    for conversation in conversations:
        chat = _plain(getattr(conversation, "messages", conversation))  # a fresh copy: edits stay local
        for message in chat:
            if not isinstance(message, dict):
                raise TypeError(f"Chat messages should be dicts with 'role' and 'content', got {message!r}.")
        chat = _alias_reasoning(chat)
        final_text = _mark_final_message(chat, field, chat_template) if continue_final_message else None
        context = dict(
            variables, messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt
        )
        if return_generation_spans:
            blocks: list[str] = []
            spans: list[tuple[int, int]] = []
            with _track_generation(blocks, spans):
                for block in template.generate(**context):
                    blocks.append(block)
            rendered = "".join(blocks)
            all_spans.append(spans)
        else:
            rendered = template.render(**context)
        if final_text is not None:
            rendered = _cut_at_final_message(rendered, final_text)
        prompts.append(rendered)
    return prompts, all_spans
