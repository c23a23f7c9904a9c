"""LlavaProcessor parity with transformers' LlavaProcessor on tiny processor directories of every on-disk layout."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_tokenizers import (
    CHAT_TEMPLATES,
    TOKENIZER_SPECS,
    load_oracle_processor,
    load_oracle_tokenizer,
    save_processor_files,
)

from fastllava import AutoProcessor, LlavaProcessor
from fastllava.batch_feature import BatchFeature

PATCH, SIZE = 6, 30  # 5 x 5 patches per image

LAYOUTS = {
    # name: (style, save_processor_files keyword arguments)
    "llava15": ("llava15", dict()),
    "interleave": ("interleave", dict()),
    "llava15_hub_json": ("llava15", dict(layout="hub", chat_template_in="json")),
    "llava15_hub_jinja": ("llava15", dict(layout="hub", chat_template_in="jinja")),
    "llava15_hub_tokenizer_config": ("llava15", dict(layout="hub", chat_template_in="tokenizer_config")),
    "interleave_hub_json": ("interleave", dict(layout="hub", chat_template_in="json")),
}


def _image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = [_image(0, 40, 50), _image(1, 64, 32), _image(2, 30, 30), _image(3, 23, 71)]


def _user(*parts):
    return {"role": "user", "content": list(parts)}


def _text(text):
    return {"type": "text", "text": text}


def _conversations(image_part):
    """name -> conversation, with image parts built by ``image_part(index)``."""
    return {
        "single_turn": [_user(image_part(0), _text("What is shown in this image?"))],
        "multi_turn": [
            _user(image_part(1), _text("What is this?")),
            {"role": "assistant", "content": [_text("A small grey cat.")]},
            _user(_text("What colour are its eyes?")),
        ],
        "multi_image": [_user(image_part(2), image_part(3), _text("Compare the two pictures."))],
    }


@pytest.fixture(scope="module")
def processor_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("processors")
    return {
        name: save_processor_files(root / name, style, patch_size=PATCH, image_size=SIZE, **kwargs)
        for name, (style, kwargs) in LAYOUTS.items()
    }


@pytest.fixture(scope="module")
def pair(processor_dirs):
    """name -> (transformers processor, fastllava processor) reading the same directory."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = processor_dirs[name]
            cache[name] = (load_oracle_processor(path), LlavaProcessor.from_pretrained(path))
        return cache[name]

    return get


def _assert_same(got, expected, pixel_atol: float = 0.0):
    assert set(got) == set(expected), (set(got), set(expected))
    for key in expected:
        exp, res = expected[key], got[key]
        if key == "pixel_values":
            res = torch.as_tensor(np.asarray(res) if isinstance(res, list) else res)
            exp = torch.as_tensor(np.asarray(exp) if isinstance(exp, list) else exp)
            assert res.shape == exp.shape and res.dtype == exp.dtype
            # the image processors reproduce transformers' PIL path bit for bit
            same = torch.equal(res, exp) if pixel_atol == 0 else torch.allclose(res, exp, atol=pixel_atol)
            assert same, (res - exp).abs().max()
        elif isinstance(exp, torch.Tensor):
            assert isinstance(res, torch.Tensor) and res.dtype == exp.dtype and torch.equal(res, exp), key
        else:
            assert res == exp, key


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_loads_the_same_processor(pair, name):
    ref, ours = pair(name)
    style = LAYOUTS[name][0]
    assert (ours.patch_size, ours.vision_feature_select_strategy, ours.num_additional_image_tokens) == (
        ref.patch_size,
        ref.vision_feature_select_strategy,
        ref.num_additional_image_tokens,
    )
    assert ours.image_token == ref.image_token == "<image>"
    assert ours.image_token_id == ref.image_token_id == TOKENIZER_SPECS[style]["image_token_id"]
    assert ours.get_chat_template() == CHAT_TEMPLATES[style]
    assert ours.tokenizer.padding_side == ref.tokenizer.padding_side
    prompt = ours.apply_chat_template(_conversations(lambda i: {"type": "image"})["multi_image"], add_generation_prompt=True)
    _assert_same(
        ours(images=IMAGES[:2], text=prompt, return_tensors="pt"), ref(images=IMAGES[:2], text=prompt, return_tensors="pt")
    )


