"""Image processors and the Pillow-exact resampler, with transformers' LlavaImageProcessorPil as the oracle.

Every photo (real ones from skimage.data, plus grayscale, RGBA, palette GIF, 16-bit TIFF, 1x1 and 4000x3000)
must give the same pixel_values (max |diff| <= 1e-5) from LlavaImageProcessorPil, from LlavaImageProcessor on
its CPU path, and from LlavaImageProcessor forced onto the banded-matmul path that accelerators use. The CPU path's
tests run twice (``cpu_kernels``): with the C++ resampler and with Pillow's (FASTLLAVA_KERNELS=0).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava import pil_resample
from fastllava.image_processing import LlavaImageProcessor, LlavaImageProcessorPil

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

TOLERANCE = 1e-5
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry",
                 "retina", "rocket")
CLIP = {}
SIGLIP = {"size": {"height": 384, "width": 384}, "do_center_crop": False, "image_mean": [0.5] * 3,
          "image_std": [0.5] * 3}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Many small ops: on a shared 2-core machine two OpenMP threads mostly wait on each other (8x the CPU time).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def oracle(**config):
    return transformers.LlavaImageProcessorPil(**config)


def ours(kind: str, **config):
    if kind == "pil":
        return LlavaImageProcessorPil(**config)
    processor = LlavaImageProcessor(**config)
    processor._force_matmul = kind == "matmul"  # the exact banded-matmul path used on accelerators
    return processor


KINDS = ("pil", "torch-cpu", "matmul")


def _encode(image: Image.Image, fmt: str, **kwargs) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    buffer.seek(0)
    reopened = Image.open(buffer)
    reopened.load()
    return reopened


def special_images() -> dict[str, Image.Image]:
    camera = skimage_data.camera()
    return {
        "grayscale": Image.fromarray(camera),
        "rgba-logo": Image.fromarray(skimage_data.logo()),
        "palette-gif": _encode(Image.fromarray(skimage_data.coffee()).convert("P", palette=Image.Palette.ADAPTIVE),
                               "GIF", transparency=0),
        "tiff-16bit": _encode(Image.fromarray(camera.astype(np.uint16) * 257), "TIFF"),
        "1x1": Image.new("RGB", (1, 1), (200, 30, 90)),
        "tall-strip": Image.fromarray(skimage_data.astronaut()[:, 200:230]),
    }


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    photos = [Image.fromarray(getattr(skimage_data, name)()) for name in COLOUR_PHOTOS]
    return photos + list(special_images().values())


@pytest.fixture(scope="module")
def large() -> Image.Image:
    # 4000x3000 "photo": the astronaut scaled up, with noise so every filter tap matters
    tiles = np.tile(skimage_data.astronaut(), (6, 8, 1))[:3000, :4000]  # (3000, 4000, 3)
    noise = np.random.default_rng(0).integers(0, 16, tiles.shape, dtype=np.uint8)
    return Image.fromarray(tiles // 16 * 15 + noise)


def assert_close(ours_out, reference):
    ours_out = np.asarray(ours_out, dtype=np.float64)
    assert ours_out.shape == reference.shape
    assert np.abs(ours_out - reference).max() <= TOLERANCE


@pytest.mark.parametrize("config_name, config", [("clip", CLIP), ("siglip", SIGLIP)])
@pytest.mark.parametrize("do_pad", [False, True])
def test_pixel_values_equal_transformers(images, large, config_name, config, do_pad, cpu_kernels):
    batch = images + ([large] if not do_pad else [])  # the 4000x3000 image once per config
    reference = oracle(**config, do_pad=do_pad)(batch, return_tensors="np")["pixel_values"]
    for kind in KINDS:
        out = ours(kind, **config, do_pad=do_pad)(batch, return_tensors="np")["pixel_values"]
        assert_close(out, reference)


def test_defaults_are_clip():
    for cls in (LlavaImageProcessor, LlavaImageProcessorPil):
        ref = transformers.LlavaImageProcessorPil().to_dict()
        mine = cls().to_dict()
        for key in ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                    "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad"):
            expected = ref[key]
            expected = list(expected) if isinstance(expected, tuple) else expected
            assert mine[key] == expected, key


SMALL = ("chelsea", "logo")


@pytest.fixture(scope="module")
def small_images() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage_data, name)()).resize((173, 131)) for name in SMALL]


OPTION_CASES = [
    {"do_resize": False},
    {"do_resize": False, "do_center_crop": False},
    {"size": {"shortest_edge": 100}},
    {"size": {"height": 64, "width": 96}, "do_center_crop": False},
    {"size": 150, "crop_size": 120},
    {"size": {"shortest_edge": 80, "longest_edge": 100}, "do_center_crop": False, "return_tensors": None},
    {"size": {"max_height": 90, "max_width": 70}, "do_center_crop": False, "return_tensors": None},
    {"resample": 0}, {"resample": 1}, {"resample": 2}, {"resample": 4}, {"resample": 5},
    {"resample": Image.Resampling.BILINEAR},
    {"do_center_crop": False, "return_tensors": None},
    {"crop_size": {"height": 300, "width": 250}},  # larger than the resized image: zero padding
    {"do_rescale": False},
    {"rescale_factor": 1 / 127.5},
    {"do_normalize": False},
    {"do_rescale": False, "do_normalize": False},
    {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.9, 0.8, 0.7]},
    {"image_mean": 0.5, "image_std": 0.25},
    {"do_convert_rgb": False},
    {"do_pad": True},
    {"do_pad": True, "image_mean": [0.5, 0.5, 0.5]},
    {"return_tensors": "np"},
    {"return_tensors": None},
]


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_per_call_and_at_construction(small_images, options):
    options = dict(options)
    return_tensors = options.pop("return_tensors", "pt")
    inputs = small_images
    if options.get("do_convert_rgb") is False:
        inputs = [image.convert("RGB") for image in small_images]  # transformers keeps 4 channels otherwise
    reference = oracle()(inputs, return_tensors=return_tensors, **options)["pixel_values"]
    reference_list = [np.asarray(r, dtype=np.float64) for r in reference]
    for kind in KINDS:
        for out in (
            ours(kind)(inputs, return_tensors=return_tensors, **options)["pixel_values"],
            ours(kind, **options)(inputs, return_tensors=return_tensors)["pixel_values"],
        ):
            if return_tensors == "pt":
                assert isinstance(out, torch.Tensor)
            elif return_tensors == "np":
                assert isinstance(out, np.ndarray)
            else:
                assert isinstance(out, list) and len(out) == len(inputs)
            for got, expected in zip(out, reference_list):
                got = got.numpy() if isinstance(got, torch.Tensor) else got
                assert_close(got, expected)
            assert _dtype(out) == _dtype(reference)


def _dtype(values) -> np.dtype:
    first = values[0] if isinstance(values, list) else values
    return first.numpy().dtype if isinstance(first, torch.Tensor) else np.asarray(first).dtype


def test_input_types_agree(small_images, cpu_kernels):
    image = small_images[0]
    hwc = np.asarray(image)
    reference = oracle()(image, return_tensors="np")["pixel_values"]
    sources = [
        image, [image], [[image]], hwc, hwc.transpose(2, 0, 1).copy(), torch.from_numpy(hwc.copy()),
        torch.from_numpy(hwc.transpose(2, 0, 1).copy()), hwc[None], torch.from_numpy(hwc.transpose(2, 0, 1)[None].copy()),
        hwc.astype(np.float32),  # whole numbers as floats take the same path as uint8 in transformers
    ]
    for kind in KINDS:
        for source in sources:
            assert_close(ours(kind)(source, return_tensors="np")["pixel_values"], reference)
    float01 = hwc.astype(np.float32) / 255  # [0, 1] floats: transformers truncates to uint8 to resize
    reference = oracle()(float01, return_tensors="np", do_rescale=False)["pixel_values"]
    for kind in KINDS:
        assert_close(ours(kind)(float01, return_tensors="np", do_rescale=False)["pixel_values"], reference)


def test_channels_last_and_data_format(small_images):
    out = LlavaImageProcessor()(small_images, return_tensors="pt", data_format="channels_last")["pixel_values"]
    first = LlavaImageProcessor()(small_images, return_tensors="pt")["pixel_values"]
    assert torch.equal(out, first.permute(0, 2, 3, 1))


def test_unknown_call_kwarg_is_an_error(small_images):
    with pytest.raises(TypeError, match="unexpected"):
        LlavaImageProcessor()(small_images, do_resise=False)


def test_stacking_different_shapes_is_a_clear_error(small_images):
    other = small_images[0].resize((50, 80))
    with pytest.raises(ValueError, match="different shapes"):
        LlavaImageProcessor()([small_images[0], other], do_center_crop=False, return_tensors="pt")


# --- configs ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, small_images):
    for cls in (LlavaImageProcessor, LlavaImageProcessorPil):
        processor = cls(size={"shortest_edge": 336}, crop_size=336, do_pad=True, custom_key="kept")
        processor.save_pretrained(tmp_path / cls.__name__)
        saved = json.loads((tmp_path / cls.__name__ / "preprocessor_config.json").read_text())
        assert saved["image_processor_type"] == "LlavaImageProcessor"
        assert saved["custom_key"] == "kept" and saved["crop_size"] == {"height": 336, "width": 336}
        loaded = cls.from_pretrained(tmp_path / cls.__name__)
        assert loaded.to_dict() == processor.to_dict() and loaded.custom_key == "kept"
        # transformers reads what we wrote and computes the same thing
        theirs = transformers.LlavaImageProcessorPil.from_pretrained(str(tmp_path / cls.__name__))
        assert_close(loaded(small_images, return_tensors="np")["pixel_values"],
                     theirs(small_images, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("source", ["LlavaImageProcessorPil", "CLIPImageProcessorPil", "SiglipImageProcessorPil"])
def test_reads_configs_saved_by_transformers(tmp_path, small_images, source):
    theirs = getattr(transformers, source)(**({"size": {"height": 384, "width": 384}} if "Siglip" in source else {}))
    theirs.save_pretrained(str(tmp_path))
    reference = theirs(small_images, return_tensors="np")["pixel_values"]
    for cls in (LlavaImageProcessor, LlavaImageProcessorPil):
        assert_close(cls.from_pretrained(tmp_path)(small_images, return_tensors="np")["pixel_values"], reference)
        assert_close(cls.from_pretrained(tmp_path / "preprocessor_config.json")(
            small_images, return_tensors="np")["pixel_values"], reference)


LLAVA_15_CONFIG = {  # llava-hf/llava-1.5-7b-hf's preprocessor_config.json
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
INTERLEAVE_CONFIG = {  # llava-hf/llava-interleave-qwen-0.5b-hf's: SigLIP, no crop keys at all
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class": "LlavaProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384},
}


def test_llava_hf_configs(tmp_path, small_images):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(LLAVA_15_CONFIG))
    reference = transformers.CLIPImageProcessorPil(**LLAVA_15_CONFIG)(small_images, return_tensors="np")
    assert_close(LlavaImageProcessor.from_pretrained(tmp_path / "clip")(small_images, return_tensors="np")
                 ["pixel_values"], reference["pixel_values"])
    # processor_config.json with the image processor nested, as newer checkpoints carry it
    (tmp_path / "siglip").mkdir()
    (tmp_path / "siglip" / "processor_config.json").write_text(json.dumps(
        {"image_processor": INTERLEAVE_CONFIG, "patch_size": 14, "processor_class": "LlavaProcessor"}))
    reference = transformers.SiglipImageProcessorPil(**INTERLEAVE_CONFIG)(small_images, return_tensors="np")
    for cls in (LlavaImageProcessor, LlavaImageProcessorPil):
        processor = cls.from_pretrained(tmp_path / "siglip")
        assert processor.do_center_crop is False and processor.size == {"height": 384, "width": 384}
        assert_close(processor(small_images, return_tensors="np")["pixel_values"], reference["pixel_values"])
    with pytest.raises(OSError, match="preprocessor_config.json"):
        LlavaImageProcessor.from_pretrained(tmp_path / "nothing-here")


def test_from_dict_overrides():
    processor, unused = LlavaImageProcessor.from_dict(LLAVA_15_CONFIG, do_pad=True, unrelated=1,
                                                      return_unused_kwargs=True)
    assert processor.do_pad is True and unused == {"unrelated": 1}
    assert LlavaImageProcessorPil.from_pretrained


# --- the resampler itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("resample", [0, 1, 2, 3, 4, 5])
def test_resample_matches_pillow(resample):
    rng = np.random.default_rng(resample)
    cases = [((37, 53), (11, 80)), ((200, 150), (199, 151)), ((64, 300), (300, 64)), ((5, 5), (1, 1)),
             ((1, 9), (13, 2)), ((401, 599), (400, 600)), ((300, 200), (150, 400))]
    for (h, w), (oh, ow) in cases:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize((ow, oh), resample)).transpose(2, 0, 1)
        got = pil_resample.resize(torch.from_numpy(image.copy()).permute(2, 0, 1), (oh, ow), resample)
        np.testing.assert_array_equal(got.numpy(), expected)
        # a window of the output is the same window of the full result
        region = (oh // 3, ow // 4, max(1, oh // 2), max(1, ow // 2))
        part = pil_resample.resize(torch.from_numpy(image.copy()).permute(2, 0, 1), (oh, ow), resample, region=region)
        np.testing.assert_array_equal(part.numpy(), expected[:, region[0]:region[0] + region[2],
                                                               region[1]:region[1] + region[3]])


def test_resample_batched_and_reduced_precision():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (4, 3, 90, 70), dtype=np.uint8)
    expected = np.stack([np.asarray(Image.fromarray(i.transpose(1, 2, 0)).resize((33, 41), 3)).transpose(2, 0, 1)
                         for i in images])
    np.testing.assert_array_equal(pil_resample.resize(torch.from_numpy(images), (41, 33), 3).numpy(), expected)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # float32 products may be inexact: float64 is used
        np.testing.assert_array_equal(pil_resample.resize(torch.from_numpy(images), (41, 33), 3).numpy(), expected)
    finally:
        torch.set_float32_matmul_precision(previous)


# --- the CPU fast path: only the kept window is resized, images in threads -------------------------------------


def _window_cases(rng):
    from fastllava.image_processing import _output_size

    cases = [((451, 300), (336, 224)), ((600, 400), (336, 224)), ((1000, 872), (256, 224)), ((300, 451), (224, 336)),
             ((1, 40), (1, 30)), ((40, 1), (30, 1)), ((1, 1), (7, 3)), ((97, 13), (61, 9)), ((64, 32), (60, 30))]
    for _ in range(150):
        in_w, in_h = (int(v) for v in rng.integers(1, 300, 2))
        if rng.random() < 0.5:
            h, w = _output_size(in_h, in_w, {"shortest_edge": int(rng.integers(1, 240))})
        else:
            w, h = (int(v) for v in rng.integers(1, 300, 2))
        cases.append(((in_w, in_h), (w, h)))
    return cases


def test_crop_window_resize_equals_resize_then_crop():
    from fastllava.image_processing import _crop_window, _resize_window

    rng = np.random.default_rng(0)
    boxed = 0
    for (in_w, in_h), (w, h) in _window_cases(rng):
        image = Image.fromarray(rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8))
        for resample in (3, int(rng.integers(0, 6))):
            crop_h, crop_w = (int(v) for v in rng.integers(1, 260, 2))
            (sy, ny, _), (sx, nx, _) = _crop_window(h, crop_h), _crop_window(w, crop_w)
            expected = np.asarray(image.resize((w, h), resample))[sy : sy + ny, sx : sx + nx]
            got = _resize_window(image, (h, w), resample, (sy, ny), (sx, nx))
            np.testing.assert_array_equal(got, expected, err_msg=f"{(in_w, in_h)} -> {(w, h)} filter {resample}")
            boxed += any(pil_resample.pillow_box(n, o, resample, s, c) is not None
                         for n, o, s, c in ((in_w, w, sx, nx), (in_h, h, sy, ny)) if c < o and n != o)
    assert boxed > 20  # the windowed resize was really exercised
    # CLIP's crop of a 3:2 photo resizes 252 of the 336 columns (multiples of 21: 451/336 has odd denominator 21)
    assert pil_resample.pillow_box(451, 336, 3, 56, 224) == (56.375, 394.625, 42, 252)


def test_pass_order_follows_pillow():
    """The order of Pillow's two passes decides where the uint8 rounding happens; both the windowed resize and the
    banded matmul path depend on predicting it."""
    rng = np.random.default_rng(1)
    for (in_w, in_h), (w, h) in _window_cases(rng)[:80] + [((400, 400), (300, 100)), ((1000, 4000), (384, 384))]:
        if w == in_w or h == in_h:
            continue  # a single pass
        image = Image.fromarray(rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8))
        full = np.asarray(image.resize((w, h), 3))
        first = image.resize((in_w, h), 3) if pil_resample._vertical_first(in_h, in_w, h, w) else \
            image.resize((w, in_h), 3)
        np.testing.assert_array_equal(np.asarray(first.resize((w, h), 3)), full)
        got = pil_resample.resize(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), (h, w), 3)
        np.testing.assert_array_equal(got.numpy(), full.transpose(2, 0, 1))


@pytest.mark.parametrize("config_name, config", [("clip", CLIP), ("siglip", SIGLIP)])
def test_odd_sizes_equal_transformers(config_name, config, cpu_kernels):
    rng = np.random.default_rng(2)
    sizes = [(1, 40), (40, 1), (2, 3), (451, 300), (300, 451), (225, 224), (224, 225), (333, 17), (640, 427)]
    batch = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    for do_pad in (False, True):
        for crop in ({}, {"do_center_crop": False}) if config_name == "clip" else ({},):
            reference = oracle(**config, **crop, do_pad=do_pad)(batch, return_tensors=None)["pixel_values"]
            out = ours("torch-cpu", **config, **crop, do_pad=do_pad)(batch, return_tensors=None)["pixel_values"]
            for got, expected in zip(out, reference):
                assert_close(got.numpy(), np.asarray(expected, dtype=np.float64))


def _with_threads(count: int, function):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return function()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("options", [{}, {"do_pad": True}, {"do_center_crop": False, "return_tensors": None},
                                     {"return_tensors": "np"}, {"size": {"height": 96, "width": 96},
                                                                "do_center_crop": False}])
def test_thread_pool_gives_identical_output(images, options, cpu_kernels):
    options = dict(options)
    return_tensors = options.pop("return_tensors", "pt")
    processor = LlavaImageProcessor(**options)
    serial = _with_threads(1, lambda: processor(images, return_tensors=return_tensors)["pixel_values"])
    threaded = _with_threads(2, lambda: processor(images, return_tensors=return_tensors)["pixel_values"])
    assert type(serial) is type(threaded)
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_bad_image_in_a_batch_is_named(small_images):
    bad = np.full((20, 30, 3), 300.5, dtype=np.float32)  # neither [0, 1] nor whole numbers in [0, 255]
    batch = [small_images[0], small_images[1], bad, small_images[0]]
    for threads in (1, 2):
        with pytest.raises(ValueError, match=r"image 2 of the batch: .*\[0, 1\]"):
            _with_threads(threads, lambda: LlavaImageProcessor()(batch, return_tensors="pt"))


def test_lazily_opened_images_shared_in_a_batch(tmp_path):
    """The same not-yet-decoded file object twice in a batch (threads must not decode it concurrently), and a
    truncated file named by its index."""
    photo = Image.fromarray(skimage_data.chelsea())
    photo.save(tmp_path / "cat.jpg", quality=90)
    data = (tmp_path / "cat.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    reference = oracle()([Image.open(tmp_path / "cat.jpg")] * 3, return_tensors="np")["pixel_values"]
    lazy = Image.open(tmp_path / "cat.jpg")
    out = _with_threads(2, lambda: LlavaImageProcessor()([lazy, lazy, lazy], return_tensors="np")["pixel_values"])
    np.testing.assert_array_equal(out, reference)
    with pytest.raises(OSError, match="image 1 of the batch"):
        LlavaImageProcessor()([Image.open(tmp_path / "cat.jpg"), Image.open(tmp_path / "cut.jpg")])
