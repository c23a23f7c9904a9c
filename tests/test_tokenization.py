"""Tokenizer and chat-template parity with transformers (the oracle) on the tiny llava-1.5 and interleave tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_tokenizers import (
    INTERLEAVE_CHAT_TEMPLATE,
    LLAVA15_CHAT_TEMPLATE,
    TOKENIZER_SPECS,
    build_interleave_tokenizer_dir,
    build_llava15_tokenizer_dir,
    load_oracle_tokenizer,
)

from fastllava import AutoTokenizer, Tokenizer
from fastllava.chat_template import compile_chat_template, render_chat_template

TEXTS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT: It's a cat.</s>",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "<s>hello</s> <pad><image><image> x<|im_end|>",
    "emoji 🙂, CJK 日本語, accents: naïve café résumé, Ω≈ç√, decomposed: cafe\u0301",
    "<|im_start|>user <image>\nHi<|im_end|><|im_start|>assistant\n",
    "",
    "a",
]


def _with_llava_config(src: Path, dst: Path) -> Path:
    """A copy of a tokenizer directory inside a llava checkpoint (config.json with model_type "llava")."""
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "llama"}}))
    return dst


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {
        "llava15": build_llava15_tokenizer_dir(root / "llava15"),
        # Older Llama tokenizer.json (Prepend/Replace normalizer): transformers rebuilds the LlamaTokenizer pipeline...
        "llava15_legacy_json": build_llava15_tokenizer_dir(root / "llava15_legacy", legacy_normalizer=True),
        "llava15_legacy_flag": build_llava15_tokenizer_dir(root / "llava15_flag"),
        "interleave": build_interleave_tokenizer_dir(root / "interleave"),
    }
    # legacy: true in the config makes transformers prefix "▁" after every added token.
    config_path = dirs["llava15_legacy_flag"] / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["legacy"] = True
    config_path.write_text(json.dumps(config))
    # ... unless the directory is a llava checkpoint: then tokenizer.json is used as it is.
    dirs["llava15_legacy_json_in_checkpoint"] = _with_llava_config(dirs["llava15_legacy_json"], root / "ckpt_l15")
    dirs["interleave_in_checkpoint"] = _with_llava_config(dirs["interleave"], root / "ckpt_il")
    return dirs


@pytest.fixture(scope="module")
def pair(tokenizer_dirs):
    """name -> (transformers tokenizer, fastllava tokenizer) on the same files."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = tokenizer_dirs[name]
            cache[name] = (load_oracle_tokenizer(path), Tokenizer.from_pretrained(path))
        return cache[name]

    return get


ALL = ["llava15", "llava15_legacy_json", "llava15_legacy_flag", "interleave",
       "llava15_legacy_json_in_checkpoint", "interleave_in_checkpoint"]  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_ids_masks_and_decoding_match_transformers(pair, name):
    ref, ours = pair(name)
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    assert ours.special_tokens_map == ref.special_tokens_map
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side", "model_max_length"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.all_special_ids == ref.all_special_ids
    for text in TEXTS:
        expected = ref(text)
        got = ours(text)
        assert got["input_ids"] == expected["input_ids"], text
        assert got["attention_mask"] == expected["attention_mask"], text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.tokenize(text) == ref.tokenize(text)
        ids = expected["input_ids"]
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref.convert_ids_to_tokens(
            ids, skip_special_tokens=True
        )
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=True) == ref.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=True
            )
    tokens = ref.convert_ids_to_tokens(ref.encode(TEXTS[3]))
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_string(tokens) == ref.convert_tokens_to_string(tokens)
    assert ours.convert_tokens_to_ids("<image>") == ref.convert_tokens_to_ids("<image>")