@pytest.mark.parametrize("style", ["llava15", "interleave"])
def test_chat_template_text_matches_transformers(pair, style):
    ref, ours = pair(style)
    conversations = _conversations(lambda i: {"type": "image"})
    for conversation in conversations.values():
        for kwargs in (dict(), dict(add_generation_prompt=True)):
            assert ours.apply_chat_template(conversation, **kwargs) == ref.apply_chat_template(conversation, **kwargs)
    batch = list(conversations.values())
    assert ours.apply_chat_template(batch, add_generation_prompt=True) == ref.apply_chat_template(
        batch, add_generation_prompt=True
    )
    prefilled = conversations["multi_turn"][:2]
    got = ours.apply_chat_template(prefilled, continue_final_message=True)
    assert got == ref.apply_chat_template(prefilled, continue_final_message=True)
    assert got.endswith("A small grey cat.")  # no end-of-turn text after the message being continued
    if style == "llava15":
        assert got == "USER: <image>\nWhat is this? ASSISTANT: A small grey cat."
        assert ours.apply_chat_template(conversations["single_turn"], add_generation_prompt=True) == (
            "USER: <image>\nWhat is shown in this image? ASSISTANT:"
        )
    else:
        assert ours.apply_chat_template(conversations["single_turn"], add_generation_prompt=True) == (
            "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"
        )


