"""Synthetic shapes VQA generator and demo tokenizer: reproducible, correct, unambiguous, held-out split honest."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fastllava.train import synthetic_data as sd
from fastllava.train.demo_tokenizer import SPECIAL_TOKENS, build_demo_tokenizer, save_demo_tokenizer
from fastllava.train.shapes import COLORS, PLURALS, SHAPES, render_background

N_IMAGES = 300  # enough for every question type and position answer to occur


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    path = sd.generate_dataset(out, N_IMAGES, seed=1, split="train", questions_per_image=3)
    return out, json.loads(path.read_text())


@pytest.fixture(scope="module")
def heldout_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    path = sd.generate_dataset(out, N_IMAGES, seed=1, split="heldout", questions_per_image=3,
                               image_format="mixed", image_size=[56, 72, 96])
    return out, json.loads(path.read_text())


def _pairs(record):
    turns = record["conversations"]
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def _words(text):
    return re.findall(r"[a-z]+", text.lower())


# --------------------------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_identical_bytes(tmp_path):
    kw = dict(questions_per_image=3, image_format="mixed", image_size=[56, 64, 80])
    a = sd.generate_dataset(tmp_path / "a", 40, seed=7, split="heldout", **kw)
    b = sd.generate_dataset(tmp_path / "b", 40, seed=7, split="heldout", **kw)
    assert a.read_bytes() == b.read_bytes()
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "images").iterdir())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b" / "images").iterdir())
    assert files_a == files_b and len(files_a) == 40
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    c = sd.generate_dataset(tmp_path / "c", 40, seed=8, split="heldout", **kw)
    assert json.loads(c.read_text())[0]["scene"] != json.loads(a.read_text())[0]["scene"]


def test_make_example_matches_saved_png(train_set):
    out, records = train_set
    image, record = sd.make_example(1, 5, "train", questions_per_image=3)
    assert record["conversations"] == records[5]["conversations"]
    saved = Image.open(out / records[5]["image"])
    assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))


# --------------------------------------------------------------------------------------------- record format


@pytest.mark.parametrize("which", ["train_set", "heldout_set"])
def test_record_format(which, request):
    out, records = request.getfixturevalue(which)
    assert len(records) == N_IMAGES
    assert len({r["id"] for r in records}) == N_IMAGES
    for r in records:
        assert set(r) >= {"id", "image", "conversations", "question_types", "queries", "scene"}
        assert not r["image"].startswith("/") and (out / r["image"]).is_file()
        turns = r["conversations"]
        assert len(turns) == 6 and len(r["question_types"]) == 3 == len(r["queries"])
        for i, turn in enumerate(turns):
            assert turn["from"] == ("human" if i % 2 == 0 else "gpt")
            assert isinstance(turn["value"], str) and turn["value"].strip()
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert r["question_types"] == [q["type"] for q in r["queries"]]
        assert all(t in sd.QUESTION_TYPES for t in r["question_types"])
        with Image.open(out / r["image"]) as im:
            assert im.size == (r["scene"]["width"], r["scene"]["height"])
            assert im.format == ("PNG" if r["image"].endswith(".png") else "JPEG")


def test_image_formats_and_sizes(heldout_set):
    _, records = heldout_set
    exts = Counter(r["image"].rsplit(".", 1)[1] for r in records)
    assert set(exts) == {"png", "jpg"} and min(exts.values()) > N_IMAGES // 4
    assert {r["scene"]["width"] for r in records} == {56, 72, 96}


# --------------------------------------------------------------------------------------------- correctness
# An independent re-derivation of every answer from the scene description.


def _matching(scene, color=None, kind=None):
    return [s for s in scene["shapes"] if color in (None, s["color"]) and kind in (None, s["shape"])]


def _expected(scene, q):
    t = q["type"]
    target = q.get("target", {})
    matches = _matching(scene, target.get("color"), target.get("shape"))
    if t == "count":
        return str(len(matches))
    if t == "yesno" and q["kind"] == "exists":
        return "yes" if matches else "no"
    if t == "describe":
        return None  # checked on its own below
    assert len(matches) == 1, f"ambiguous target {q} in {scene['shapes']}"
    s = matches[0]
    if t == "color":
        return s["color"]
    if t == "shape":
        return s["shape"]
    if t == "yesno":
        return "yes" if s["color"] == q["color"] else "no"
    fx, fy = s["cx"] / scene["width"], s["cy"] / scene["height"]
    if q["kind"] == "lr":
        assert abs(fx - 0.5) >= 0.1
        return "left" if fx < 0.5 else "right"
    if q["kind"] == "tb":
        assert abs(fy - 0.5) >= 0.1
        return "top" if fy < 0.5 else "bottom"
    if abs(fx - 0.5) < 0.1 and abs(fy - 0.5) < 0.1:
        return "center"
    # Open "where" answers must sit clearly in one direction, never in a corner.
    horizontal = abs(fx - 0.5) > abs(fy - 0.5)
    big, small = max(abs(fx - 0.5), abs(fy - 0.5)), min(abs(fx - 0.5), abs(fy - 0.5))
    assert big >= 0.12 and big >= 1.5 * small
    if horizontal:
        return "left" if fx < 0.5 else "right"
    return "top" if fy < 0.5 else "bottom"


def _described_items(text):
    items = Counter()
    for part in re.split(r", | and ", text):
        words = part.split()
        n = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}[words[0]]
        kind = {v: k for k, v in PLURALS.items()}.get(words[2], words[2])
        items[(words[1], kind)] += n
    return items


@pytest.mark.parametrize("which", ["train_set", "heldout_set"])
def test_every_answer_is_right_for_its_scene(which, request):
    _, records = request.getfixturevalue(which)
    for r in records:
        scene = r["scene"]
        for (question, answer), q in zip(_pairs(r), r["queries"]):
            if q["type"] == "describe":
                assert _described_items(answer) == Counter((s["color"], s["shape"]) for s in scene["shapes"])
                xs = [min(s["cx"] for s in _matching(scene, c, k)) for c, k in _described_items(answer)]
                assert xs == sorted(xs), "describe lists shapes left to right"
            else:
                assert answer == _expected(scene, q), (question, answer, q)
            assert answer == sd.answer_query(scene, q)


def _mentions(question):
    """Colour and shape words a question names (plurals folded to the shape)."""
    words = _words(question)
    colors = {w for w in words if w in COLORS}
    kinds = {w for w in words if w in SHAPES} | {k for k, p in PLURALS.items() if p in words}
    return colors, kinds


@pytest.mark.parametrize("which", ["train_set", "heldout_set"])
def test_questions_are_unambiguous_from_their_text(which, request):
    """Read only the question text: the shape it is about must be exactly one shape of the picture."""
    _, records = request.getfixturevalue(which)
    for r in records:
        scene = r["scene"]
        for (question, answer), q in zip(_pairs(r), r["queries"]):
            colors, kinds = _mentions(question)
            assert len(colors) <= 1 and len(kinds) <= 1, question
            color, kind = next(iter(colors), None), next(iter(kinds), None)
            if q["type"] in ("color", "shape", "position"):
                assert len(_matching(scene, color, kind)) == 1, (question, scene["shapes"])
                if q["type"] == "color":
                    assert color is None
                if q["type"] == "shape":
                    assert kind is None
            elif q["type"] == "yesno" and q["kind"] == "attr":
                assert len(_matching(scene, None, kind)) == 1, (question, scene["shapes"])
                assert color == q["color"]
            elif q["type"] in ("count", "yesno"):
                assert answer == (str(len(_matching(scene, color, kind))) if q["type"] == "count"
                                  else ("yes" if _matching(scene, color, kind) else "no")), question
            else:
                assert not colors and not kinds, question


def test_pixels_match_the_scene(train_set):
    out, records = train_set
    for r in records[:100]:
        scene = r["scene"]
        img = np.asarray(Image.open(out / r["image"]).convert("RGB")).astype(int)
        bg = render_background(scene["background"], scene["width"], scene["height"])
        for s in scene["shapes"]:
            # The centre of every shape kind is inside it, well away from antialiased edges.
            px = img[int(s["cy"]), int(s["cx"])]
            assert np.abs(px - np.asarray(s["rgb"])).max() <= 2, (s, px)
            # The shape stands out from the background under it.
            r_ = s["size"] / 2
            patch = bg[max(0, int(s["cy"] - r_)):int(s["cy"] + r_) + 1, max(0, int(s["cx"] - r_)):int(s["cx"] + r_) + 1]
            assert np.sqrt(((patch - np.asarray(s["rgb"])) ** 2).sum(-1)).min() >= sd.MIN_CONTRAST
            assert np.abs(np.asarray(s["rgb"]) - np.asarray(COLORS[s["color"]])).max() <= sd.COLOR_JITTER
        for a in scene["shapes"]:  # never overlapping, always inside the picture
            assert a["size"] / 2 + 1 <= a["cx"] <= scene["width"] - a["size"] / 2 - 1
            assert a["size"] / 2 + 1 <= a["cy"] <= scene["height"] - a["size"] / 2 - 1
            for b in scene["shapes"]:
                if a is not b:
                    assert math.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"]) > (a["size"] + b["size"]) / 2


def test_question_mix(train_set):
    _, records = train_set
    queries = [q for r in records for q in r["queries"]]
    answers = [a for r in records for _, a in _pairs(r)]
    types = Counter(q["type"] for q in queries)
    assert set(types) == set(sd.QUESTION_TYPES)
    assert all(types[t] >= 0.04 * len(queries) for t in sd.QUESTION_TYPES), types
    yn = Counter(a for a, q in zip(answers, queries) if q["type"] == "yesno")
    assert 0.35 < yn["yes"] / (yn["yes"] + yn["no"]) < 0.65
    positions = {a for a, q in zip(answers, queries) if q["type"] == "position"}
    assert positions == set(sd.POSITIONS)
    counts = {a for a, q in zip(answers, queries) if q["type"] == "count"}
    assert {"0", "1", "2", "3", "4"} <= counts
    assert {len(r["scene"]["shapes"]) for r in records} == {1, 2, 3, 4}
    assert len({q for r in records for q, _ in _pairs(r)}) > 0.9 * len(queries)  # phrasing varies widely


def _near_miss(record, query, answer):
    """A "no" answer whose colour (and, for colour-and-kind questions, kind) is in the picture."""
    shapes = record["scene"]["shapes"]
    if answer != "no":
        return False
    if query["kind"] == "attr":
        return any(s["color"] == query["color"] for s in shapes)
    target = query["target"]
    return (len(target) == 2 and any(s["color"] == target["color"] for s in shapes)
            and any(s["shape"] == target["shape"] for s in shapes))


def test_yesno_near_misses():
    """``yesno_hard`` makes near misses of many more "no" answers (where the picture has one); answers stay right."""
    def yesno(hard):
        out = []
        for i in range(150):
            _, record = sd.make_example(4, i, questions_per_image=2, type_weights={"yesno": 1.0}, yesno_hard=hard)
            for query, (_, answer) in zip(record["queries"], _pairs(record)):
                assert sd.answer_query(record["scene"], query) == answer
                out.append(_near_miss(record, query, answer))
        return out

    plain, hard = yesno(None), yesno(1.0)
    assert sum(hard) > 2 * sum(plain) > 0


def test_shape_count_weights():
    """``shape_weights`` changes how many shapes the pictures hold; without it the generator's own mix is kept."""
    def counts(weights):
        return [len(sd.make_example(6, i, shape_weights=weights)[1]["scene"]["shapes"]) for i in range(60)]

    assert set(counts({"4": 1.0})) == {4} and set(counts({1: 1.0})) == {1}
    assert counts(None) == [len(sd.make_example(6, i)[1]["scene"]["shapes"]) for i in range(60)]
    assert counts(dict(sd.NUM_SHAPES_WEIGHTS)) == counts(None)


