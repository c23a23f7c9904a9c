"""The bundled demo model: the README's main command answers about the bundled image, and transformers loads
the shipped checkpoint and gives the same greedy answers as fastllava."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastllava
from fastllava.cli import DEMO_IMAGE, DEMO_MODEL
from fastllava.eval.cli import model_answer_fn

QUESTIONS = {"What colour is the circle?": "blue", "How many shapes are there?": "1"}


@pytest.fixture(scope="module")
def demo():
    model = fastllava.LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL)
    processor = fastllava.AutoProcessor.from_pretrained(DEMO_MODEL)
    return model, processor


def test_shipped_checkpoint_is_small_and_complete():
    size = sum(p.stat().st_size for p in DEMO_MODEL.glob("*.safetensors"))
    assert 0 < size <= 20 * 1024 * 1024
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json", "README.md"):
        assert (DEMO_MODEL / name).is_file(), name
    assert DEMO_IMAGE.is_file()


def test_demo_answers_about_the_bundled_image(demo):
    model, processor = demo
    ask = model_answer_fn(model, processor)
    image = fastllava.load_image(str(DEMO_IMAGE))
    for question, answer in QUESTIONS.items():
        assert ask(image, question) == answer


def test_main_command_prints_the_answer():
    result = subprocess.run([sys.executable, "-m", "fastllava.cli", "chat", "What colour is the circle?"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blue"


def test_transformers_gives_the_same_greedy_answers(demo):
    transformers = pytest.importorskip("transformers")
    model, processor = demo
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL).eval()
    image = fastllava.load_image(str(DEMO_IMAGE))
    for question in list(QUESTIONS) + ["What shapes are in this picture?", "Is there a red circle?"]:
        conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        ours = model.generate(**inputs, max_new_tokens=16)
        with torch.no_grad():
            reference = theirs.generate(**inputs, max_new_tokens=16, do_sample=False)
        assert torch.equal(ours, reference), question