@pytest.mark.parametrize("style", ["llava15", "interleave"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_processor_call_matches_transformers(pair, style, side):
    ref, ours = pair(style)
    conversations = _conversations(lambda i: {"type": "image"})
    prompts = {k: ours.apply_chat_template(c, add_generation_prompt=True) for k, c in conversations.items()}
    images = {"single_turn": IMAGES[:1], "multi_turn": IMAGES[1:2], "multi_image": IMAGES[2:4]}
    ref.tokenizer.padding_side = ours.tokenizer.padding_side = side
    # one prompt at a time, lists and tensors
    for key, prompt in prompts.items():
        _assert_same(ours(images=images[key], text=prompt), ref(images=images[key], text=prompt))
        _assert_same(
            ours(images=images[key], text=prompt, return_tensors="pt"),
            ref(images=images[key], text=prompt, return_tensors="pt"),
        )
    # a padded batch: images of all prompts in order
    texts = list(prompts.values())
    flat = IMAGES[:4]
    expected = ref(images=flat, text=texts, padding=True, return_tensors="pt")
    got = ours(images=flat, text=texts, padding=True, return_tensors="pt")
    _assert_same(got, expected)
    mask = got["attention_mask"]
    assert (mask[:, 0] == 0).any() if side == "left" else (mask[:, -1] == 0).any()
    # images nested per prompt give the same result
    _assert_same(ours(images=[[flat[0]], [flat[1]], flat[2:]], text=texts, padding=True, return_tensors="pt"), got)
    # text only
    _assert_same(ours(text="Hello there", return_tensors="pt"), ref(text="Hello there", return_tensors="pt"))


@pytest.mark.parametrize("style", ["llava15", "interleave"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenized_chat_with_images_in_messages_matches_transformers(pair, style, side):
    ref, ours = pair(style)
    ref.tokenizer.padding_side = ours.tokenizer.padding_side = side
    conversations = list(_conversations(lambda i: {"type": "image", "image": IMAGES[i]}).values())
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    for conversation in conversations:
        _assert_same(ours.apply_chat_template(conversation, **kwargs), ref.apply_chat_template(conversation, **kwargs))
    got = ours.apply_chat_template(conversations, padding=True, **kwargs)
    _assert_same(got, ref.apply_chat_template(conversations, padding=True, **kwargs))
    assert got["pixel_values"].shape == (4, 3, SIZE, SIZE)
    ids = ours.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=True)
    assert ids == ref.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=True)
    # BatchFeature.to casts pixel values only
    moved = got.to("cpu", torch.float16)
    assert moved["pixel_values"].dtype == torch.float16 and moved["input_ids"].dtype == torch.long


@pytest.mark.parametrize("style", ["llava15", "interleave"])
def test_assistant_masks_match_transformers(pair, style):
    ref, ours = pair(style)
    conversation = _conversations(lambda i: {"type": "image", "image": IMAGES[i]})["multi_turn"]
    kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt")
    got = ours.apply_chat_template(conversation, **kwargs)
    expected = ref.apply_chat_template(conversation, **kwargs)
    assert torch.equal(got["assistant_masks"], torch.as_tensor(expected["assistant_masks"]))
    masked = got["input_ids"][got["assistant_masks"].bool()]
    assert "grey cat" in ours.decode(masked)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_sources_in_messages_give_the_same_inputs(pair, tmp_path):
    ref, ours = pair("llava15")
    image = IMAGES[0]
    path = tmp_path / "picture.png"
    image.save(path)
    encoded = base64.b64encode(_png_bytes(image)).decode()
    parts = {
        "pil": {"type": "image", "image": image},
        "path": {"type": "image", "path": str(path)},
        "url_file_path": {"type": "image", "url": str(path)},
        "base64": {"type": "image", "base64": encoded},
        "data_url": {"type": "image", "url": f"data:image/png;base64,{encoded}"},
        "openai_image_url": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
    }
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    outputs = {name: ours.apply_chat_template([_user(part, _text("What is it?"))], **kwargs) for name, part in parts.items()}
    for name, out in outputs.items():
        for key in ("input_ids", "attention_mask", "pixel_values"):
            assert torch.equal(out[key], outputs["pil"][key]), (name, key)
    expected = ref.apply_chat_template([_user(parts["path"], _text("What is it?"))], **kwargs)
    _assert_same(outputs["path"], expected)


def test_count_mismatch_errors_name_both_counts(pair):
    _, ours = pair("llava15")
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    with pytest.raises(ValueError, match=r"1 <image> token.*2 image"):
        ours(images=IMAGES[:2], text=prompt)
    with pytest.raises(ValueError, match=r"2 <image> token.*1 image"):
        ours(images=IMAGES[:1], text=[prompt, prompt])
    with pytest.raises(ValueError, match="no images were passed"):
        ours(text=prompt)
    with pytest.raises(ValueError, match="0 <image> token"):
        ours(images=IMAGES[0], text="no placeholder here")
    with pytest.raises(ValueError, match="truncation"):
        ours(images=IMAGES[0], text=prompt, truncation=True, max_length=10)


def test_placeholder_count_rule(pair):
    _, ours = pair("llava15")
    clip_default = (SIZE // PATCH) ** 2 + 1 - 1  # + CLS - CLS dropped by "default"
    out = ours(images=IMAGES[3], text="<image>", return_tensors="pt")
    assert (out["input_ids"] == ours.image_token_id).sum() == clip_default == ours.num_image_tokens(SIZE, SIZE)
    full = LlavaProcessor(ours.image_processor, ours.tokenizer, patch_size=PATCH, vision_feature_select_strategy="full",
                          num_additional_image_tokens=1)  # fmt: skip
    assert (full(images=IMAGES[3], text="<image>", return_tensors="pt")["input_ids"] == ours.image_token_id).sum() == 26
    unset = LlavaProcessor(ours.image_processor, ours.tokenizer)
    with pytest.raises(ValueError, match="patch_size"):
        unset(images=IMAGES[0], text="<image>")


def test_decode_and_left_padding_for_generation(pair):
    ref, ours = pair("llava15")
    ours.tokenizer.padding_side = "left"
    batch = ours(images=IMAGES[:2], text=["<image> short", "<image> a longer prompt here"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1, 0] == 1
    ids = batch["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == ours.tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids[1]) == ref.decode(ids[1])
    assert ours.decode(ids[1], skip_special_tokens=True).endswith("a longer prompt here")


@pytest.mark.parametrize("style", ["llava15", "interleave"])
@pytest.mark.parametrize("legacy_format", [False, True])
def test_save_pretrained_is_read_back_by_transformers(pair, tmp_path, style, legacy_format):
    ref, ours = pair(style)
    ours.save_pretrained(tmp_path, legacy_format=legacy_format)
    reloaded_ref = load_oracle_processor(tmp_path)
    reloaded = LlavaProcessor.from_pretrained(tmp_path)
    conversation = _conversations(lambda i: {"type": "image", "image": IMAGES[i]})["multi_image"]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    expected = ref.apply_chat_template(conversation, **kwargs)
    _assert_same(reloaded_ref.apply_chat_template(conversation, **kwargs), expected)
    _assert_same(reloaded.apply_chat_template(conversation, **kwargs), expected)
    assert reloaded_ref.patch_size == ours.patch_size
    assert reloaded_ref.vision_feature_select_strategy == ours.vision_feature_select_strategy
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "LlavaProcessor"


def test_chat_template_only_in_tokenizer_config(pair, processor_dirs):
    _, ours = pair("llava15_hub_tokenizer_config")
    assert ours.chat_template is None  # the processor has none of its own...
    oracle_tokenizer = load_oracle_tokenizer(processor_dirs["llava15_hub_tokenizer_config"])
    conversation = _conversations(lambda i: {"type": "image"})["multi_turn"]
    assert ours.apply_chat_template(conversation, add_generation_prompt=True) == oracle_tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False
    )  # ...so the tokenizer's is used


def test_auto_processor_errors_and_hub_cache(processor_dirs, tmp_path):
    path = processor_dirs["llava15"]
    assert isinstance(AutoProcessor.from_pretrained(path), LlavaProcessor)
    other = tmp_path / "other"
    shutil.copytree(path, other)
    config = json.loads((other / "processor_config.json").read_text())
    config["processor_class"] = "Idefics3Processor"
    (other / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Idefics3Processor"):
        AutoProcessor.from_pretrained(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="Unrecognized processing class"):
        AutoProcessor.from_pretrained(empty)
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "cache" / "models--llava-hf--tiny-processor"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(path, repo / "snapshots" / commit)
    processor = AutoProcessor.from_pretrained("llava-hf/tiny-processor", cache_dir=tmp_path / "cache")
    assert processor.patch_size == PATCH and processor.get_chat_template() == CHAT_TEMPLATES["llava15"]


def test_from_pretrained_overrides(processor_dirs):
    processor = LlavaProcessor.from_pretrained(processor_dirs["llava15"], padding_side="right", patch_size=3)
    assert processor.tokenizer.padding_side == "right" and processor.patch_size == 3
    out = processor(images=IMAGES[0], text="<image>")
    assert isinstance(out, BatchFeature)
    assert out["input_ids"][0].count(processor.image_token_id) == (SIZE // 3) ** 2


def test_pil_backend_gives_the_same_inputs(pair, processor_dirs):
    _, ours = pair("interleave")
    pil = LlavaProcessor.from_pretrained(processor_dirs["interleave"], backend="pil")
    assert type(pil.image_processor).__name__ == "LlavaImageProcessorPil"
    prompt = "<|im_start|>user <image>\nHi<|im_end|><|im_start|>assistant\n"
    _assert_same(pil(images=IMAGES[3], text=prompt, return_tensors="pt"), ours(images=IMAGES[3], text=prompt, return_tensors="pt"))


def test_batched_array_images(pair):
    ref, ours = pair("llava15")
    batch = np.stack([np.asarray(IMAGES[0].resize((32, 32))), np.asarray(IMAGES[1].resize((32, 32)))])  # (2, H, W, C)
    texts = ["<image> one", "<image> two"]
    _assert_same(
        ours(images=batch, text=texts, padding=True, return_tensors="pt"),
        ref(images=batch, text=texts, padding=True, return_tensors="pt"),
    )
