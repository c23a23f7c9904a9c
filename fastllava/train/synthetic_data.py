"""Synthetic visual question answering about coloured shapes, in the LLaVA data format.

Contract. ``generate_dataset(out_dir, num_images, seed, split=...)`` writes ``num_images`` images (1-4
non-overlapping shapes of 6 kinds in 8 colours on a plain, gradient or noisy background) under
``out_dir/images/`` and one LLaVA-format JSON list ``out_dir/<split>.json``; it returns the JSON path. Each
record is::

    {"id": "train-s0-000000", "image": "images/train-s0-000000.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}, ...further turns without <image>...],
     "question_types": ["color", ...],      # one per question/answer pair
     "queries": [{"type": "color", "target": {"shape": "circle"}}, ...],  # what each question asks
     "scene": {...},                         # the full description the image was rendered from
     "split": {"phrasings": "train", "rendering": "train"}}

Question types: ``color`` (answer: a colour name), ``shape`` (a shape name), ``count`` (a digit),
``yesno`` ("yes"/"no"), ``position`` ("left", "right", "top", "bottom" or "center") and ``describe``
("a red circle and two blue squares", listed left to right). Every question is unambiguous for its picture:
a question about "the circle" is asked only when there is exactly one circle, a position only when the shape
is clearly in that region, and so on; ``answer_query(scene, query)`` re-derives any answer from the scene.

Held-out split. The question phrasings (templates, prefixes, instruction suffixes) and some renderings
(background styles, a band of shape sizes, JPEG qualities) are divided into a train part and a held-out
part; ``split="heldout"`` uses only the held-out ones, so accuracy on it measures phrasings and renderings
never trained on. Held-out phrasings use only words that occur in the train phrasings (a fair test for a
model trained from scratch). ``phrasings=`` / ``rendering=`` override the two halves separately.

Reproducibility: every image and question derives from ``(seed, split, index)`` alone, so the same arguments
give byte-identical JSON and image files (with the same Pillow/numpy versions). Shapes, colours and
backgrounds are defined in ``fastllava.train.shapes``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from fastllava.train.shapes import BACKGROUND_STYLES, COLORS, PLURALS, SHAPES, render_background, render_scene

QUESTION_TYPES = ("color", "shape", "count", "yesno", "position", "describe")
DEFAULT_TYPE_WEIGHTS = {"color": 0.2, "shape": 0.2, "count": 0.15, "yesno": 0.2, "position": 0.15, "describe": 0.1}
SPLITS = ("train", "heldout")
POSITIONS = ("left", "right", "top", "bottom", "center")

# ---------------------------------------------------------------------------------------------------------------
# Rendering variations, divided between the splits. Sizes are the bounding-circle diameter as a fraction of the
# image side; the held-out band lies between the two train bands (interpolation, not extrapolation).
RENDERING = {
    "train": {"backgrounds": ("solid", "vgradient", "hgradient"), "size_bands": ((0.26, 0.32), (0.36, 0.46)),
              "jpeg_quality": (75, 95)},
    "heldout": {"backgrounds": ("dgradient", "radial"), "size_bands": ((0.32, 0.36),), "jpeg_quality": (55, 74)},
}
assert all(s in BACKGROUND_STYLES for r in RENDERING.values() for s in r["backgrounds"])

NUM_SHAPES_WEIGHTS = {1: 0.35, 2: 0.3, 3: 0.2, 4: 0.15}
COLOR_JITTER = 10            # +- per RGB channel around the base colour
MIN_CONTRAST = 100.0         # min RGB distance between a shape's colour and any background pixel under it
# Position rules on the shape centre, normalized to [0, 1] (dx, dy = offset from the image centre; y down).
CENTER_MAX = 0.08            # "center": both offsets within this
SIDE_MIN = 0.15              # "left"/"right"/"top"/"bottom" for open questions: offset at least this ...
SIDE_DOMINANCE = 2.0         # ... and this many times the other offset (so corners are never asked)
HALF_MIN = 0.12              # "left or right?" / "top or bottom?": offset on that axis at least this

GENERIC_NOUNS = ("shape", "object", "thing", "figure")
GENERIC_PLURALS = ("shapes", "objects", "things", "figures")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

# ---------------------------------------------------------------------------------------------------------------
# Phrasings. Mini-syntax: (a|b) picks one alternative, [x] is optional, {slot} is filled per question.
# Slots: {ref} a noun phrase naming one shape ("circle", "red object", "shape"); {color}; {noun} (a generic
# noun or "one"); {subj} a plural noun phrase; {np}/{nps} singular/plural noun phrases; {shape}.
PHRASINGS: dict[str, dict[str, dict[str, list[str]]]] = {
    "color": {
        "ref": {
            "train": [
                "what (colour|color) is the {ref}",
                "what is the (colour|color) of the {ref}",
                "what's the (colour|color) of the {ref}",
                "the {ref} is what (colour|color)",
                "tell me the (colour|color) of the {ref}",
                "(colour|color) of the {ref}",
                "what (colour|color) is the {ref} in the (image|picture|photo)",
                "in the (image|picture), what (colour|color) is the {ref}",
                "identify the (colour|color) of the {ref}",
                "can you tell me what (colour|color) the {ref} is",
                "what (colour|color) does the {ref} have",
                "which (colour|color) is the {ref}",
                "name the (colour|color) of the {ref}",
                "what is the {ref}'s (colour|color)",
            ],
            "heldout": [
                "which (colour|color) does the {ref} have",
                "tell me what (colour|color) the {ref} is",
                "what (colour|color) is the {ref} in this (image|picture)",
                "the {ref} is which (colour|color)",
                "(colour|color) of the {ref} in the (image|picture)",
            ],
        },
        "single": {
            "train": [
                "what (colour|color) is (this|it)",
                "what (colour|color) is this (shape|object|thing)",
                "what (colour|color) is the (shape|object) you see",
                "what (colour|color) do you see",
            ],
            "heldout": [
                "which (colour|color) is this (shape|object)",
                "what (colour|color) is shown",
            ],
        },
    },
    "shape": {
        "color": {
            "train": [
                "what shape is the {color} {noun}",
                "what is the shape of the {color} {noun}",
                "which shape is {color}",
                "what shape is {color}",
                "what is the {color} {noun}",
                "the {color} {noun} is what shape",
                "tell me the shape of the {color} {noun}",
                "what kind of shape is the {color} {noun}",
                "identify the {color} {noun}",
                "what is the {color} {noun} in the (image|picture|photo)",
                "name the shape of the {color} {noun}",
                "which (shape|object) is {color}",
            ],
            "heldout": [
                "which shape is the {color} {noun}",
                "what kind of shape is {color}",
                "tell me what shape the {color} {noun} is",
                "the {color} {noun} is which shape",
                "what is the {color} {noun} in this (image|picture)",
            ],
        },
        "single": {
            "train": [
                "what shape is (this|it)",
                "what shape is in the (image|picture|photo)",
                "what shape do you see",
                "what is this shape",
                "which shape is shown",
                "what kind of shape is this",
                "identify the shape",
            ],
            "heldout": [
                "what shape is shown in the (image|picture)",
                "what kind of shape do you see",
                "which shape is this",
            ],
        },
    },
    "count": {
        "subj": {
            "train": [
                "how many {subj} are there",
                "how many {subj} are in the (image|picture|photo)",
                "how many {subj} (can|do) you see",
                "count the {subj}",
                "what is the number of {subj}",
                "number of {subj}",
                "how many {subj} does the (image|picture) (have|contain)",
                "tell me how many {subj} there are",
                "the (image|picture) has how many {subj}",
                "how many {subj} are visible",
                "how many {subj}",
            ],
            "heldout": [
                "count the {subj} in the (image|picture)",
                "what is the number of {subj} in the (image|picture)",
                "how many {subj} are there in this (image|picture)",
                "can you count the {subj}",
                "tell me the number of {subj}",
            ],
        },
    },
    "yesno": {
        "exists": {
            "train": [
                "is there (a|any) {np}",
                "is there a {np} in the (image|picture|photo)",
                "(do|can) you see a {np}",
                "does the (image|picture) (contain|have|show) a {np}",
                "is a {np} visible",
                "are there any {nps}",
                "any {nps}",
            ],
            "heldout": [
                "can you see any {nps}",
                "does the (image|picture) contain any {nps}",
                "is there a {np} in this (image|picture)",
                "is a {np} shown in the (image|picture)",
            ],
        },
        "attr": {
            "train": [
                "is the {ref} {color}",
                "is the {ref} (colored|coloured) {color}",
                "is the (colour|color) of the {ref} {color}",
            ],
            "heldout": [
                "is the {ref} in the (image|picture) {color}",
                "is the {ref} {color} in (colour|color)",
            ],
        },
    },
    "position": {
        "open": {
            "train": [
                "where is the {ref}",
                "where's the {ref}",
                "where is the {ref} located",
                "where in the (image|picture) is the {ref}",
                "in which part of the (image|picture) is the {ref}",
                "what is the position of the {ref}",
                "where can you see the {ref}",
            ],
            "heldout": [
                "where is the {ref} in the (image|picture)",
                "tell me where the {ref} is",
                "which part of the (image|picture) is the {ref} in",
                "where is the {ref} located in the (image|picture)",
            ],
        },
        "lr": {
            "train": [
                "is the {ref} on the left or [the] right",
                "is the {ref} on the left or right side",
                "which side is the {ref} on, left or right",
                "is the {ref} left or right",
                "is the {ref} in the left or right half of the (image|picture)",
            ],
            "heldout": [
                "is the {ref} located on the left or the right",
                "on which side is the {ref}, left or right",
            ],
        },
        "tb": {
            "train": [
                "is the {ref} at the top or [the] bottom",
                "is the {ref} in the top or bottom half",
                "is the {ref} near the top or the bottom of the (image|picture)",
                "is the {ref} top or bottom",
            ],
            "heldout": [
                "is the {ref} located at the top or the bottom",
                "is the {ref} in the top half or the bottom half",
            ],
        },
    },
    "describe": {
        "all": {
            "train": [
                "describe the (image|picture|photo)",
                "what do you see",
                "what is in the (image|picture)",
                "what's in the (image|picture|photo)",
                "what shapes are in the (image|picture)",
                "list the shapes",
                "describe what you see",
                "what does the (image|picture) show",
                "give a short description of the (image|picture)",
                "what (objects|shapes) are there",
                "describe the shapes",
            ],
            "heldout": [
                "what can you see in the (image|picture)",
                "describe the shapes in the (image|picture)",
                "tell me what is in the (image|picture)",
                "list what you see",
                "what is shown in the (image|picture)",
                "describe this (image|picture)",
            ],
        },
    },
}

PREFIXES = {"train": ["please, ", "hey, ", "can you tell me: "], "heldout": ["tell me, "]}
_SHORT = {"train": ["Answer the question using a single word or phrase.", "Answer with one word.",
                    "One word answer please."],
          "heldout": ["Answer using one word."]}
SUFFIXES = {
    "color": _SHORT, "shape": _SHORT, "position": _SHORT,
    "count": {"train": _SHORT["train"] + ["Answer with a number."], "heldout": ["Give a number."]},
    "yesno": {"train": ["Answer yes or no.", "Please answer yes or no.", _SHORT["train"][0]],
              "heldout": ["Yes or no?"]},
    "describe": {"train": ["Be brief.", "Answer briefly."], "heldout": ["Please be brief."]},
}
# Imperative phrasings read oddly with "?"; they end with "." or nothing.
_IMPERATIVE_STARTS = ("describe", "count", "list", "name", "identify", "tell", "give")


# ---------------------------------------------------------------------------------------------------------------
# Template mini-language


def _parse(s: str, i: int, stops: str) -> tuple[list, int]:
    """Parse ``s`` from ``i`` up to a char in ``stops``: a list of str parts and ("alt", [seqs]) nodes."""
    parts: list = []
    buf = ""
    while i < len(s) and s[i] not in stops:
        ch = s[i]
        if ch in "([":
            if buf:
                parts.append(buf)
                buf = ""
            if ch == "(":
                alts = []
                i += 1
                while True:
                    seq, i = _parse(s, i, "|)")
                    alts.append(seq)
                    if i >= len(s):
                        raise ValueError(f"unclosed '(' in phrasing {s!r}")
                    i += 1
                    if s[i - 1] == ")":
                        break
            else:
                seq, i = _parse(s, i + 1, "]")
                if i >= len(s):
                    raise ValueError(f"unclosed '[' in phrasing {s!r}")
                i += 1
                alts = [seq, []]
            parts.append(("alt", alts))
        else:
            buf += ch
            i += 1
    if buf:
        parts.append(buf)
    return parts, i


_COMPILED: dict[str, list] = {}


def _compiled(template: str) -> list:
    if template not in _COMPILED:
        seq, i = _parse(template, 0, "")
        _COMPILED[template] = seq
    return _COMPILED[template]


def _expand(seq: list) -> list[str]:
    outs = [""]
    for part in seq:
        if isinstance(part, str):
            outs = [o + part for o in outs]
        else:
            options = [x for alt in part[1] for x in _expand(alt)]
            outs = [o + x for o in outs for x in options]
    return outs


def _sample(seq: list, rng: random.Random) -> str:
    out = []
    for part in seq:
        out.append(part if isinstance(part, str) else _sample(rng.choice(part[1]), rng))
    return "".join(out)


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    text = text.replace(" ,", ",")
    # "a orange circle" -> "an orange circle" (all colour/shape words are lowercase here).
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def expand_phrasing(template: str) -> list[str]:
    """All strings a phrasing template can produce (slots left as ``{name}``)."""
    return [_tidy(x) for x in _expand(_compiled(template))]


# ---------------------------------------------------------------------------------------------------------------
# Scenes


def _choice_weighted(rng: random.Random, weights: dict) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys], k=1)[0]


def _background_color(rng: random.Random) -> list[int]:
    # Low saturation so a background never reads as one of the shape colours.
    h, s, v = rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.92)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return [int(round(255 * c)) for c in rgb]


def _contrast_ok(bg: np.ndarray, shapes: list[dict]) -> bool:
    for sh in shapes:
        r = sh["size"] / 2
        x0, x1 = max(0, int(sh["cx"] - r)), min(bg.shape[1], int(math.ceil(sh["cx"] + r)))
        y0, y1 = max(0, int(sh["cy"] - r)), min(bg.shape[0], int(math.ceil(sh["cy"] + r)))
        patch = bg[y0:y1, x0:x1].reshape(-1, 3)
        if patch.size and np.sqrt(((patch - np.asarray(sh["rgb"], np.float32)) ** 2).sum(-1)).min() < MIN_CONTRAST:
            return False
    return True


def sample_scene(rng: random.Random, width: int = 64, height: int | None = None, rendering: str = "train",
                 max_shapes: int = 4, shape_weights: dict | None = None) -> dict:
    """A random scene (see ``fastllava.train.shapes``) with 1..max_shapes shapes, rendering variations of a split.
    ``shape_weights``: {number of shapes: weight} instead of ``NUM_SHAPES_WEIGHTS``."""
    height = width if height is None else height
    spec = RENDERING[rendering]
    side = min(width, height)
    weights = {int(n): w for n, w in (shape_weights or NUM_SHAPES_WEIGHTS).items() if int(n) <= max_shapes} or {1: 1.0}
    n = _choice_weighted(rng, weights)
    # Prefer distinct kinds and colours (p=0.8 each) but allow repeats, so counting and "two red circles" occur.
    kinds, colors = [], []
    for _ in range(n):
        unused = [k for k in SHAPES if k not in kinds]
        kinds.append(rng.choice(unused if unused and rng.random() < 0.8 else SHAPES))
        unused = [c for c in COLORS if c not in colors]
        colors.append(rng.choice(unused if unused and rng.random() < 0.8 else list(COLORS)))
    bands = spec["size_bands"]
    band_weights = [b[1] - b[0] for b in bands]
    gap = max(2.0, 0.04 * side)
    placed: list[tuple[float, float, float]] = []
    for _attempt in range(1000):
        placed = []
        for _ in range(n):
            band = rng.choices(bands, weights=band_weights, k=1)[0]
            size = rng.uniform(*band) * side
            r = size / 2
            for _try in range(40):
                if not placed and _try == 0 and rng.random() < 0.15:
                    # Uniform placement almost never lands a shape in the centre; "center" answers need some.
                    cx = width / 2 + rng.uniform(-0.06, 0.06) * width
                    cy = height / 2 + rng.uniform(-0.06, 0.06) * height
                else:
                    cx = rng.uniform(r + 2, width - r - 2)
                    cy = rng.uniform(r + 2, height - r - 2)
                if all(math.hypot(cx - px, cy - py) >= r + pr + gap for px, py, pr in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == n:
            break
    else:  # pragma: no cover - 4 shapes of <= 0.46 side always fit; this guards odd image sizes
        raise RuntimeError(f"could not place {n} shapes in a {width}x{height} image")
    shapes = []
    for kind, color, (cx, cy, r) in zip(kinds, colors, placed):
        if kind == "circle":
            rot = 0.0
        elif kind == "star":
            rot = rng.uniform(-36.0, 36.0)  # 5-fold symmetric: this covers every orientation
        else:
            rot = rng.uniform(-12.0, 12.0)  # small tilts only: a square turned 45 degrees is not a square
        rgb = [min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color]]
        shapes.append({"shape": kind, "color": color, "rgb": rgb, "cx": round(cx, 2), "cy": round(cy, 2),
                       "size": round(2 * r, 2), "rotation": round(rot, 1)})
    for _attempt in range(40):
        style = rng.choice(spec["backgrounds"])
        c0 = _background_color(rng)
        c1 = c0 if style == "solid" else _background_color(rng)
        noise = round(rng.uniform(2.0, 8.0), 2) if rng.random() < 0.4 else 0.0
        bg = {"style": style, "colors": [c0, c1], "noise": noise, "noise_seed": rng.getrandbits(31)}
        if _contrast_ok(render_background(bg, width, height), shapes):
            break
    else:
        # Mid greys contrast with all eight shape colours.
        bg = {"style": style, "colors": [[112, 112, 112], [148, 148, 148]], "noise": 0.0, "noise_seed": 0}
    return {"width": width, "height": height, "background": bg, "shapes": shapes}


# ---------------------------------------------------------------------------------------------------------------
# Queries and their answers (pure functions of the scene)


def select(scene: dict, target: dict) -> list[dict]:
    """Shapes matching a target such as {"shape": "circle"}, {"color": "red"}, both, or {} (all)."""
    return [s for s in scene["shapes"]
            if target.get("shape") in (None, s["shape"]) and target.get("color") in (None, s["color"])]


def position_of(scene: dict, shape: dict, kind: str) -> str | None:
    """The unambiguous position answer for ``kind`` in ("open", "lr", "tb"), or None when it is unclear."""
    dx = shape["cx"] / scene["width"] - 0.5
    dy = shape["cy"] / scene["height"] - 0.5
    if kind == "lr":
        return None if abs(dx) < HALF_MIN else ("left" if dx < 0 else "right")
    if kind == "tb":
        return None if abs(dy) < HALF_MIN else ("top" if dy < 0 else "bottom")
    if max(abs(dx), abs(dy)) <= CENTER_MAX:
        return "center"
    if abs(dx) >= SIDE_MIN and abs(dx) >= SIDE_DOMINANCE * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= SIDE_MIN and abs(dy) >= SIDE_DOMINANCE * abs(dx):
        return "top" if dy < 0 else "bottom"
    return None


def _plural(kind: str, n: int) -> str:
    return kind if n == 1 else PLURALS[kind]


def describe_scene(scene: dict) -> str:
    """'a red circle, two blue squares and a green star': groups of equal shapes, ordered left to right."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in sorted(scene["shapes"], key=lambda s: (s["cx"], s["cy"])):
        groups.setdefault((s["color"], s["shape"]), []).append(s)
    items = []
    for (color, kind), members in groups.items():
        n = len(members)
        article = ("an" if color[0] in "aeiou" else "a") if n == 1 else NUMBER_WORDS[n]
        items.append(f"{article} {color} {_plural(kind, n)}")
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def answer_query(scene: dict, query: dict) -> str:
    """The canonical answer to a query (as stored in records' "queries") about a scene."""
    qtype = query["type"]
    if qtype in ("color", "shape", "position") or (qtype == "yesno" and query["kind"] == "attr"):
        matches = select(scene, query["target"])
        if len(matches) != 1:
            raise ValueError(f"query {query} does not name exactly one shape ({len(matches)} match)")
        (shape,) = matches
        if qtype == "color":
            return shape["color"]
        if qtype == "shape":
            return shape["shape"]
        if qtype == "position":
            pos = position_of(scene, shape, query["kind"])
            if pos is None:
                raise ValueError(f"query {query}: the position is ambiguous")
            return pos
        return "yes" if shape["color"] == query["color"] else "no"
    if qtype == "count":
        return str(len(select(scene, query["target"])))
    if qtype == "yesno":
        return "yes" if select(scene, query["target"]) else "no"
    if qtype == "describe":
        return describe_scene(scene)
    raise ValueError(f"unknown question type {qtype!r}")