# --------------------------------------------------------------------------------------------- held-out split


def _norm_question(text):
    text = text.replace("<image>", " ")
    return " ".join(w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in ("the", "a", "an"))


def test_heldout_phrasings_never_occur_in_train(train_set, heldout_set):
    train_q = {_norm_question(q) for r in train_set[1] for q, _ in _pairs(r)}
    heldout_q = {_norm_question(q) for r in heldout_set[1] for q, _ in _pairs(r)}
    assert not train_q & heldout_q
    # Exhaustively over the templates too: no core phrasing (even without articles) is shared.
    train_all = {_norm_question(x) for x in sd.enumerate_phrasings("train")}
    heldout_all = {_norm_question(x) for x in sd.enumerate_phrasings("heldout")}
    assert not train_all & heldout_all


def test_heldout_phrasings_use_only_train_words():
    """A fair test for a model trained from scratch: new sentences, no new words."""
    def words(split):
        texts = list(sd.enumerate_phrasings(split)) + sd.PREFIXES[split]
        texts += [s for by in sd.SUFFIXES.values() for s in by[split]]
        return {w for t in texts for w in _words(t)}
    assert words("heldout") <= words("train")


def test_heldout_rendering_never_in_train(train_set, heldout_set):
    train_bg = {r["scene"]["background"]["style"] for r in train_set[1]}
    heldout_bg = {r["scene"]["background"]["style"] for r in heldout_set[1]}
    assert train_bg == set(sd.RENDERING["train"]["backgrounds"])
    assert heldout_bg == set(sd.RENDERING["heldout"]["backgrounds"])
    assert not train_bg & heldout_bg

    def in_bands(record, split):
        side = min(record["scene"]["width"], record["scene"]["height"])
        return all(any(lo - 0.01 <= s["size"] / side <= hi + 0.01 for lo, hi in sd.RENDERING[split]["size_bands"])
                   for s in record["scene"]["shapes"])
    assert all(in_bands(r, "train") for r in train_set[1])
    assert all(in_bands(r, "heldout") for r in heldout_set[1])
    qualities = {r["jpeg_quality"] for r in heldout_set[1] if "jpeg_quality" in r}
    lo, hi = sd.RENDERING["heldout"]["jpeg_quality"]
    assert qualities and all(lo <= q <= hi for q in qualities)