@pytest.mark.parametrize("name", ["llava15", "interleave", "llava15_legacy_json_in_checkpoint"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padding_and_truncation_match_transformers(pair, name, side):
    ref, ours = pair(name)
    ref.padding_side = side
    ours.padding_side = side
    try:
        for kwargs in (
            dict(padding=True),
            dict(padding="longest", return_tensors="pt"),
            dict(padding=True, pad_to_multiple_of=8, return_tensors="np"),
            dict(padding="max_length", max_length=96, return_tensors="pt"),
            dict(padding="max_length", truncation=True, max_length=9, return_tensors="pt"),
            dict(truncation=True, max_length=5),
            dict(max_length=6),  # max_length alone truncates
            dict(padding=True, add_special_tokens=False, return_tensors="pt"),
        ):
            expected = ref(TEXTS, **kwargs)
            got = ours(TEXTS, **kwargs)
            assert set(got) == {"input_ids", "attention_mask"}
            for key in ("input_ids", "attention_mask"):
                exp, res = expected[key], got[key]
                if kwargs.get("return_tensors") == "pt":
                    assert isinstance(res, torch.Tensor) and res.dtype == exp.dtype and torch.equal(res, exp), kwargs
                elif kwargs.get("return_tensors") == "np":
                    assert isinstance(res, np.ndarray) and np.array_equal(res, exp), kwargs
                else:
                    assert res == exp, kwargs
        # padding_side as a call argument overrides the attribute
        other = "left" if side == "right" else "right"
        assert ours(TEXTS, padding=True, padding_side=other)["input_ids"] == ref(
            TEXTS, padding=True, padding_side=other
        )["input_ids"]
    finally:
        ref.padding_side = ours.padding_side = "left" if name.startswith("llava15") else "right"


def test_single_text_shapes_and_errors(pair):
    _, ours = pair("llava15")
    single = ours("What is this?")
    assert isinstance(single["input_ids"], list) and isinstance(single["input_ids"][0], int)
    assert single["input_ids"][0] == TOKENIZER_SPECS["llava15"]["bos_token_id"]
    assert ours("What is this?", return_tensors="pt")["input_ids"].shape[0] == 1
    assert ours.encode("What", return_tensors="pt").shape == (1, len(ours.encode("What")))
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a longer text"], return_tensors="pt")
    assert ours.decode(torch.tensor([[1, 300], [1, 301]])) == ours.batch_decode([[1, 300], [1, 301]])
    assert ours.batch_decode(np.array([[1, 300]]), skip_special_tokens=True) == [ours.decode([300])]


def test_interleave_has_no_bos_and_chatml_tokens(pair):
    ref, ours = pair("interleave")
    spec = TOKENIZER_SPECS["interleave"]
    assert ours.bos_token is None and ours.bos_token_id is None
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == spec["eos_token_id"]
    assert ours.pad_token_id == spec["pad_token_id"]
    assert ours.convert_tokens_to_ids("<|im_start|>") == spec["im_start_token_id"]
    assert ours.extra_special_tokens == ["<|im_start|>", "<|im_end|>"]
    assert ours("hi")["input_ids"] == ref("hi")["input_ids"]  # no bos added


def test_special_token_attributes_are_settable(tokenizer_dirs):
    ours = Tokenizer.from_pretrained(tokenizer_dirs["interleave"])
    ours.pad_token = "<|im_end|>"
    assert ours.pad_token_id == TOKENIZER_SPECS["interleave"]["eos_token_id"]
    ours.pad_token_id = TOKENIZER_SPECS["interleave"]["pad_token_id"]
    assert ours.pad_token == "<|endoftext|>"
    assert not hasattr(ours, "image_token")  # not declared by this tokenizer's config
    ours.pad_token = None
    with pytest.raises(ValueError, match="padding token"):
        ours(["a", "bb"], padding=True)


def test_model_specific_image_token(tmp_path):
    path = build_llava15_tokenizer_dir(tmp_path, image_token_in_config=True)
    ref, ours = load_oracle_tokenizer(path), Tokenizer.from_pretrained(path)
    assert ours.image_token == ref.image_token == "<image>"
    assert ours.image_token_id == ref.image_token_id == TOKENIZER_SPECS["llava15"]["image_token_id"]
    assert ours.special_tokens_map == ref.special_tokens_map


def test_pad_collates_like_transformers(pair):
    ref, ours = pair("llava15")
    features = [{"input_ids": ref.encode(t)} for t in TEXTS[:3]]
    expected = ref.pad(features, return_tensors="pt")
    got = ours.pad(features, return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    got = ours.pad(features, padding="max_length", max_length=40, padding_side="right")
    expected = ref.pad(features, padding="max_length", max_length=40, padding_side="right")
    assert got["input_ids"] == expected["input_ids"] and got["attention_mask"] == expected["attention_mask"]


@pytest.mark.parametrize("name", ["llava15", "interleave", "llava15_legacy_json_in_checkpoint"])
def test_save_pretrained_round_trip(pair, tmp_path, name):
    ref, ours = pair(name)
    ours.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    reloaded_ref = load_oracle_tokenizer(tmp_path)
    assert again.padding_side == reloaded_ref.padding_side == ref.padding_side
    assert again.special_tokens_map == reloaded_ref.special_tokens_map == ref.special_tokens_map
    batch = ref(TEXTS, padding=True)["input_ids"]
    assert again(TEXTS, padding=True)["input_ids"] == batch
    assert reloaded_ref(TEXTS, padding=True)["input_ids"] == batch
    assert again.decode(batch[0]) == reloaded_ref.decode(batch[0])


def test_auto_tokenizer_and_hub_cache(tokenizer_dirs, tmp_path):
    path = tokenizer_dirs["llava15"]
    assert isinstance(AutoTokenizer.from_pretrained(path), Tokenizer)
    # A hub id resolves through the local huggingface cache without network.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--llava-hf--tiny-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(path, repo / "snapshots" / commit)
    tok = AutoTokenizer.from_pretrained("llava-hf/tiny-test", cache_dir=tmp_path / "cache", local_files_only=True)
    assert tok("hello")["input_ids"] == Tokenizer.from_pretrained(path)("hello")["input_ids"]
    with pytest.raises(OSError, match="local hub cache"):
        AutoTokenizer.from_pretrained("llava-hf/not-there", cache_dir=tmp_path / "cache", local_files_only=True)


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(OSError, match="No tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# --- chat templates ----------------------------------------------------------------------------------------------------

CONVERSATIONS = {
    "single": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}],
    "multi_turn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red stop sign."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe it in more detail."}]},
    ],
    "ends_with_assistant": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first one is"}]},
    ],
}