# ---------------------------------------------------------------------------------------------------------------
# Questions


def _unique_refs(scene: dict, with_generic: bool) -> list[tuple[dict, str]]:
    """(target, noun phrase) pairs that name exactly one shape of the scene."""
    out = []
    shapes = scene["shapes"]
    for s in shapes:
        by_kind = {"shape": s["shape"]}
        by_color = {"color": s["color"]}
        both = {"shape": s["shape"], "color": s["color"]}
        if len(select(scene, by_kind)) == 1:
            out.append((by_kind, s["shape"]))
        if len(select(scene, by_color)) == 1:
            out.append((by_color, f"{s['color']} " + "{noun}"))
        if len(select(scene, both)) == 1 and len(select(scene, by_kind)) > 1:
            out.append((both, f"{s['color']} {s['shape']}"))
    if with_generic and len(shapes) == 1:
        out.append(({}, "{generic}"))
    return out


def _fill(template: str, rng: random.Random, **slots: str) -> str:
    text = _sample(_compiled(template), rng)
    # Slots may themselves hold {noun}/{generic}; fill twice.
    extra = {"noun": rng.choice(GENERIC_NOUNS + ("one",)), "generic": rng.choice(GENERIC_NOUNS)}
    text = text.format(**slots, **{k: v for k, v in extra.items() if k not in slots})
    text = text.format(**extra) if "{" in text else text
    return _tidy(text)


