"""Training: label masking, stage freezing, a tiny overfit, exact resume, and checkpoints that load in fastllava
and transformers (the oracle). Everything runs on toy sizes (16 px images, 4 image tokens) in seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastllava.train.collator import IGNORE_INDEX, LlavaCollator, LlavaDataset, record_to_messages
from fastllava.train.demo import DEMO_CHAT_TEMPLATE, DemoRecipe, build_processor, demo_config, scene_patch_labels
from fastllava.train.trainer import Trainer, TrainingArguments, lr_lambda, set_trainable, train_main

TOY = DemoRecipe(image_size=16, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                 vision_intermediate=64, text_hidden=64, text_layers=2, text_heads=4, text_intermediate=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy matrices gain nothing from a second thread, and lose a lot when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return build_processor(tmp_path_factory.mktemp("processor"), TOY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four one-image records with three questions each, written by the synthetic generator."""
    from fastllava.train.synthetic_data import generate_dataset

    root = tmp_path_factory.mktemp("data")
    path = generate_dataset(root, 4, seed=3, questions_per_image=3, image_size=32)
    return path


def _records(path):
    return json.loads(Path(path).read_text())


def _model(processor, seed=0):
    from fastllava.models.llava import LlavaForConditionalGeneration

    tok = processor.tokenizer
    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
               "image": processor.image_token_id}
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(demo_config(TOY, 64 * math.ceil(len(tok) / 64), special))


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "run"), stage="full", max_steps=4, learning_rate=3e-3,
                    per_device_train_batch_size=2, warmup_steps=1, logging_steps=1, progress=False,
                    device="cpu", precision="fp32")
    defaults.update(kw)
    return TrainingArguments(**defaults)


MULTI_TURN = {
    "id": "mt",
    "image": "x.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many shapes are there?"},
        {"from": "gpt", "value": "3"},
        {"from": "human", "value": "Describe the picture."},
        {"from": "gpt", "value": "a red circle and two blue squares"},
    ],
}


def _image():
    return Image.new("RGB", (20, 20), (200, 30, 30))


# --- label masking ------------------------------------------------------------------------------------------------


def test_only_assistant_tokens_carry_loss(processor):
    collator = LlavaCollator(processor)
    ex = collator.encode(MULTI_TURN, images=[_image()])
    ids, labels = ex["input_ids"], ex["labels"]
    tok = processor.tokenizer
    labelled = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(ids, labels))
    # exactly the answers, each with its end-of-turn token, in order
    assert tok.decode(labelled) == " red</s> 3</s> a red circle and two blue squares</s>"
    assert labelled.count(tok.eos_token_id) == 3
    # bos, the user turns, role headers and every image placeholder are masked
    assert labels[0] == IGNORE_INDEX and ids[0] == tok.bos_token_id
    image_positions = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    assert len(image_positions) == processor.num_image_tokens(TOY.image_size, TOY.image_size) == 4
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    assert "What colour" not in tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_collator_matches_processor_layout(processor):
    """Same ids as processor.apply_chat_template(tokenize=True) and labels = its assistant mask."""
    collator = LlavaCollator(processor)
    ex = collator.encode(MULTI_TURN, images=[_image()])
    out = processor.apply_chat_template(record_to_messages(MULTI_TURN), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, images=[_image()])
    assert out["input_ids"][0] == ex["input_ids"]
    assert out["assistant_masks"][0] == [int(l != IGNORE_INDEX) for l in ex["labels"]]
    assert torch.equal(torch.stack([torch.as_tensor(p) for p in out["pixel_values"]]), ex["pixel_values"])
    # the inference prompt is a prefix of the training sequence
    prompt = processor.apply_chat_template(record_to_messages(MULTI_TURN)[:1], add_generation_prompt=True)
    ids = processor(images=[_image()], text=prompt)["input_ids"][0]
    assert ex["input_ids"][: len(ids)] == ids
    assert all(l == IGNORE_INDEX for l in ex["labels"][: len(ids)])


def test_template_without_generation_blocks_and_eos(tmp_path):
    """llava-hf's llava-1.5 template style: no generation marks, answers end with a space, no </s>."""
    # A case-keeping tokenizer: lowercased, " user" is one token that straddles the answer's trailing space.
    processor = build_processor(tmp_path, TOY, lowercase=False)
    template = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
                "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
                "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    collator = LlavaCollator(processor, chat_template=template)
    ex = collator.encode(MULTI_TURN, images=[_image()])
    tok = processor.tokenizer
    labelled = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    # what each answer adds to the rendering (" red " after "ASSISTANT:") plus an appended, labelled </s>
    assert tok.decode(labelled) == " red </s> 3 </s> a red circle and two blue squares </s>"
    no_eos = LlavaCollator(processor, chat_template=template, eos_after_answer=False).encode(MULTI_TURN, [_image()])
    assert tok.eos_token_id not in no_eos["input_ids"]


