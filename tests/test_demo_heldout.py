"""Issue #5's acceptance check on the shipped demo model: on 500 freshly generated held-out questions (the scored set
of the model card: new pictures and questions from a seed never used in training, drawn from the trained
distribution, as ``fastllava train-demo`` writes it) the accuracy targets hold, and transformers, loading the same
checkpoint, gives the same greedy tokens on every question."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import fastllava
from fastllava.cli import DEMO_MODEL
from fastllava.eval.metrics import accuracy_table, answer_match
from fastllava.eval.runner import iter_questions, load_llava_json
from fastllava.train.demo import EVAL_SEED, write_eval_set

TARGETS = {"color": 0.95, "shape": 0.95, "yesno": 0.95, "count": 0.85}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """500 held-out questions, one per picture, and both libraries' greedy token ids for each."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("heldout")
    records = load_llava_json(write_eval_set(directory, 500, seed=EVAL_SEED, split="train"))
    ours = fastllava.LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL).eval()
    processor = fastllava.AutoProcessor.from_pretrained(DEMO_MODEL)
    rows = []
    for q in iter_questions(records):
        with Image.open(directory / q["image"]) as picture:
            image = picture.convert("RGB")
        conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": q["question"]}]}]
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        start = inputs["input_ids"].shape[1]
        our_ids = ours.generate(**inputs, max_new_tokens=32, do_sample=False)[0, start:]
        with torch.no_grad():
            their_ids = theirs.generate(**inputs, max_new_tokens=32, do_sample=False)[0, start:]
        rows.append(({**q, "picture": image}, our_ids, their_ids, processor.decode(our_ids, skip_special_tokens=True).strip()))
    return rows


def test_heldout_set_is_the_size_the_issue_asks(heldout):
    assert len(heldout) == 500


def test_transformers_greedy_answers_equal_ours(heldout):
    differing = [q["question"] for q, ours, theirs, _ in heldout if not torch.equal(ours, theirs)]
    assert not differing, f"{len(differing)} of {len(heldout)} answers differ, e.g. {differing[:3]}"


def test_accuracy_targets_hold(heldout):
    table = accuracy_table([(q["question_type"], answer_match(answer, q["answer"], q["question_type"]))
                            for q, _, _, answer in heldout])
    per_type = table["per_type"]
    below = {t: round(per_type[t]["accuracy"], 3) for t, target in TARGETS.items()
             if per_type[t]["total"] == 0 or per_type[t]["accuracy"] < target}
    assert not below, f"below issue #5's targets {TARGETS}: {below}"


def test_int8_accuracy_within_one_point_of_full_precision(heldout):
    """Issue #7 on the demo model: weight-only int8 (text model and lm_head) loses at most 1 point of accuracy."""
    processor = fastllava.AutoProcessor.from_pretrained(DEMO_MODEL)
    int8 = fastllava.LlavaForConditionalGeneration.from_pretrained(
        DEMO_MODEL, quantization_config=fastllava.QuantizationConfig(weights="int8"))
    from fastllava.quantization import Int8Linear

    assert isinstance(int8.lm_head, Int8Linear)
    correct_full = correct_int8 = 0
    for q, _, _, answer in heldout:
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": q["picture"]},
                                          {"type": "text", "text": q["question"]}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        ids = int8.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        correct_int8 += answer_match(processor.decode(ids, skip_special_tokens=True).strip(), q["answer"],
                                     q["question_type"])
        correct_full += answer_match(answer, q["answer"], q["question_type"])
    assert correct_int8 >= correct_full - 0.01 * len(heldout), (correct_int8, correct_full)
