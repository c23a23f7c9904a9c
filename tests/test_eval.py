"""Evaluation: answer normalization, matching, and the runner with oracle and wrong answer functions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fastllava.eval.metrics import accuracy_table, answer_match, exact_match, normalize_answer, parse_description
from fastllava.eval.runner import evaluate, evaluate_file, format_report, iter_questions, load_llava_json
from fastllava.train.synthetic_data import QUESTION_TYPES, generate_dataset


@pytest.mark.parametrize("raw, norm", [
    ("Red", "red"),
    ("red.", "red"),
    ("  RED!  ", "red"),
    ("The circle", "circle"),
    ("a square", "square"),
    ("An orange star.", "orange star"),
    ("two", "2"),
    ("Three.", "3"),
    ("zero", "0"),
    ("none", "0"),
    ("4", "4"),
    ("Colour", "color"),
    ("grey", "gray"),
    ("centre", "center"),
    ("In the middle", "in center"),
    ("Yes, it is.", "yes it is"),
    ("yes", "yes"),
    ("it's red", "it s red"),
    ("a red circle, and a blue square", "red circle and blue square"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("pred, gold, ok", [
    ("Red.", "red", True),
    ("two", "2", True),
    ("2", "two", True),
    ("The colour is grey", "the color is gray", True),
    ("Centre", "center", True),
    ("middle", "center", True),
    ("violet", "purple", True),
    ("yes", "no", False),
    ("red circle", "red", False),  # exact match: extra words are wrong
    ("3", "4", False),
    ("left", "right", False),
])
def test_exact_match(pred, gold, ok):
    assert exact_match(pred, gold) is ok


@pytest.mark.parametrize("pred, gold, ok", [
    ("a red circle and a blue square", "a red circle and a blue square", True),
    ("A blue square and a red circle.", "a red circle and a blue square", True),  # order does not matter
    ("a blue square, a red circle", "a red circle and a blue square", True),
    ("two red circles", "a red circle and a red circle", True),
    ("2 red circles and a green star", "a green star and two red circles", True),
    ("three crosses", "a cross, a cross and a cross", True),
    ("a red circle", "two red circles", False),
    ("a red circle and a blue square", "a red circle", False),
    ("a red circle and a green square", "a red circle and a blue square", False),
    ("", "a red circle", False),
])
def test_describe_match(pred, gold, ok):
    assert answer_match(pred, gold, "describe") is ok


def test_non_describe_types_are_exact():
    assert not answer_match("a blue square and a red circle", "a red circle and a blue square", "color")
    assert answer_match("Yes.", "yes", "yesno")
    assert parse_description("") is None


def test_accuracy_table():
    table = accuracy_table([("color", True), ("color", False), ("count", True), ("color", True)])
    assert table["overall"] == {"correct": 3, "total": 4, "accuracy": 0.75}
    assert list(table["per_type"]) == ["color", "count"]
    assert table["per_type"]["color"] == {"correct": 2, "total": 3, "accuracy": 2 / 3}
    assert accuracy_table([])["overall"] == {"correct": 0, "total": 0, "accuracy": 0.0}


# --------------------------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalset")
    path = generate_dataset(out, 60, seed=11, split="heldout", questions_per_image=3, image_format="mixed")
    return path, load_llava_json(path)


def _oracle(records, root):
    """An answer function that knows every answer, looked up by the picture's pixels and the question."""
    table = {}
    for q in iter_questions(records):
        with Image.open(root / q["image"]) as im:
            table[(im.convert("RGB").tobytes(), q["question"])] = (q["answer"], q["question_type"])
    return table


def test_runner_perfect_oracle(dataset):
    path, records = dataset
    table = _oracle(records, path.parent)
    seen = []

    def answer_fn(image, question):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert "<image>" not in question and question == question.strip()
        seen.append(question)
        return table[(image.tobytes(), question)][0]

    result = evaluate(records, path.parent, answer_fn)
    assert result["overall"] == {"correct": 180, "total": 180, "accuracy": 1.0}
    assert set(result["per_type"]) == set(QUESTION_TYPES)
    assert all(c["accuracy"] == 1.0 for c in result["per_type"].values())
    assert sum(c["total"] for c in result["per_type"].values()) == 180
    assert result["mistakes"] == [] and result["num_records"] == 60 and len(seen) == 180
    report = format_report(result)
    assert "overall" in report and "100.0%" in report and all(t in report for t in QUESTION_TYPES)


def test_runner_tolerates_surface_variation(dataset):
    path, records = dataset
    table = _oracle(records, path.parent)
    words = {str(i): w for i, w in enumerate(["zero", "one", "two", "three", "four"])}

    def answer_fn(image, question):
        answer, qtype = table[(image.tobytes(), question)]
        answer = words.get(answer, answer)
        if qtype == "describe":  # reverse the order of the items
            items = answer.replace(" and ", ", ").split(", ")
            answer = " and ".join(reversed(items))
        return answer.capitalize() + "."

    assert evaluate(records, path.parent, answer_fn)["overall"]["accuracy"] == 1.0


def test_runner_wrong_answers_and_per_type_breakdown(dataset):
    path, records = dataset
    result = evaluate_file(path, lambda image, question: "banana")
    assert result["overall"]["correct"] == 0 and result["overall"]["accuracy"] == 0.0
    assert len(result["mistakes"]) == 180
    m = result["mistakes"][0]
    assert set(m) >= {"id", "image", "turn", "question_type", "question", "answer", "prediction"}
    assert m["prediction"] == "banana"

    table = _oracle(records, path.parent)

    def colors_only(image, question):
        answer, qtype = table[(image.tobytes(), question)]
        return answer if qtype == "color" else "banana"

    result = evaluate(records, path.parent, colors_only, max_mistakes=5)
    per = result["per_type"]
    assert per["color"]["accuracy"] == 1.0 and per["color"]["total"] > 0
    assert all(per[t]["accuracy"] == 0.0 for t in QUESTION_TYPES if t != "color")
    assert result["overall"]["correct"] == per["color"]["total"]
    assert len(result["mistakes"]) == 5
    assert "banana" in format_report(result, max_mistakes=2)


def test_runner_limit_progress_and_untyped_records(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    records = [
        {"id": "a", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}],
         "question_type": "chat"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert load_llava_json(path) == records
    (tmp_path / "data.json").write_text(json.dumps(records))
    assert load_llava_json(tmp_path / "data.json") == records

    calls = []

    def answer_fn(image, question):
        if image is None:
            return "hi"
        assert np.asarray(image)[0, 0].tolist() == [255, 0, 0]
        return {"What colour is it?": "Red", "Is it red?": "no"}[question]

    result = evaluate(records, tmp_path, answer_fn, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert result["per_type"]["unknown"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert result["per_type"]["chat"]["accuracy"] == 1.0
    assert result["mistakes"][0]["question"] == "Is it red?"
    assert evaluate(records, tmp_path, answer_fn, limit=1)["overall"]["total"] == 1
    with pytest.raises(ValueError):
        (tmp_path / "bad.json").write_text("[{\"id\": 1}]")
        load_llava_json(tmp_path / "bad.json")
