"""The C++ resampler (torch.ops.fastllava.resample_window via pil_resample.kernel_resize) against Pillow itself.

Every claimed filter (BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS), RGB and L (the modes the processor resizes), many
sizes: upscales, downscales by large factors, 1-pixel inputs and outputs, odd sizes, windows of the output (the
part a centre crop keeps) and Pillow's own ``box`` resizes of such windows. The image processor gives the same
pixel_values with the kernel and without it (Pillow's path), and both equal transformers'.

The kernel must build here: a machine without g++/ninja fails these tests, it does not skip them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava import pil_resample
from fastllava.image_processing import LlavaImageProcessor
from fastllava.kernels import build

FILTERS = {"box": 4, "bilinear": 2, "hamming": 5, "bicubic": 3, "lanczos": 1}


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    assert build.load(), "fastllava's C++ kernels did not build (see the warning above): g++ and ninja needed"
    assert all(pil_resample.kernel_available(f) for f in FILTERS.values())


def _image(rng, height: int, width: int, mode: str, kind: str = "noise") -> Image.Image:
    if kind == "noise":
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    elif kind == "binary":  # extremes: where the negative lobes clip at 0 and 255
        array = (rng.random((height, width, 3)) < 0.5).astype(np.uint8) * 255
    else:  # smooth gradients
        y, x = np.mgrid[0:height, 0:width]
        array = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, (255 - x) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(array).convert(mode)


def _pillow(image: Image.Image, size: tuple[int, int], resample: int) -> np.ndarray:
    """(H, W, C) uint8 of Pillow's resize to size = (height, width)."""
    out = np.asarray(image.resize((size[1], size[0]), resample=resample))
    return out.reshape(size[0], size[1], -1)


def _kernel(image: Image.Image, size, resample, rows=None, cols=None) -> np.ndarray:
    source, channels, keep = pil_resample.pil_source(image)
    out = pil_resample.kernel_resize(source, channels, size, resample, rows, cols).numpy()
    del keep
    return out