@pytest.mark.parametrize("style", ["llava15", "interleave"])
def test_tokenizer_apply_chat_template_matches_transformers(tmp_path, style):
    builder = build_llava15_tokenizer_dir if style == "llava15" else build_interleave_tokenizer_dir
    path = builder(tmp_path, chat_template_in_config=True)
    ref, ours = load_oracle_tokenizer(path), Tokenizer.from_pretrained(path)
    assert ours.chat_template == (LLAVA15_CHAT_TEMPLATE if style == "llava15" else INTERLEAVE_CHAT_TEMPLATE)
    for conversation in CONVERSATIONS.values():
        for kwargs in (dict(), dict(add_generation_prompt=True)):
            assert ours.apply_chat_template(conversation, tokenize=False, **kwargs) == ref.apply_chat_template(
                conversation, tokenize=False, **kwargs
            )
            assert ours.apply_chat_template(conversation, return_dict=False, **kwargs) == ref.apply_chat_template(
                conversation, return_dict=False, **kwargs
            )
    last = CONVERSATIONS["ends_with_assistant"]
    assert ours.apply_chat_template(last, tokenize=False, continue_final_message=True) == ref.apply_chat_template(
        last, tokenize=False, continue_final_message=True
    )
    batch = list(CONVERSATIONS.values())
    got = ours.apply_chat_template(batch, padding=True, return_tensors="pt", return_assistant_tokens_mask=True)
    expected = ref.apply_chat_template(batch, padding=True, return_tensors="pt", return_assistant_tokens_mask=True)
    for key in ("input_ids", "attention_mask", "assistant_masks"):
        assert torch.equal(got[key], expected[key]), key
    assert got["assistant_masks"].sum() > 0