def _color_question(scene, rng, phr):
    kinds = [t for t in _unique_refs(scene, with_generic=True) if set(t[0]) <= {"shape"}]
    if not kinds:
        return None
    if len(scene["shapes"]) == 1 and rng.random() < 0.35:
        return _fill(rng.choice(PHRASINGS["color"]["single"][phr]), rng), {"type": "color", "target": {}}
    target, ref = rng.choice(kinds)
    return _fill(rng.choice(PHRASINGS["color"]["ref"][phr]), rng, ref=ref), {"type": "color", "target": target}


def _shape_question(scene, rng, phr):
    if len(scene["shapes"]) == 1 and rng.random() < 0.35:
        return _fill(rng.choice(PHRASINGS["shape"]["single"][phr]), rng), {"type": "shape", "target": {}}
    colors = [s["color"] for s in scene["shapes"] if len(select(scene, {"color": s["color"]})) == 1]
    if not colors:
        return None
    color = rng.choice(colors)
    text = _fill(rng.choice(PHRASINGS["shape"]["color"][phr]), rng, color=color)
    return text, {"type": "shape", "target": {"color": color}}


def _some_kind(scene, rng, p_present=0.85):
    present = sorted({s["shape"] for s in scene["shapes"]})
    return rng.choice(present) if rng.random() < p_present else rng.choice(SHAPES)