def test_padding_and_truncation(processor):
    collator = LlavaCollator(processor)
    short = {"image": "x", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "3"}]}
    batch = collator([collator.encode(MULTI_TURN, [_image()]), collator.encode(short, [_image()])])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    n = int(batch["attention_mask"][1].sum())
    assert (batch["input_ids"][1, n:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    from fastllava.train.collator import SequenceTooLongError

    with pytest.raises(SequenceTooLongError, match="image"):
        LlavaCollator(processor, max_length=5).encode(MULTI_TURN, [_image()])
    cut = LlavaCollator(processor, max_length=30).encode(MULTI_TURN, [_image()])
    assert len(cut["input_ids"]) == 30 and any(l != IGNORE_INDEX for l in cut["labels"])


# --- stages -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, tune_tower, expected", [
    ("pretrain", False, {"vision_tower": False, "multi_modal_projector": True, "language_model": False,
                         "lm_head": False}),
    ("finetune", False, {"vision_tower": False, "multi_modal_projector": True, "language_model": True,
                         "lm_head": True}),
    ("finetune", True, {"vision_tower": True, "multi_modal_projector": True, "language_model": True,
                        "lm_head": True}),
    ("full", False, {"vision_tower": True, "multi_modal_projector": True, "language_model": True, "lm_head": True}),
])
def test_stage_freezing(processor, stage, tune_tower, expected):
    model = _model(processor)
    counts = set_trainable(model, stage, tune_tower)
    parts = {"vision_tower": model.model.vision_tower, "multi_modal_projector": model.model.multi_modal_projector,
             "language_model": model.model.language_model, "lm_head": model.lm_head}
    for name, module in parts.items():
        flags = {p.requires_grad for p in module.parameters()}
        assert flags == {expected[name]}, (name, flags)
        assert (counts[name] > 0) == expected[name]


def test_pretrain_stage_updates_only_the_projector(processor, data, tmp_path):
    model = _model(processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collator = LlavaCollator(processor, image_root=data.parent)
    trainer = Trainer(model, processor, _args(tmp_path, stage="pretrain", max_steps=2, save_final=False),
                      LlavaDataset(_records(data), collator), data_collator=collator)
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)


def test_schedule_warmup_then_cosine():
    assert lr_lambda(0, 4, 20) == pytest.approx(0.25)
    assert lr_lambda(3, 4, 20) == pytest.approx(1.0)
    assert lr_lambda(4, 4, 20) == pytest.approx(1.0)
    assert lr_lambda(12, 4, 20) == pytest.approx(0.5)
    assert lr_lambda(20, 4, 20) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)


# --- learning -----------------------------------------------------------------------------------------------------


def test_tiny_overfit(processor, data, tmp_path):
    model = _model(processor)
    collator = LlavaCollator(processor, image_root=data.parent)
    dataset = LlavaDataset(_records(data), collator)
    args = _args(tmp_path, max_steps=40, learning_rate=1e-2, per_device_train_batch_size=4, warmup_steps=3,
                 logging_steps=10, save_final=False)
    trainer = Trainer(model, processor, args, dataset, dataset, data_collator=collator)
    first = trainer.evaluate()["eval_loss"]
    metrics = trainer.train()
    assert first > 5.0
    assert metrics["eval_loss"] < 0.1 * first, (first, metrics)