def test_split_overrides(tmp_path):
    path = sd.generate_dataset(tmp_path, 60, seed=3, split="train", phrasings="heldout", questions_per_image=2)
    records = json.loads(path.read_text())
    assert all(r["split"] == {"phrasings": "heldout", "rendering": "train"} for r in records)
    assert {r["scene"]["background"]["style"] for r in records} <= set(sd.RENDERING["train"]["backgrounds"])
    heldout_all = {_norm_question(x) for x in sd.enumerate_phrasings("heldout")}
    train_all = {_norm_question(x) for x in sd.enumerate_phrasings("train")}
    for r in records:
        for q, _ in _pairs(r):
            nq = _norm_question(q)
            assert any(h in nq for h in heldout_all) and nq not in train_all
    with pytest.raises(ValueError):
        sd.generate_dataset(tmp_path, 1, split="test")


def test_type_weights_and_cli(tmp_path, capsys):
    path = sd.generate_dataset(tmp_path / "w", 20, seed=0, questions_per_image=2,
                               type_weights={"count": 1.0}, json_name="counts.json")
    records = json.loads(path.read_text())
    assert path.name == "counts.json"
    assert {t for r in records for t in r["question_types"]} == {"count"}
    sd.main([str(tmp_path / "cli"), "--num-images", "5", "--seed", "2", "--split", "heldout",
             "--image-format", "jpg"])
    assert "wrote 5 images" in capsys.readouterr().out
    records = json.loads((tmp_path / "cli" / "heldout.json").read_text())
    assert len(records) == 5 and all(r["image"].endswith(".jpg") for r in records)