def _some_color(scene, rng, p_present=0.85):
    present = sorted({s["color"] for s in scene["shapes"]})
    return rng.choice(present) if rng.random() < p_present else rng.choice(list(COLORS))


def _count_question(scene, rng, phr):
    # Counting everything is weighted up: counts of one kind or colour are mostly "1" (kinds rarely repeat).
    mode = rng.choices(["all", "shape", "color", "both"], weights=[0.55, 0.2, 0.15, 0.1], k=1)[0]
    target: dict[str, str] = {}
    if mode in ("shape", "both"):
        target["shape"] = _some_kind(scene, rng)
    if mode in ("color", "both"):
        target["color"] = _some_color(scene, rng)
    if mode == "both" and rng.random() < 0.7:  # mostly ask about a combination that is there
        s = rng.choice(scene["shapes"])
        target = {"shape": s["shape"], "color": s["color"]}
    noun = PLURALS[target["shape"]] if "shape" in target else rng.choice(GENERIC_PLURALS)
    subj = f"{target['color']} {noun}" if "color" in target else noun
    return _fill(rng.choice(PHRASINGS["count"]["subj"][phr]), rng, subj=subj), {"type": "count", "target": target}


def _hard_negative(scene, rng):
    """A colour-and-kind pair not in the picture whose colour and kind both are (on other shapes), or None."""
    kinds = sorted({s["shape"] for s in scene["shapes"]})
    colors = sorted({s["color"] for s in scene["shapes"]})
    pairs = [(k, c) for k in kinds for c in colors if not select(scene, {"shape": k, "color": c})]
    return rng.choice(pairs) if pairs else None