def test_gradient_accumulation_is_token_normalised(processor, data, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 make the same update (loss normalised by all labelled tokens)."""
    collator = LlavaCollator(processor, image_root=data.parent)
    dataset = LlavaDataset(_records(data), collator)
    states = []
    for bs, accum in ((4, 1), (2, 2)):
        model = _model(processor)
        # a large epsilon makes Adam's first step proportional to the gradient (not its sign), so any
        # difference in the accumulated gradients would show
        args = _args(tmp_path / f"{bs}", max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=accum,
                     max_grad_norm=None, save_final=False, adam_epsilon=1.0)
        Trainer(model, processor, args, dataset, data_collator=collator).train()
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-6)


def test_resume_reproduces_state(processor, data, tmp_path):
    collator = LlavaCollator(processor, image_root=data.parent)
    dataset = LlavaDataset(_records(data), collator)
    straight = _model(processor)
    Trainer(straight, processor, _args(tmp_path / "a", max_steps=6, save_steps=3, save_final=False), dataset,
            data_collator=collator).train()
    checkpoint = tmp_path / "a" / "run" / "checkpoint-3"
    assert (checkpoint / "trainer_state.pt").is_file() and (checkpoint / "model.safetensors").is_file()
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 3 and state["optimizer"]["state"]

    resumed = _model(processor, seed=123)  # different init: everything must come from the checkpoint
    trainer = Trainer(resumed, processor, _args(tmp_path / "a", max_steps=6, save_final=False), dataset,
                      data_collator=collator)
    trainer.train(resume_from_checkpoint="latest")
    assert trainer.global_step == 6
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


# --- checkpoints --------------------------------------------------------------------------------------------------


def test_cli_checkpoint_loads_in_fastllava_and_transformers(processor, data, tmp_path):
    from fastllava.models.llava import LlavaForConditionalGeneration
    from fastllava.processing import AutoProcessor

    start = tmp_path / "start"
    _model(processor).save_pretrained(start)
    processor.save_pretrained(start)
    out = tmp_path / "out"
    metrics = train_main(["--data", str(data), "--model", str(start), "--output", str(out), "--stage", "finetune",
                          "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--save-steps", "1",
                          "--eval-data", str(data), "--no-progress"])
    assert metrics["steps"] == 2 and "eval_loss" in metrics
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "trainer_state.pt"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-1" / "model.safetensors").is_file()

    ours = LlavaForConditionalGeneration.from_pretrained(out)
    our_processor = AutoProcessor.from_pretrained(out)
    record = _records(data)[0]
    image = Image.open(data.parent / record["image"]).convert("RGB")
    prompt = our_processor.apply_chat_template(record_to_messages(record)[:1], add_generation_prompt=True)
    inputs = our_processor(images=[image], text=prompt, return_tensors="pt")

    import transformers

    oracle = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    oracle_processor = transformers.AutoProcessor.from_pretrained(out)
    oracle_inputs = oracle_processor(images=[image], text=prompt, return_tensors="pt")
    assert oracle_inputs["input_ids"].tolist() == inputs["input_ids"].tolist()
    torch.testing.assert_close(oracle_inputs["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        expected = oracle(**oracle_inputs).logits
        got = ours(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_demo_template_renders_like_transformers(processor):
    from transformers import AutoTokenizer

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        processor.tokenizer.save_pretrained(tmp)
        oracle = AutoTokenizer.from_pretrained(tmp)
    messages = record_to_messages(MULTI_TURN)
    for add in (False, True):
        ours = processor.apply_chat_template(messages[:-1] if add else messages, add_generation_prompt=add)
        theirs = oracle.apply_chat_template(messages[:-1] if add else messages, add_generation_prompt=add,
                                            chat_template=DEMO_CHAT_TEMPLATE, tokenize=False)
        assert ours == theirs


def test_text_model_init_for_scratch():
    """The projector and text model are re-drawn at the given scale (output projections smaller), the vision tower and
    the global random stream are left alone, and the same seed gives the same weights."""
    from fastllava.models.llava import LlavaForConditionalGeneration
    from fastllava.train.demo import init_text_model_for_scratch

    special = {"bos": 1, "eos": 2, "pad": 3, "image": 4}
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(demo_config(TOY, 64, special))
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    state = torch.get_rng_state()
    init_text_model_for_scratch(model, 0.125, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, tower[k]) for k, v in model.model.vision_tower.state_dict().items())
    layer = model.model.language_model.layers[0]
    assert abs(float(layer.self_attn.q_proj.weight.detach().std()) - 0.125) < 0.02
    assert abs(float(layer.mlp.down_proj.weight.detach().std()) - 0.125 / math.sqrt(2 * TOY.text_layers)) < 0.01
    assert abs(float(model.lm_head.weight.detach().std()) - 0.125) < 0.02
    assert abs(float(model.model.multi_modal_projector.linear_1.weight.detach().std()) - 0.125) < 0.02
    assert float(model.model.language_model.norm.weight.detach().min()) == 1.0
    again = LlavaForConditionalGeneration(demo_config(TOY, 64, special))
    init_text_model_for_scratch(again, 0.125, seed=3)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_scene_patch_labels():
    scene = {"width": 32, "height": 32, "shapes": [
        {"shape": "square", "color": "blue", "rgb": [0, 0, 255], "cx": 8.0, "cy": 8.0, "size": 14.0, "rotation": 0.0}]}
    labels = scene_patch_labels(scene, grid=4).view(3, 4, 4)
    assert labels[0, 0, 0] == 2 and labels[1, 0, 0] == 3  # square (1 + index 1), blue (1 + index 2)
    assert labels[0, 3, 3] == 0 and labels[1, 3, 3] == 0
    assert labels[2].sum() == 1 and labels[2, 1, 1] == 1  # the centre (8, 8) lies in patch row 1, column 1



def test_patch_heads_joint_class():
    """The joint read-out learns one class per (kind, colour) pair on covered patches, 0 on the background."""
    from fastllava.train.demo import PatchHeads
    from fastllava.train.shapes import COLORS, SHAPES

    torch.manual_seed(0)
    heads = PatchHeads(8, joint=True)
    labels = torch.tensor([[[0, 2, 6], [0, 3, 8], [0, 1, 0]]])  # (B=1, 3, P=3): background, blue square, black cross
    loss, stats = heads.loss(torch.randn(1, 3, 8), labels)
    assert loss.isfinite() and "joint" in stats and heads.joint.out_features == len(SHAPES) * len(COLORS) + 1
    # the targets: 1 + kind index * colours + colour index (square = 1, blue = 2; cross = 5, black = 7)
    joint = torch.where(labels[:, 0] > 0, 1 + (labels[:, 0] - 1) * len(COLORS) + labels[:, 1] - 1, 0)
    assert joint.tolist() == [[0, 1 + 1 * 8 + 2, 1 + 5 * 8 + 7]]
    assert PatchHeads(8).joint is None


def test_length_grouped_synthetic_batches(processor):
    """Grouped data: the same examples, each once, in batches of similar length, the same order every time."""
    from fastllava.train.demo import SyntheticVQADataset
    from fastllava.train.trainer import _EpochSampler

    collator = LlavaCollator(processor)
    plain = SyntheticVQADataset(collator, 24, 5, questions_per_image=3, image_sizes=(48,))
    grouped = SyntheticVQADataset(collator, 24, 5, questions_per_image=3, image_sizes=(48,), group_size=12,
                                  batch_size=4)
    key = lambda ex: tuple(ex["input_ids"])  # noqa: E731
    assert sorted(map(key, (grouped[i] for i in range(24)))) == sorted(map(key, (plain[i] for i in range(24))))
    for start in (0, 12):
        lengths = [len(grouped[i]["input_ids"]) for i in range(start, start + 12)]
        batches = [lengths[i:i + 4] for i in range(0, 12, 4)]
        assert sorted(x for b in sorted(batches) for x in b) == [x for b in sorted(batches) for x in b]
    again = SyntheticVQADataset(collator, 24, 5, questions_per_image=3, image_sizes=(48,), group_size=12,
                                batch_size=4)
    assert [key(again[i]) for i in range(24)] == [key(grouped[i]) for i in range(24)]
    with pytest.raises(ValueError):
        SyntheticVQADataset(collator, 24, 5, group_size=10, batch_size=4)
    assert list(_EpochSampler(6, 0, 0, skip=2, shuffle=False)) == [2, 3, 4, 5]
    assert sorted(_EpochSampler(6, 0, 0)) == list(range(6))


# --- the bundled demo model ---------------------------------------------------------------------------------------

DEMO_MODEL = Path(__file__).resolve().parents[1] / "fastllava" / "demo" / "model"


@pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").is_file(), reason="demo model not built yet")
def test_bundled_demo_model_answers_about_its_picture():
    from fastllava.models.llava import LlavaForConditionalGeneration
    from fastllava.processing import AutoProcessor
    from fastllava.train.demo import make_answer_fn

    size = sum(p.stat().st_size for p in DEMO_MODEL.iterdir() if p.is_file())
    assert size <= 20 * 1024 * 1024
    model = LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL)
    answer = make_answer_fn(model, AutoProcessor.from_pretrained(DEMO_MODEL))
    image = Image.open(DEMO_MODEL.parent / "image.png").convert("RGB")  # write_demo_image: one blue circle, left
    facts = {
        "What colour is the circle?": "blue",  # the README's main command asks this
        "What shape is the blue object?": "circle",
        "How many shapes are there?": "1",
        "Is there a blue circle?": "yes",
        "Is there a red square?": "no",
    }
    assert {q: answer(image, q) for q in facts} == facts
