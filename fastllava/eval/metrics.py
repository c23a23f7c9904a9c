"""Answer normalization and matching for short-answer visual QA.

Contract. ``normalize_answer(text)`` lowercases, turns punctuation into spaces, drops the articles a/an/the,
writes number words as digits ("two" -> "2"), maps British spellings to American ("colour" -> "color",
"centre" -> "center", "grey" -> "gray") and a few answer synonyms ("middle" -> "center", "violet" -> "purple"),
and collapses whitespace, so "The Colour is Grey." and "the color is gray" compare equal; it follows the spirit
of the VQA/GQA answer processors (see notes/training-anchors.md §3.2) without their long special-case tables.
``exact_match(pred, gold)`` compares normalized strings. ``answer_match(pred, gold, question_type)`` is exact
match, except for ``describe`` answers, which are compared as multisets of "colour shape" items, so
"a blue square and a red circle" matches "a red circle and a blue square" and "two red circles" matches
"a red circle and a red circle". ``accuracy_table`` turns (question_type, correct) pairs into overall and
per-type counts and accuracies.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS["none"] = "0"
SPELLINGS = {"colour": "color", "colours": "colors", "coloured": "colored", "centre": "center", "grey": "gray",
             "greyish": "grayish"}
# Different words for the same canonical answer; kept short on purpose (each one is a claim about meaning).
SYNONYMS = {"middle": "center", "centered": "center", "violet": "purple", "rhombus": "diamond", "plus": "cross",
            "yeah": "yes", "nope": "no"}

_PUNCT = re.compile(r"[^\w\s]|_")


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for comparison (see the module docstring)."""
    words = []
    for w in _PUNCT.sub(" ", str(text).lower()).split():
        if w in ARTICLES:
            continue
        w = NUMBER_WORDS.get(w, w)
        w = SPELLINGS.get(w, w)
        words.append(SYNONYMS.get(w, w))
    return " ".join(words)


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def _singular(word: str) -> str:
    if word.endswith("sses") or word.endswith("xes") or word.endswith("ches") or word.endswith("shes"):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def parse_description(text: str) -> Counter | None:
    """'a red circle, two blue squares and a star' -> Counter({'red circle': 1, 'blue square': 2, 'star': 1}).

    Returns None for an empty description.
    """
    items: Counter = Counter()
    for part in re.split(r",|;|\band\b|\bplus\b|\n", str(text).lower()):
        words = normalize_answer(part).split()
        if not words:
            continue
        count = 1
        if words[0].isdigit():
            count = int(words[0])
            words = words[1:]
        if not words:
            return None
        words[-1] = _singular(words[-1])
        items[" ".join(words)] += count
    return items or None


def answer_match(prediction: str, gold: str, question_type: str | None = None) -> bool:
    """Whether a predicted answer is right: exact match, or multiset match for ``describe`` answers."""
    if question_type == "describe":
        gold_items = parse_description(gold)
        if gold_items is not None:
            return parse_description(prediction) == gold_items
    return exact_match(prediction, gold)


def accuracy_table(results: Iterable[tuple[str, bool]]) -> dict:
    """{"overall": {"correct", "total", "accuracy"}, "per_type": {type: {...}}} from (type, correct) pairs.

    Types are listed in order of first appearance; accuracy of an empty set is 0.0.
    """
    per: dict[str, list[int]] = {}
    for qtype, ok in results:
        c = per.setdefault(qtype, [0, 0])
        c[0] += int(bool(ok))
        c[1] += 1

    def cell(correct: int, total: int) -> dict:
        return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}

    correct = sum(c for c, _ in per.values())
    total = sum(t for _, t in per.values())
    return {"overall": cell(correct, total), "per_type": {k: cell(*v) for k, v in per.items()}}