def _yesno_question(scene, rng, phr, hard=None):
    """``hard``: None, or the probability that a "no" question names a near miss when the picture allows one (a
    colour that is on another shape, a kind that is there in another colour); None keeps the plain mix, in which
    such near misses are a minority of the "no" questions."""
    want_yes = rng.random() < 0.5
    refs = [t for t in _unique_refs(scene, with_generic=True) if set(t[0]) <= {"shape"}]
    if refs and rng.random() < 0.3:
        target, ref = rng.choice(refs)
        actual = select(scene, target)[0]["color"]
        others = sorted({s["color"] for s in scene["shapes"]} - {actual})
        if not want_yes and hard is not None and others and rng.random() < hard:
            color = rng.choice(others)
        else:
            color = actual if want_yes else rng.choice([c for c in COLORS if c != actual])
        text = _fill(rng.choice(PHRASINGS["yesno"]["attr"][phr]), rng, ref=ref, color=color)
        return text, {"type": "yesno", "kind": "attr", "target": target, "color": color}
    mode = rng.choices(["both", "shape", "color"], weights=[0.5, 0.3, 0.2], k=1)[0]
    near = _hard_negative(scene, rng) if (not want_yes and mode == "both" and hard is not None
                                          and rng.random() < hard) else None
    for _ in range(50):
        if near is not None:
            target = {"shape": near[0], "color": near[1]}
        elif want_yes:
            s = rng.choice(scene["shapes"])
            target = {"shape": s["shape"], "color": s["color"]}
        elif mode == "both" and rng.random() < 0.6:
            # Near misses: a colour that is there on another kind, or a kind that is there in another colour.
            target = {"shape": _some_kind(scene, rng, 0.5), "color": _some_color(scene, rng, 0.5)}
        else:
            target = {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS))}
        if mode != "both":
            target = {mode: target[mode]}
        if bool(select(scene, target)) == want_yes:
            break
    else:
        return None
    if mode == "both":
        np_, nps = f"{target['color']} {target['shape']}", f"{target['color']} {PLURALS[target['shape']]}"
    elif mode == "shape":
        np_, nps = target["shape"], PLURALS[target["shape"]]
    else:
        np_, nps = f"{target['color']} " + "{generic}", f"{target['color']} {rng.choice(GENERIC_PLURALS)}"
    text = _fill(rng.choice(PHRASINGS["yesno"]["exists"][phr]), rng, np=np_, nps=nps)
    return text, {"type": "yesno", "kind": "exists", "target": target}


