"""LLaVA-format records -> model inputs with labels, through the checkpoint's own processor.

Contract. ``LlavaCollator(processor)`` turns a LLaVA record ``{"image": "x.png" | [...] | absent,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`` into
``input_ids``, ``labels`` and ``pixel_values`` laid out exactly as ``processor.apply_chat_template`` +
``processor(...)`` lay them out at inference: the conversation is rendered by the processor's chat template, the
prompt is tokenized by its tokenizer (BOS added the same way) and every ``<image>`` becomes
``processor.num_image_tokens(H, W)`` placeholders. ``labels`` equal ``input_ids`` on the assistant's tokens (its
answer and the end-of-turn text the template writes with it, e.g. ``</s>``) and are ``-100`` everywhere else: BOS,
system and user turns, role headers, image placeholders and padding. Calling the collator on a list of encoded
examples pads them (``input_ids`` with the pad id, ``labels`` with -100, ``attention_mask`` 0) into tensors.

Which characters belong to the assistant comes from the template itself: ``{% generation %}`` blocks when it has
them (transformers' ``return_assistant_tokens_mask`` convention), otherwise the text each assistant message adds
when the conversation is rendered one message longer. When the assistant text the template writes holds no EOS
token (the llava-hf llava-1.5 template ends answers with a space), ``eos_after_answer="auto"`` appends EOS after
every answer, labelled, so that the model learns to stop, as the original LLaVA "v1" recipe does with ``</s>``.

Records are converted LLaVA-style (``record_to_messages``): each ``<image>`` of a human turn becomes an image part
placed before that turn's text (LLaVA moves it to the start of the turn). A prompt longer than ``max_length``
is cut at the end, never inside an image's placeholders (``SequenceTooLongError`` then, so callers can skip the
record); a record whose assistant tokens are all cut raises too, since it would teach nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from fastllava.chat_template import render_chat_template

IGNORE_INDEX = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_IMAGE = re.compile(r"<image>")


class SequenceTooLongError(ValueError):
    """A record that cannot fit ``max_length`` without cutting an image or all of its answers."""


def record_to_messages(record: dict, image_token: str = "<image>") -> list[dict[str, Any]]:
    """LLaVA ``conversations`` -> chat messages with typed parts (images first in their turn, then the text)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"record {record.get('id')!r} has no 'conversations' list")
    messages = []
    for turn in turns:
        role = _ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"record {record.get('id')!r}: unknown speaker {turn.get('from')!r} "
                             f"(expected one of {sorted(_ROLES)})")
        text = turn.get("value", turn.get("content", ""))
        n_images = text.count(image_token)
        text = text.replace(image_token, "").strip() if n_images else text
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
        parts.append({"type": "text", "text": text})
        messages.append({"role": role, "content": parts})
    return messages


def record_image_paths(record: dict) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def load_record_images(record: dict, image_root: str | os.PathLike | None) -> list[Image.Image]:
    images = []
    for rel in record_image_paths(record):
        path = Path(rel) if image_root is None else Path(image_root) / rel
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