def test_string_content_and_text_only_template(tmp_path):
    path = build_interleave_tokenizer_dir(tmp_path, text_chat_template_in_config=True)
    ref, ours = load_oracle_tokenizer(path), Tokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    for kwargs in (dict(add_generation_prompt=True), dict(continue_final_message=True)):
        assert ours.apply_chat_template(chat, tokenize=False, **kwargs) == ref.apply_chat_template(
            chat, tokenize=False, **kwargs
        )
    # continue_final_message drops the end-of-turn text the template writes after the final message
    assert ours.apply_chat_template(chat, tokenize=False, continue_final_message=True).endswith("Hello!")
    with pytest.raises(ValueError, match="not compatible"):
        ours.apply_chat_template(chat, add_generation_prompt=True, continue_final_message=True)


ENGINE_CASES = {
    "tojson_no_html_escaping": "{{ messages[0]['content'] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}",
    "namespace_and_loopcontrols": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    ),
    "dict_global": "{% set d = dict(a=1) %}{{ d['a'] }}{{ dict.fromkeys(['x']) | tojson }}",
    "trim_and_lstrip_blocks": "  {% for m in messages %}\n    {{ m['role'] }}\n  {% endfor %}\n",
    "media_are_placeholders": "{% for p in messages[1]['content'] %}{{ p['type'] }}={{ p.get('image', '-') }};{% endfor %}",
    "special_tokens_variables": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
    "generation_block": "{% for m in messages %}{% generation %}[{{ m['role'] }}]{% endgeneration %}|{% endfor %}",
}


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_template_engine_matches_transformers(case):
    from PIL import Image
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ENGINE_CASES[case]
    chat = [
        {"role": "user", "content": "<b>\"quoted\" & 'single'</b> ü"},
        {"role": "assistant", "content": [{"type": "image", "image": Image.new("RGB", (2, 2))}, {"type": "text", "text": "x"}]},
        {"role": "user", "content": "three"},
    ]
    variables = {"bos_token": "<s>", "eos_token": "</s>"}
    expected, expected_spans = render_jinja_template(
        [chat], chat_template=template, return_assistant_tokens_mask=True, **variables
    )
    got, spans = render_chat_template([chat], template, return_generation_spans=True, **variables)
    assert got == expected and spans == expected_spans


def test_template_helpers_and_sandbox():
    assert render_chat_template([[]], "{{ raise_exception('bad role') if false }}ok")[0] == ["ok"]
    with pytest.raises(Exception, match="bad role"):
        render_chat_template([[{"role": "x", "content": ""}]], "{{ raise_exception('bad role') }}")
    year = render_chat_template([[]], "{{ strftime_now('%Y') }}")[0][0]
    assert year.isdigit() and len(year) == 4
    with pytest.raises(Exception):  # no escape to Python internals
        render_chat_template([[]], "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match="underscore"):
        render_chat_template([[]], "{% set ns = namespace(_x=1) %}")
    template = compile_chat_template("{{ 1 }}")
    assert compile_chat_template("{{ 1 }}") is template  # compiled once


def test_runtime_never_imports_transformers():
    import subprocess
    import sys

    code = (
        "import sys, fastllava\n"
        "from fastllava import AutoTokenizer, Tokenizer, LlavaProcessor, AutoProcessor\n"
        "import fastllava.chat_template\n"
        "assert 'transformers' not in sys.modules, 'fastllava imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chat_template_argument_overrides_files(tokenizer_dirs):
    tok = Tokenizer.from_pretrained(tokenizer_dirs["llava15"], chat_template="{{ messages | length }}")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "1"