SIZES = [  # (in_h, in_w) -> (out_h, out_w)
    ((1, 1), (1, 1)), ((1, 1), (7, 5)), ((1, 9), (3, 2)), ((9, 1), (2, 3)), ((5, 7), (1, 1)), ((2, 3), (3, 2)),
    ((17, 13), (40, 41)), ((13, 17), (13, 9)), ((13, 17), (9, 17)), ((64, 64), (64, 64)), ((33, 31), (333, 7)),
    ((300, 451), (336, 505)), ((451, 300), (505, 336)), ((512, 512), (336, 336)), ((1411, 1411), (336, 336)),
    ((1000, 872), (385, 336)), ((640, 427), (11, 7)), ((1200, 37), (5, 36)), ((37, 1200), (36, 5)),
    ((401, 29), (3, 29)), ((29, 401), (29, 3)), ((600, 40), (100, 39)), ((250, 260), (251, 259)),
]


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_full_resize_equals_pillow(name, mode):
    rng = np.random.default_rng(FILTERS[name])
    for index, (shape, size) in enumerate(SIZES):
        image = _image(rng, *shape, mode, ("noise", "binary", "smooth")[index % 3])
        np.testing.assert_array_equal(_kernel(image, size, FILTERS[name]), _pillow(image, size, FILTERS[name]),
                                      err_msg=f"{shape} -> {size}")


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_windows_equal_cropped_pillow(name, mode):
    """Random windows of random resizes (both pass orders, one axis or both resized) equal the crop of Pillow's."""
    resample = FILTERS[name]
    rng = np.random.default_rng(100 + resample)
    for trial in range(40):
        in_h, in_w = (int(v) for v in rng.integers(1, 260, 2))
        if trial % 4 == 0:  # large factors
            out_h, out_w = max(1, in_h // int(rng.integers(5, 40))), max(1, in_w // int(rng.integers(1, 40)))
        elif trial % 4 == 1:  # one axis kept: Pillow runs one pass
            out_h, out_w = (in_h, int(rng.integers(1, 300))) if trial % 8 == 1 else (int(rng.integers(1, 300)), in_w)
        else:
            out_h, out_w = (int(v) for v in rng.integers(1, 300, 2))
        image = _image(rng, in_h, in_w, mode, ("noise", "binary")[trial % 2])
        full = _pillow(image, (out_h, out_w), resample)
        top = int(rng.integers(0, out_h))
        left = int(rng.integers(0, out_w))
        rows, cols = (top, int(rng.integers(1, out_h - top + 1))), (left, int(rng.integers(1, out_w - left + 1)))
        got = _kernel(image, (out_h, out_w), resample, rows, cols)
        np.testing.assert_array_equal(got, full[top : top + rows[1], left : left + cols[1]],
                                      err_msg=f"{(in_h, in_w)} -> {(out_h, out_w)} rows {rows} cols {cols}")


@pytest.mark.parametrize("name", ["box", "bilinear", "bicubic"])
def test_windows_equal_pillow_box_resize(name):
    """Where Pillow's own ``resize(box=...)`` computes a centre-crop window exactly, the kernel gives the same."""
    resample = FILTERS[name]
    rng = np.random.default_rng(7)
    checked = 0
    for (in_h, in_w), (out_h, out_w) in [((300, 512), (280, 448)), ((310, 640), (300, 504)),
                                         ((500, 1000), (336, 500)), ((400, 384), (500, 448)), ((37, 451), (36, 505))]:
        image = _image(rng, in_h, in_w, "RGB")
        left, count = (out_w - 336) // 2, 336
        found = pil_resample.pillow_box(in_w, out_w, resample, left, count)
        if found is None or pil_resample._vertical_first(in_h, in_w, out_h, out_w) or \
                pil_resample._vertical_first(in_h, in_w, out_h, found[3]):
            continue  # no exact box, or Pillow would round between the passes elsewhere
        in0, in1, first, n = found
        boxed = np.asarray(image.resize((n, out_h), resample=resample, box=(in0, 0, in1, in_h)))
        want = boxed[:, left - first : left - first + count]
        np.testing.assert_array_equal(_kernel(image, (out_h, out_w), resample, None, (left, count)), want)
        checked += 1
    assert checked >= 2


def test_sources_in_every_layout():
    """Pillow's memory (RGBX, read in place), numpy HWC with strided rows, CHW planes, and an image Pillow keeps
    in several blocks (read through a copy) all give Pillow's result."""
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (123, 157, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    want = _pillow(image, (61, 200), 3)
    source, channels, keep = pil_resample.pil_source(image)
    assert (tuple(source.shape), channels) == ((123, 157, 4), 3)
    np.testing.assert_array_equal(pil_resample.kernel_resize(source, channels, (61, 200), 3).numpy(), want)
    wide = np.zeros((123, 170, 3), dtype=np.uint8)
    wide[:, 5:162] = array
    strided = torch.from_numpy(wide)[:, 5:162]  # rows 170 pixels apart
    np.testing.assert_array_equal(pil_resample.kernel_resize(strided, 3, (61, 200), 3).numpy(), want)
    for c in range(3):
        plane = torch.from_numpy(array[:, :, c].copy()).unsqueeze(-1)
        got = pil_resample.kernel_resize(plane, 1, (61, 200), 3).numpy()[..., 0]
        np.testing.assert_array_equal(got, want[..., c])
    big = Image.fromarray(np.tile(array, (25, 26, 1))[:3000, :4000])  # 48 MB: several Pillow blocks
    source, channels, keep = pil_resample.pil_source(big)
    assert tuple(source.shape[:2]) == (3000, 4000)
    got = pil_resample.kernel_resize(source, channels, (336, 448), 3, (0, 336), (56, 336)).numpy()
    np.testing.assert_array_equal(got, _pillow(big, (336, 448), 3)[:, 56:392])


def test_rows_split_across_threads_give_the_same_result():
    """parallel=True (an image alone: rows split across torch's threads) in every pass order and one-pass case."""
    rng = np.random.default_rng(6)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for (in_h, in_w), (out_h, out_w), rows, cols in [
            ((700, 500), (333, 238), None, None), ((900, 300), (100, 290), (10, 80), (5, 280)),  # both orders
            ((301, 77), (301, 150), (3, 290), None), ((77, 301), (150, 301), None, (1, 299)),  # one pass each
            ((250, 250), (250, 250), (0, 250), (20, 200)), ((5, 999), (3, 40), None, None),
        ]:
            image = _image(rng, in_h, in_w, "RGB")
            source, channels, keep = pil_resample.pil_source(image)
            want = _pillow(image, (out_h, out_w), 3)
            if rows:
                want = want[rows[0] : rows[0] + rows[1]]
            if cols:
                want = want[:, cols[0] : cols[0] + cols[1]]
            for parallel in (False, True):
                got = pil_resample.kernel_resize(source, channels, (out_h, out_w), 3, rows, cols, parallel=parallel)
                np.testing.assert_array_equal(got.numpy(), want)
    finally:
        torch.set_num_threads(previous)


def test_table_output_and_errors():
    rng = np.random.default_rng(4)
    image = _image(rng, 50, 70, "RGB")
    table = torch.from_numpy(rng.random((3, 256), dtype=np.float32))
    source, channels, keep = pil_resample.pil_source(image)
    out = torch.full((3, 40, 40), -1.0)
    pil_resample.kernel_resize(source, channels, (30, 42), 2, (0, 30), (6, 30), out=out, table=table, dy=5, dx=3)
    window = torch.from_numpy(_pillow(image, (30, 42), 2)[:, 6:36].astype(np.int64)).permute(2, 0, 1)
    want = torch.stack([table[c][window[c]] for c in range(3)])
    assert torch.equal(out[:, 5:35, 3:33], want)
    assert (out[:, :5] == -1).all() and (out[:, 35:] == -1).all() and (out[:, :, :3] == -1).all()
    with pytest.raises(ValueError, match="outside"):
        pil_resample.kernel_resize(source, channels, (30, 42), 2, (25, 10))
    with pytest.raises(RuntimeError, match="table"):
        pil_resample.kernel_resize(source, channels, (30, 42), 2, out=out, table=table[:, :100])
    with pytest.raises(RuntimeError, match="uint8"):
        pil_resample.kernel_resize(source.float(), channels, (30, 42), 2)
    assert not pil_resample.kernel_available(0)  # NEAREST stays with Pillow


@pytest.mark.parametrize("inputs", ["pil", "hwc", "chw-tensor"])
@pytest.mark.parametrize("options", [{}, {"do_pad": True}, {"resample": 2, "do_center_crop": False,
                                     "size": {"height": 384, "width": 384}}, {"resample": 1},
                                     {"crop_size": {"height": 400, "width": 400}}, {"resample": 0}])
def test_processor_same_values_with_and_without_kernel(monkeypatch, inputs, options):
    transformers = pytest.importorskip("transformers")
    skimage_data = pytest.importorskip("skimage.data")
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket(),
              np.random.default_rng(5).integers(0, 256, (37, 301, 3), dtype=np.uint8)]
    if inputs == "pil":
        batch = [Image.fromarray(p) for p in photos]
    elif inputs == "hwc":
        batch = photos
    else:
        batch = [torch.from_numpy(p).permute(2, 0, 1).contiguous() for p in photos]
    processor = LlavaImageProcessor(**options)
    kwargs = {"return_tensors": None}
    with_kernel = processor(batch, **kwargs)["pixel_values"]
    with monkeypatch.context() as patch:
        patch.setitem(build._state, "loaded", False)
        assert not pil_resample.kernel_available(3)
        without = processor(batch, **kwargs)["pixel_values"]
    reference = transformers.LlavaImageProcessorPil(**options)([Image.fromarray(p) for p in photos],
                                                             return_tensors=None)["pixel_values"]
    for a, b, ref in zip(with_kernel, without, reference):
        assert torch.equal(a, b)
        np.testing.assert_array_equal(a.numpy(), np.asarray(ref))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # one image alone: the kernel splits its rows across the threads
        alone = processor(batch[:1], **kwargs)["pixel_values"][0]
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_array_equal(alone.numpy(), np.asarray(reference[0]))