class LlavaCollator:
    """Encode records (``encode``) and pad encoded examples into a batch (``__call__``).

    ``processor``: a ``LlavaProcessor`` (its tokenizer, chat template, image processor and placeholder count are
    used). ``image_root``: folder that record image paths are relative to. ``max_length``: cut longer prompts (see
    the module docstring); None keeps everything. ``eos_after_answer``: "auto", True or False (see above).
    ``pad_to_multiple_of``: round padded lengths up. ``chat_template``: a template to use instead of the
    processor's.
    """

    def __init__(self, processor: Any, image_root: str | os.PathLike | None = None, max_length: int | None = None,
                 eos_after_answer: bool | str = "auto", pad_to_multiple_of: int | None = None,
                 chat_template: str | None = None):
        if eos_after_answer not in ("auto", True, False):
            raise ValueError(f"eos_after_answer must be 'auto', True or False, got {eos_after_answer!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_root = image_root
        self.max_length = max_length
        self.eos_after_answer = eos_after_answer
        self.pad_to_multiple_of = pad_to_multiple_of
        self.template = processor.get_chat_template(chat_template)
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.eos_token_id = self.tokenizer.eos_token_id
        self._uses_generation_blocks = "generation" in self.template and "endgeneration" in self.template

    # -- rendering ------------------------------------------------------------------------------------------------

    def _render(self, messages: list[dict], spans: bool = False, add_generation_prompt: bool = False):
        prompts, found = render_chat_template([messages], self.template, add_generation_prompt=add_generation_prompt,
                                              return_generation_spans=spans, **self.tokenizer.special_tokens_map)
        return prompts[0], (found[0] if spans else [])

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the assistant's text in it."""
        if self._uses_generation_blocks:
            text, spans = self._render(messages, spans=True)
            if spans or not any(m["role"] == "assistant" for m in messages):
                return text, [s for s in spans if s[1] > s[0]]
        # No generation blocks: an assistant message owns what it adds to the rendering of the messages before it.
        text, _ = self._render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, _ = self._render(messages[:i], add_generation_prompt=True)
            upto, _ = self._render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ValueError(
                    "Cannot tell the assistant's tokens apart with this chat template: rendering the conversation "
                    "message by message does not give prefixes of the whole. Mark the assistant text with "
                    "{% generation %}...{% endgeneration %} in the template."
                )
            spans.append((len(before), len(upto)))
        return text, spans

    # -- one record ---------------------------------------------------------------------------------------------------

    def encode(self, record: dict, images: Sequence[Image.Image] | None = None) -> dict[str, Any]:
        """One record -> {"input_ids": list, "labels": list, "pixel_values": tensor (N, C, H, W) or None}.

        ``images`` (PIL, in order) replace loading the record's image files from ``image_root``.
        """
        messages = record_to_messages(record, self.image_token)
        if images is None:
            images = load_record_images(record, self.image_root)
        n_slots = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
        if n_slots != len(images):
            raise ValueError(f"record {record.get('id')!r} has {n_slots} {self.image_token} placeholder(s) but "
                             f"{len(images)} image(s)")
        text, spans = self.render_with_spans(messages)
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and text.startswith(bos))  # as the processor decides
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])

        # Assistant tokens: those overlapping a span, as transformers' assistant masks (tokens the tokenizer adds,
        # like BOS, have an empty offset and are never labelled).
        in_span = [any(s < b and e > a for a, b in spans) for s, e in offsets]
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, in_span)]
        if self.eos_token_id is not None and spans:
            want_eos = self.eos_after_answer is True or (
                self.eos_after_answer == "auto" and not any(t == self.eos_token_id for t in labels))
            if want_eos:
                ids, labels = _append_eos_after_runs(ids, labels, self.eos_token_id)

        pixel_values = None
        if images:
            pixel_values = self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
            if not isinstance(pixel_values, torch.Tensor):
                pixel_values = torch.stack([torch.as_tensor(p) for p in pixel_values])
            counts = [self.processor.num_image_tokens(*p.shape[-2:]) for p in pixel_values]
            ids, labels = self._expand_images(ids, labels, counts, record)
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = self._truncate(ids, labels, record)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}

    def _expand_images(self, ids: list[int], labels: list[int], counts: list[int], record: dict):
        # "<image>" is an added special token, so tokenizing the expanded text equals repeating its id here.
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != len(counts):
            raise ValueError(f"record {record.get('id')!r}: {len(positions)} image tokens after tokenization for "
                             f"{len(counts)} image(s); is {self.image_token!r} a special token of the tokenizer?")
        out_ids, out_labels, last = [], [], 0
        for pos, count in zip(positions, counts):
            out_ids += ids[last:pos] + [self.image_token_id] * count
            out_labels += labels[last:pos] + [IGNORE_INDEX] * count
            last = pos + 1
        return out_ids + ids[last:], out_labels + labels[last:]

    def _truncate(self, ids: list[int], labels: list[int], record: dict):
        cut = self.max_length
        if self.image_token_id is not None and self.image_token_id in ids[cut:]:
            raise SequenceTooLongError(
                f"record {record.get('id')!r} needs {len(ids)} tokens; max_length={cut} would cut its image "
                "placeholders (raise max_length or drop the record)")
        if all(label == IGNORE_INDEX for label in labels[:cut]):
            raise SequenceTooLongError(
                f"record {record.get('id')!r} needs {len(ids)} tokens; max_length={cut} cuts all of its answers")
        return ids[:cut], labels[:cut]

    # -- a batch ------------------------------------------------------------------------------------------------------

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Pad encoded examples (or raw records, encoded first) on the right into a batch of tensors."""
        examples = [ex if "input_ids" in ex else self.encode(ex) for ex in examples]
        length = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(examples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [ex["pixel_values"] for ex in examples if ex.get("pixel_values") is not None]
        if pixels:
            out["pixel_values"] = torch.cat(pixels, dim=0)  # (total images in the batch, C, H, W), in row order
        return out


def _append_eos_after_runs(ids: list[int], labels: list[int], eos: int) -> tuple[list[int], list[int]]:
    """Insert a labelled EOS after every maximal run of labelled tokens."""
    out_ids, out_labels = [], []
    for i, (t, label) in enumerate(zip(ids, labels)):
        out_ids.append(t)
        out_labels.append(label)
        run_ends = label != IGNORE_INDEX and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)
        if run_ends:
            out_ids.append(eos)
            out_labels.append(eos)
    return out_ids, out_labels


class LlavaDataset(torch.utils.data.Dataset):
    """A list of LLaVA records encoded on access by a ``LlavaCollator`` (so DataLoader workers can do it)."""

    def __init__(self, records: Sequence[dict], collator: LlavaCollator):
        self.records = list(records)
        self.collator = collator

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.collator.encode(self.records[index])
