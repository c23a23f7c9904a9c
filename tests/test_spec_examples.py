"""Every usage example of the transformers LLaVA docs (spec/llava-transformers-docs.md), run with only the
import changed to fastllava.

Offline adaptations, and nothing else: the hub id resolves to a tiny llava-1.5-style checkpoint placed in a
local Hugging Face cache (no network; ``HF_HUB_OFFLINE=1``), and the example image URLs point to a local HTTP
server serving a real photo. The config example runs in test_config.py.
"""

from __future__ import annotations

import http.server
import io
import shutil
import threading

import pytest
import torch

from tiny_checkpoints import make_full_checkpoint

HUB_ID = "llava-hf/llava-1.5-7b-hf"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A huggingface_hub cache holding the tiny checkpoint under the real id; the env points there."""
    source = make_full_checkpoint(tmp_path_factory.mktemp("src"), "llava15")
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--llava-hf--llava-1.5-7b-hf"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    from huggingface_hub import constants

    patcher = pytest.MonkeyPatch()
    patcher.setenv("HF_HUB_CACHE", str(cache))
    patcher.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: point its constants there too.
    patcher.setattr(constants, "HF_HUB_CACHE", str(cache))
    patcher.setattr(constants, "HF_HUB_OFFLINE", True)
    yield cache
    patcher.undo()


@pytest.fixture(scope="module")
def image_urls():
    from PIL import Image
    from skimage import data

    photos = {}
    for name, array in {"australia.jpg": data.astronaut(), "000000039769.jpg": data.chelsea()}.items():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        photos["/" + name] = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = photos.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield {"stop_sign": f"{base}/australia.jpg", "cats": f"{base}/000000039769.jpg"}
    server.shutdown()


def test_chat_template_example(hub_cache):
    from fastllava import AutoProcessor

    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")

    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What’s shown in this image?"},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "This image shows a red stop sign."}, ]
        },
        {

            "role": "user",
            "content": [
                {"type": "text", "text": "Describe the image in more details."},
            ],
        },
    ]

    text_prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    # The docs print "...stop sign.</s>USER: ..."; the real llava-1.5 template (and so transformers on these files)
    # renders a space there, so the oracle decides.
    transformers = pytest.importorskip("transformers")
    snapshot = next((hub_cache / "models--llava-hf--llava-1.5-7b-hf" / "snapshots").iterdir())
    expected = transformers.AutoProcessor.from_pretrained(snapshot).apply_chat_template(conversation, add_generation_prompt=True)
    assert text_prompt == expected
    assert text_prompt.startswith("USER: <image>\nWhat’s shown in this image? ASSISTANT: This image shows a red stop sign.")
    assert text_prompt.endswith("USER: Describe the image in more details. ASSISTANT:")


def test_single_input_inference_example(hub_cache, image_urls):
    from fastllava import AutoProcessor, LlavaForConditionalGeneration

    # Load the model in half-precision
    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf", device_map="auto")
    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")

    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": image_urls["stop_sign"]},
                {"type": "text", "text": "What is shown in this image?"},
            ],
        },
    ]

    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt"
    ).to(model.device, torch.float16)

    # Generate
    generate_ids = model.generate(**inputs, max_new_tokens=30)
    decoded = processor.batch_decode(generate_ids, skip_special_tokens=True)
    assert inputs["pixel_values"].dtype == torch.float16 and inputs["input_ids"].dtype == torch.long
    assert decoded[0].startswith("USER:") and "What is shown in this image? ASSISTANT:" in decoded[0]
    assert generate_ids.shape[1] <= inputs["input_ids"].shape[1] + 30


def test_batched_inference_example(hub_cache, image_urls):
    from fastllava import AutoProcessor, LlavaForConditionalGeneration

    # Load the model in half-precision
    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf", device_map="auto")
    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")

    # Prepare a batch of two prompts
    conversation_1 = [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": image_urls["stop_sign"]},
                {"type": "text", "text": "What is shown in this image?"},
            ],
        },
    ]

    conversation_2 = [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": image_urls["cats"]},
                {"type": "text", "text": "What is shown in this image?"},
            ],
        },
    ]

    inputs = processor.apply_chat_template(
        [conversation_1, conversation_2],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        padding=True,
        return_tensors="pt"
    ).to(model.device, torch.float16)

    # Generate
    generate_ids = model.generate(**inputs, max_new_tokens=30)
    decoded = processor.batch_decode(generate_ids, skip_special_tokens=True)
    assert len(decoded) == 2 and inputs["pixel_values"].shape[0] == 2
    # Each row equals the same conversation generated on its own.
    alone = processor.apply_chat_template(conversation_2, add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    single = model.generate(**alone, max_new_tokens=30)
    assert decoded[1] == processor.batch_decode(single, skip_special_tokens=True)[0]


def test_do_pad_example(hub_cache):
    from fastllava import LlavaImageProcessor

    image_processor = LlavaImageProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf", do_pad=True)
    assert image_processor.do_pad is True


def test_forward_docstring_example(hub_cache, image_urls):
    from io import BytesIO

    import httpx
    from PIL import Image

    from fastllava import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")
    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")

    prompt = "USER: <image>\nWhat's the content of the image? ASSISTANT:"
    url = image_urls["stop_sign"]
    with httpx.stream("GET", url) as response:
        image = Image.open(BytesIO(response.read()))

    inputs = processor(images=image, text=prompt, return_tensors="pt")

    # Generate
    generate_ids = model.generate(**inputs, max_new_tokens=15)
    text = processor.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    assert text.startswith("USER:") and "What's the content of the image? ASSISTANT:" in text


def test_get_image_features_example(hub_cache, image_urls):
    from fastllava import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")
    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")

    messages = [
        {
            "role": "user", "content": [
                {"type": "image", "url": image_urls["cats"]},
                {"type": "text", "text": "Where is the cat standing?"},
            ]
        },
    ]

    inputs = processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True
    )
    # Generate
    generate_ids = model.generate(**inputs)
    processor.batch_decode(generate_ids, skip_special_tokens=True)[0]
    assert generate_ids.shape[1] <= inputs["input_ids"].shape[1] + 20  # transformers' default: 20 new tokens
    features = model.get_image_features(pixel_values=inputs["pixel_values"])
    assert len(features.pooler_output) == 1 and features.pooler_output[0].shape == (16, model.config.text_config.hidden_size)