def _position_question(scene, rng, phr):
    options = []
    for target, ref in _unique_refs(scene, with_generic=True):
        shape = select(scene, target)[0]
        for kind in ("open", "lr", "tb"):
            if position_of(scene, shape, kind) is not None:
                options.append((kind, target, ref))
    if not options:
        return None
    kind, target, ref = rng.choice(options)
    text = _fill(rng.choice(PHRASINGS["position"][kind][phr]), rng, ref=ref)
    return text, {"type": "position", "kind": kind, "target": target}


def _describe_question(scene, rng, phr):
    return _fill(rng.choice(PHRASINGS["describe"]["all"][phr]), rng), {"type": "describe"}


_BUILDERS = {"color": _color_question, "shape": _shape_question, "count": _count_question,
             "yesno": _yesno_question, "position": _position_question, "describe": _describe_question}


def decorate(core: str, qtype: str, phr: str, rng: random.Random) -> str:
    """Surface variation of a core question: articles, end mark, prefix, instruction suffix, casing."""
    text = core
    if rng.random() < 0.08:  # users drop articles ("what colour is circle")
        text = " ".join(w for w in text.split() if w not in ("the", "a", "an"))
    imperative = text.split()[0] in _IMPERATIVE_STARTS
    r = rng.random()
    if imperative:
        end = "." if r < 0.4 else ""
    else:
        end = "?" if r < 0.75 else ("" if r < 0.95 else " ?")
    text += end
    if rng.random() < 0.12:
        text = rng.choice(PREFIXES[phr]) + text
    suffix = rng.choice(SUFFIXES[qtype][phr]) if rng.random() < 0.2 else ""
    r = rng.random()
    if r < 0.4:
        casing = "lower"
    elif r < 0.93:
        casing = "sentence"
    elif r < 0.97:
        casing = "title"
    else:
        casing = "upper"
    if casing == "sentence":
        text = text[0].upper() + text[1:]
    elif casing == "title":
        text = " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    elif casing == "upper":
        text, suffix = text.upper(), suffix.upper()
    if casing == "lower" and rng.random() < 0.5:
        suffix = suffix.lower()
    if suffix:
        # Without an end mark a space would run the two sentences together.
        text += (rng.choice([" ", "\n"]) if end.strip() else "\n") + suffix
    return text


