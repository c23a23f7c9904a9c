"""The chat command and ChatSession: a one-shot answer, an interactive two-turn chat through a pseudo-terminal,
and later turns that prefill only their new tokens."""

from __future__ import annotations

import sys

import pytest
import torch

import fastllava
from fastllava.chat import ChatSession
from tiny_checkpoints import make_full_checkpoint

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("chat15"), "llava15")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_prefill(checkpoint, photo):
    model = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint)
    processor = fastllava.AutoProcessor.from_pretrained(checkpoint)
    image = fastllava.load_image(str(photo))
    chat = ChatSession(model, processor, image)
    chat.ask("what is in the picture?", max_new_tokens=6)
    first_prompt = chat.last_prefill_tokens
    second = chat.ask("and what colour is it?", max_new_tokens=6)
    second_prompt = processor.apply_chat_template(chat.messages[:3], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")["input_ids"].shape[1]
    # The whole first prompt (image placeholders included) came from the cache: only the rest was prefilled.
    assert second_prompt - chat.last_prefill_tokens >= first_prompt
    # The same conversation prefilled from scratch gives the same answer.
    fresh = ChatSession(model, processor, image)
    fresh.messages = chat.messages[:2]
    assert fresh.ask("and what colour is it?", max_new_tokens=6) == second


def test_one_shot_chat_prints_the_generated_answer(checkpoint, photo):
    model = fastllava.LlavaForConditionalGeneration.from_pretrained(checkpoint)
    processor = fastllava.AutoProcessor.from_pretrained(checkpoint)
    expected = ChatSession(model, processor, fastllava.load_image(str(photo))).ask("what is this?", max_new_tokens=8)
    child = pexpect.spawn(sys.executable, ["-m", "fastllava.cli", "chat", "--model", str(checkpoint), "--image",
                                           str(photo), "--max-new-tokens", "8", "what is this?"],
                          encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert child.before.strip().replace("\r", "") == expected


def test_interactive_chat_two_turns_then_ctrl_d(checkpoint, photo):
    child = pexpect.spawn(sys.executable, ["-m", "fastllava.cli", "chat", "--model", str(checkpoint), "--image",
                                           str(photo), "--max-new-tokens", "5"], encoding="utf-8", timeout=120)
    child.expect("you> ")
    child.sendline("what is in the picture?")
    child.expect("llava> (.*)\r\n")
    first = child.match.group(1)
    child.expect("you> ")
    child.sendline("/reset")
    child.expect(r"\(conversation reset\)")
    child.expect("you> ")
    child.sendline("what is in the picture?")
    child.expect("llava> (.*)\r\n")
    assert child.match.group(1) == first  # same question after a reset: same greedy answer
    child.expect("you> ")
    child.sendline("/image /no/such/file.png")
    child.expect("error: cannot read image /no/such/file.png")
    child.expect("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
