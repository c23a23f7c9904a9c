"""Run any answer function over the questions of a LLaVA-format data set and score it.

Contract. ``load_llava_json(path)`` reads a LLaVA JSON list (or JSON Lines) of records
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]}``,
optionally with ``"question_types"`` (one per human/gpt pair, as the synthetic generator writes) or a single
``"question_type"``. ``evaluate(records, image_root, answer_fn)`` asks ``answer_fn(image, question) -> str``
every question of every record, each on its own (no earlier turns as context), with ``image`` the record's
picture as an RGB ``PIL.Image`` (or None for text-only records) and ``question`` the human turn without the
``<image>`` placeholder; it scores each reply with ``fastllava.eval.metrics.answer_match`` and returns::

    {"overall": {"correct": int, "total": int, "accuracy": float},
     "per_type": {question_type: {"correct", "total", "accuracy"}, ...},
     "mistakes": [{"id", "image", "turn", "question_type", "question", "answer", "prediction"}, ...],
     "num_records": int, "seconds": float}

``format_report(result)`` renders that as a plain-text table. The runner knows nothing about models: the
caller plugs one in through ``answer_fn``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image

from fastllava.eval.metrics import accuracy_table, answer_match

AnswerFn = Callable[[Image.Image | None, str], str]
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")


def load_llava_json(path: str | os.PathLike) -> list[dict]:
    """Records of a LLaVA JSON list file, or of a JSON Lines file (one record per line)."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) and "conversations" in r for r in records):
        raise ValueError(f"{path}: expected LLaVA records with a 'conversations' list")
    return records


def iter_questions(records: Sequence[dict]) -> Iterator[dict]:
    """One dict per human/gpt pair: id, image, turn, question (no <image>), answer, question_type."""
    for record in records:
        turns = record["conversations"]
        types = record.get("question_types")
        pair = 0
        for i in range(len(turns) - 1):
            if turns[i].get("from") != "human" or turns[i + 1].get("from") != "gpt":
                continue
            if types is not None and pair < len(types):
                qtype = types[pair]
            else:
                qtype = record.get("question_type", "unknown")
            yield {"id": record.get("id"), "image": record.get("image"), "turn": pair,
                   "question": _IMAGE_TOKEN.sub(" ", turns[i]["value"]).strip(),
                   "answer": turns[i + 1]["value"], "question_type": qtype}
            pair += 1


def _load_image(image_root: str | os.PathLike | None, rel: str | None) -> Image.Image | None:
    if rel is None:
        return None
    path = Path(rel) if image_root is None else Path(image_root) / rel
    with Image.open(path) as im:
        return im.convert("RGB")


def evaluate(records: Sequence[dict], image_root: str | os.PathLike | None, answer_fn: AnswerFn, *,
             limit: int | None = None, max_mistakes: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Score ``answer_fn`` on every question of ``records`` (see the module docstring).

    ``limit`` caps the number of questions asked; ``max_mistakes`` caps the mistakes kept in the result;
    ``progress(done, total)`` is called after each question.
    """
    questions = list(iter_questions(records))
    if limit is not None:
        questions = questions[:limit]
    t0 = time.perf_counter()
    scored: list[tuple[str, bool]] = []
    mistakes: list[dict] = []
    cache_key, cached = None, None
    for n, q in enumerate(questions, 1):
        # Questions of one record are consecutive: load each picture once.
        key = (q["id"], q["image"])
        if key != cache_key:
            cache_key, cached = key, _load_image(image_root, q["image"])
        prediction = answer_fn(cached, q["question"])
        ok = answer_match(prediction, q["answer"], q["question_type"])
        scored.append((q["question_type"], ok))
        if not ok and (max_mistakes is None or len(mistakes) < max_mistakes):
            mistakes.append({**q, "prediction": prediction})
        if progress is not None:
            progress(n, len(questions))
    result = accuracy_table(scored)
    result.update(mistakes=mistakes, num_records=len({q["id"] for q in questions}),
                  seconds=time.perf_counter() - t0)
    return result


def evaluate_file(path: str | os.PathLike, answer_fn: AnswerFn, image_root: str | os.PathLike | None = None,
                  **kwargs) -> dict:
    """``evaluate`` on a JSON file whose image paths are relative to ``image_root`` (default: its folder)."""
    return evaluate(load_llava_json(path), Path(path).parent if image_root is None else image_root, answer_fn,
                    **kwargs)


def format_report(result: dict, max_mistakes: int = 0) -> str:
    """A plain-text table: one row per question type, then the overall row; optionally the first mistakes."""
    rows = [(t, c) for t, c in result["per_type"].items()] + [("overall", result["overall"])]
    width = max(len("type"), *(len(t) for t, _ in rows))
    lines = [f"{'type':<{width}}  {'correct':>7}  {'total':>6}  {'accuracy':>8}"]
    lines.append("-" * len(lines[0]))
    for i, (t, c) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        lines.append(f"{t:<{width}}  {c['correct']:>7}  {c['total']:>6}  {100 * c['accuracy']:>7.1f}%")
    for m in result.get("mistakes", [])[:max_mistakes]:
        lines.append(f"{m['id']} [{m['question_type']}] {m['question']!r}: expected {m['answer']!r}, "
                     f"got {m['prediction']!r}")
    return "\n".join(lines)