def make_questions(scene: dict, rng: random.Random, n: int, phrasings: str = "train",
                   type_weights: dict | None = None, yesno_hard: float | None = None) -> list[tuple[str, str, dict]]:
    """Up to ``n`` distinct (question, answer, query) triples about a scene (fewer only if the scene runs out).
    ``yesno_hard``: the share of near misses among "no" answers that can have one (``_yesno_question``)."""
    weights = dict(type_weights or DEFAULT_TYPE_WEIGHTS)
    out: list[tuple[str, str, dict]] = []
    seen: set[str] = set()
    for _ in range(20 * n + 20):
        if len(out) == n:
            break
        qtype = _choice_weighted(rng, weights)
        if qtype == "yesno" and yesno_hard is not None:
            built = _yesno_question(scene, rng, phrasings, hard=yesno_hard)
        else:
            built = _BUILDERS[qtype](scene, rng, phrasings)
        if built is None:
            continue
        core, query = built
        key = json.dumps(query, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append((decorate(core, qtype, phrasings, rng), answer_query(scene, query), query))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Dataset


def _resolve_split(split: str, phrasings: str | None, rendering: str | None) -> tuple[str, str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    phr, ren = phrasings or split, rendering or split
    if phr not in SPLITS or ren not in SPLITS:
        raise ValueError(f"phrasings/rendering must be one of {SPLITS}, got {phrasings!r}/{rendering!r}")
    return phr, ren


def _image_rng(seed: int, phr: str, ren: str, index: int) -> random.Random:
    # A per-image stream: any image can be made alone, and the result never depends on the others.
    digest = hashlib.sha256(f"fastllava-synthetic:{seed}:{phr}:{ren}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def make_example(seed: int, index: int, split: str = "train", *, questions_per_image: int = 1,
                 image_size: int | Sequence[int] = 64, phrasings: str | None = None, rendering: str | None = None,
                 type_weights: dict | None = None, max_shapes: int = 4,
                 image_format: str = "png", yesno_hard: float | None = None,
                 shape_weights: dict | None = None) -> tuple[Image.Image, dict]:
    """One (image, record) pair, in memory. The record's "image" is the file name it would be saved under, and
    "image_format"/"jpeg_quality" say how to encode it (a JPEG round trip changes the pixels)."""
    phr, ren = _resolve_split(split, phrasings, rendering)
    rng = _image_rng(seed, phr, ren, index)
    size = image_size if isinstance(image_size, int) else rng.choice(list(image_size))
    scene = sample_scene(rng, size, size, ren, max_shapes=max_shapes, shape_weights=shape_weights)
    image = render_scene(scene)
    qas = make_questions(scene, rng, questions_per_image, phr, type_weights, yesno_hard)
    fmt = image_format if image_format != "mixed" else rng.choice(["png", "jpg"])
    if fmt not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png', 'jpg' or 'mixed', got {image_format!r}")
    quality = rng.randint(*RENDERING[ren]["jpeg_quality"]) if fmt == "jpg" else None
    rid = f"{split}-s{seed}-{index:06d}"
    conversations = []
    for i, (question, answer, _query) in enumerate(qas):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    record = {
        "id": rid,
        "image": f"{rid}.{fmt}",
        "conversations": conversations,
        "question_types": [q["type"] for _, _, q in qas],
        "queries": [q for _, _, q in qas],
        "scene": scene,
        "split": {"phrasings": phr, "rendering": ren},
    }
    if quality is not None:
        record["jpeg_quality"] = quality
    return image, record


def encode_image(image: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    """PNG or JPEG bytes, with fixed encoder settings so files are reproducible."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        image.save(buf, format="JPEG", quality=int(quality or 90))
    return buf.getvalue()


def generate_dataset(out_dir: str | os.PathLike, num_images: int, seed: int = 0, split: str = "train", *,
                     questions_per_image: int = 1, image_size: int | Sequence[int] = 64,
                     image_format: str = "png", phrasings: str | None = None, rendering: str | None = None,
                     type_weights: dict | None = None, max_shapes: int = 4, image_dir: str = "images",
                     json_name: str | None = None) -> Path:
    """Write ``num_images`` images under ``out_dir/image_dir`` and a LLaVA JSON list; return the JSON's path.

    ``split`` "train" or "heldout" picks phrasings and rendering variations (override each with
    ``phrasings=``/``rendering=``). ``image_size`` is a side in pixels or a sequence to pick from per image.
    ``image_format``: "png", "jpg" or "mixed" (half each). ``type_weights`` maps question types to weights.
    Image paths in the JSON are relative to ``out_dir``.
    """
    out = Path(out_dir)
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(num_images):
        image, record = make_example(seed, index, split, questions_per_image=questions_per_image,
                                     image_size=image_size, phrasings=phrasings, rendering=rendering,
                                     type_weights=type_weights, max_shapes=max_shapes, image_format=image_format)
        fmt = record["image"].rsplit(".", 1)[1]
        record["image"] = f"{image_dir}/{record['image']}" if image_dir else record["image"]
        (out / record["image"]).write_bytes(encode_image(image, fmt, record.get("jpeg_quality")))
        records.append(record)
    path = out / (json_name or f"{split}.json")
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# All the text the generator can produce (for the demo tokenizer and for checking the held-out split)


def _slot_values() -> dict[str, list[str]]:
    colors = list(COLORS)
    nouns = list(GENERIC_NOUNS) + ["one"]
    color_refs = [f"{c} {n}" for c in colors for n in nouns]
    pair = [f"{c} {s}" for c in colors for s in SHAPES]
    return {
        "ref": list(SHAPES) + list(GENERIC_NOUNS) + color_refs + pair,
        "color": colors,
        "noun": nouns,
        "subj": list(GENERIC_PLURALS) + list(PLURALS.values()) + [f"{c} {p}" for c in colors for p in
                                                                  list(GENERIC_PLURALS) + list(PLURALS.values())],
        "np": list(SHAPES) + pair + [f"{c} {n}" for c in colors for n in GENERIC_NOUNS],
        "nps": list(PLURALS.values()) + [f"{c} {p}" for c in colors for p in
                                         list(PLURALS.values()) + list(GENERIC_PLURALS)],
    }


def enumerate_phrasings(split: str) -> set[str]:
    """Every core question (lowercase, before prefixes/suffixes/casing) a split's templates can produce."""
    values = _slot_values()
    out: set[str] = set()
    for forms in PHRASINGS.values():
        for splits in forms.values():
            for template in splits[split]:
                for text in expand_phrasing(template):
                    names = sorted(set(re.findall(r"\{(\w+)\}", text)))
                    for combo in itertools.product(*(values[n] for n in names)):
                        out.add(_tidy(text.format(**dict(zip(names, combo)))))
    return out


def text_corpus() -> list[str]:
    """Every phrasing of both splits, the affixes, the answers and the chat-template words, one string each."""
    texts = sorted(enumerate_phrasings("train") | enumerate_phrasings("heldout"))
    texts += [t[0].upper() + t[1:] for t in texts]
    for split in SPLITS:
        texts += PREFIXES[split]
        texts += [s for by in SUFFIXES.values() for s in by[split]]
    texts += list(COLORS) + list(SHAPES) + list(PLURALS.values()) + list(POSITIONS) + ["yes", "no"]
    texts += [str(i) for i in range(10)] + list(NUMBER_WORDS.values())
    for n in (1, 2):
        for combo in itertools.product(COLORS, SHAPES, repeat=n):
            scene = {"shapes": [{"color": combo[2 * i], "shape": combo[2 * i + 1], "cx": i, "cy": 0}
                                for i in range(n)]}
            texts.append(describe_scene(scene))
    texts += ["USER:", "ASSISTANT:", "USER: <image>\n", " ASSISTANT:", "Question:", "Answer:",
              "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions."]
    return texts


# ---------------------------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> None:
    """``python -m fastllava.train.synthetic_data OUT_DIR --num-images N --seed S --split train``"""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--questions-per-image", type=int, default=1)
    p.add_argument("--image-size", type=int, nargs="+", default=[64])
    p.add_argument("--image-format", choices=["png", "jpg", "mixed"], default="png")
    p.add_argument("--phrasings", choices=SPLITS)
    p.add_argument("--rendering", choices=SPLITS)
    p.add_argument("--max-shapes", type=int, default=4)
    args = p.parse_args(list(argv) if argv is not None else None)
    t0 = time.perf_counter()
    path = generate_dataset(args.out_dir, args.num_images, args.seed, args.split,
                            questions_per_image=args.questions_per_image,
                            image_size=args.image_size[0] if len(args.image_size) == 1 else args.image_size,
                            image_format=args.image_format, phrasings=args.phrasings, rendering=args.rendering,
                            max_shapes=args.max_shapes)
    dt = time.perf_counter() - t0
    print(f"wrote {args.num_images} images and {path} in {dt:.1f} s ({args.num_images / max(dt, 1e-9):.0f} images/s)")


if __name__ == "__main__":
    main()