# --------------------------------------------------------------------------------------------- demo tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def test_tokenizer_specials_and_size(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert 500 <= tokenizer.get_vocab_size() <= 2000
    enc = tokenizer.encode("USER: <image>\nWhat colour is the circle? ASSISTANT:")
    assert enc.ids[0] == 1 and enc.ids.count(4) == 1  # <s> first, <image> a single id
    assert tokenizer.to_str() == build_demo_tokenizer().to_str()  # deterministic training


def test_tokenizer_round_trips_answers_and_questions(tokenizer, heldout_set):
    texts = [t["value"] for r in heldout_set[1] for t in r["conversations"]]
    texts += [*COLORS, *SHAPES, *sd.POSITIONS, "yes", "no", "0", "4", "Hello wörld 🙂  x"]
    for text in texts:
        for t in (text, " " + text):
            ids = tokenizer.encode(t, add_special_tokens=False).ids
            assert tokenizer.decode(ids, skip_special_tokens=False) == t
            assert 0 not in ids  # byte-level: no <unk>
    # Word-bounded tokens: prompt + answer tokenizes as the two parts (simple label masking).
    for r in heldout_set[1][:50]:
        prompt = "USER: " + r["conversations"][0]["value"] + " ASSISTANT:"
        answer = " " + r["conversations"][1]["value"]
        assert (tokenizer.encode(prompt + answer).ids
                == tokenizer.encode(prompt).ids + tokenizer.encode(answer, add_special_tokens=False).ids)


def test_tokenizer_loads_in_transformers_with_same_ids(tokenizer, tmp_path, train_set):
    transformers = pytest.importorskip("transformers")
    save_demo_tokenizer(tmp_path, tokenizer=tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert hf.convert_tokens_to_ids("<image>") == 4
    texts = ["USER: " + t["value"] + " ASSISTANT:" for r in train_set[1][:60] for t in r["conversations"][::2]]
    texts += [t["value"] for r in train_set[1][:60] for t in r["conversations"][1::2]]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
        assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
