"""LLaVA image processors: ``LlavaImageProcessorPil`` (PIL/numpy) and ``LlavaImageProcessor`` (torch, batched).

Contract: both follow transformers' ``LlavaImageProcessor[Pil]``: same constructor and per-call options
(``do_resize``, ``size`` as ``{"shortest_edge"}``, ``{"height", "width"}``, ``{"shortest_edge", "longest_edge"}`` or
``{"max_height", "max_width"}``, ``resample``, ``do_center_crop``, ``crop_size``, ``do_rescale``, ``rescale_factor``,
``do_normalize``, ``image_mean``, ``image_std``, ``do_convert_rgb``, ``do_pad`` = pad to a square with the mean
colour before resizing, ``return_tensors`` "pt" / "np" / None), the same CLIP defaults, and the same
``pixel_values`` as transformers' PIL path: 8-bit images are resized by Pillow's filters with uint8 rounding, then
centre-cropped (zero padded when too small), rescaled in float64 and normalized in float32. ``__call__`` is
``preprocess`` and returns a ``BatchFeature``. ``from_pretrained`` reads ``preprocessor_config.json`` (or the
``image_processor`` entry of ``processor_config.json``) from a directory or a file; ``to_dict`` / ``save_pretrained``
write ``preprocessor_config.json`` with ``image_processor_type``; unknown keys are kept. Configs of checkpoints that
carry a ``SiglipImageProcessor`` (fixed size, no crop, mean/std 0.5) get SigLIP's defaults for keys they omit, as
transformers' AutoImageProcessor would. On CPU the torch processor resizes with fastllava's C++ resampler
(``torch.ops.fastllava.resample_window``: Pillow's integer arithmetic in AVX2 lanes, only the window a centre crop
keeps, values mapped straight into the batch), or, where the kernels are off (FASTLLAVA_KERNELS=0, no compiler, no
AVX2) or the filter is NEAREST, with Pillow itself (computing only the cropped window where Pillow's box reproduces
it exactly); the images run in threads. On other devices it uses ``pil_resample``'s exact banded matmuls. All give
transformers' PIL results bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image

from fastllava import pil_resample
from fastllava.batch_feature import BatchFeature
from fastllava.image_loading import load_image, to_rgb

__all__ = ["LlavaImageProcessor", "LlavaImageProcessorPil", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"

_CLIP_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": pil_resample.BICUBIC,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "do_pad": False,
}
# SiglipImageProcessor's class defaults: what a SigLIP checkpoint's config means by the keys it leaves out
_SIGLIP_DEFAULTS = dict(
    _CLIP_DEFAULTS,
    size={"height": 224, "width": 224},
    do_center_crop=False,
    image_mean=IMAGENET_STANDARD_MEAN,
    image_std=IMAGENET_STANDARD_STD,
)
_OPTIONS = tuple(_CLIP_DEFAULTS)
# accepted per call besides the options; device applies to the torch processor only
_CALL_ONLY = ("return_tensors", "data_format", "input_data_format", "device", "default_to_square", "pad_size",
              "disable_grouping", "image_seq_length")
_DROPPED_KEYS = ("feature_extractor_type", "processor_class", "image_processor_type", "_processor_class")
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"max_height", "max_width"})


# --- option normalisation --------------------------------------------------------------------------------------


def _size_dict(size: Any, name: str, default_to_square: bool) -> dict[str, int] | None:
    """int / (h, w) / dict -> a size dict with one of the supported key sets (transformers' get_size_dict)."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        keys = {k for k, v in size.items() if v is not None}
        if keys in _SIZE_KEYS or keys == {"longest_edge"}:
            return {k: int(size[k]) for k in keys}
    raise ValueError(
        f"{name} must be an int, (height, width) or a dict with keys {[sorted(k) for k in _SIZE_KEYS]}; got {size!r}"
    )


def _resample_value(resample: Any) -> int:
    value = int(getattr(resample, "value", resample))
    if value not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"resample must be a PIL.Image.Resampling value 0-5, got {resample!r}")
    return value


def _standardize(options: dict[str, Any], default_to_square: bool = False) -> dict[str, Any]:
    options = dict(options)
    options["size"] = _size_dict(options.get("size"), "size", default_to_square)
    options["crop_size"] = _size_dict(options.get("crop_size"), "crop_size", True)
    if options.get("resample") is not None:
        options["resample"] = _resample_value(options["resample"])
    for key in ("image_mean", "image_std"):
        value = options.get(key)
        if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
            options[key] = tuple(float(v) for v in value)
        elif value is not None:
            options[key] = float(value)
    return options


def _validate(options: dict[str, Any]) -> None:
    if options["do_rescale"] and options["rescale_factor"] is None:
        raise ValueError("`rescale_factor` must be specified if `do_rescale` is True")
    if options["do_normalize"] and (options["image_mean"] is None or options["image_std"] is None):
        raise ValueError("`image_mean` and `image_std` must both be specified if `do_normalize` is True")
    if options["do_center_crop"] and not options["crop_size"]:
        raise ValueError("`crop_size` must be specified if `do_center_crop` is True")
    if options["do_center_crop"] and {"height", "width"} - set(options["crop_size"]):
        raise ValueError(f"crop_size needs 'height' and 'width', got {options['crop_size']}")
    if options["do_resize"] and (options["size"] is None or options["resample"] is None):
        raise ValueError("`size` and `resample` must be specified if `do_resize` is True")


def _output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """Target (height, width) of the resize, with transformers' integer rounding for each size form."""
    if "shortest_edge" in size and "longest_edge" in size:
        return _size_with_aspect_ratio(height, width, size["shortest_edge"], size["longest_edge"])
    if "shortest_edge" in size:
        target = size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        return (new_long, target) if width <= height else (target, new_long)
    if "max_height" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    if "height" in size:
        return size["height"], size["width"]
    raise ValueError(f"cannot resize with size={size}: use shortest_edge, height/width or max_height/max_width")


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    raw_size = None
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * size > max_size:
        raw_size = max_size * low / high
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return (int(raw_size * height / width) if raw_size is not None else int(size * height / width)), size
    return size, (int(raw_size * width / height) if raw_size is not None else int(size * width / height))


def _crop_window(length: int, crop: int) -> tuple[int, int, int]:
    """Centre crop along one axis as transformers' numpy center_crop: (source start, count, destination start).

    A long enough axis is cut at (length - crop) // 2; a short one is kept whole and placed at
    ceil((crop - length) / 2) in a zero-filled output.
    """
    if length >= crop:
        return (length - crop) // 2, crop, 0
    return 0, length, math.ceil((crop - length) / 2)


def _background(image_mean: Any) -> tuple[int, ...] | int:
    """Pad colour: the mean colour in 0-255, truncated as transformers does (int(x * 255))."""
    if not image_mean:
        return 0
    values = image_mean if isinstance(image_mean, (tuple, list)) else (image_mean,) * 3
    return tuple(int(x * 255) for x in values)


def _square_offsets(height: int, width: int) -> tuple[int, int, int]:
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


# --- input preparation (shared) ---------------------------------------------------------------------------------


def _flatten(images: Any) -> list:
    """A single image, a list, a nested list, or a 4-D batch -> a flat list of single images."""
    if isinstance(images, (str, Path, bytes)):
        return [load_image(images)]
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return list(images)
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(f"expected a 2-D, 3-D or 4-D image array, got shape {tuple(images.shape)}")
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(_flatten(item))
        return flat
    raise ValueError(f"unsupported image input of type {type(images).__name__}")


def _channels_first(shape: tuple, input_data_format: str | None) -> bool:
    """Where the channels are in a 3-D array (transformers' inference: ambiguous shapes count as channels first)."""
    if input_data_format is not None:
        fmt = str(getattr(input_data_format, "value", input_data_format))
        if fmt not in ("channels_first", "channels_last"):
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}")
        return fmt == "channels_first"
    if shape[0] in (1, 3, 4):
        return True
    if shape[-1] in (1, 3, 4):
        return False
    raise ValueError(f"cannot tell where the channels are in an image of shape {shape}; pass input_data_format")


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    """transformers' convert_to_rgb for channels-last arrays: gray -> 3 copies, RGBA composited on white."""
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        if np.issubdtype(image.dtype, np.floating) and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(f"RGBA image values must be in [0, 1], got [{image.min()}, {image.max()}]")
        white = 255 if np.issubdtype(image.dtype, np.integer) else 1.0
        alpha = image[..., 3:4] / white
        blended = alpha * image[..., :3] + (1 - alpha) * white
        return np.round(blended).astype(image.dtype) if white == 255 else blended.astype(image.dtype)
    return image


def _prepare_array(image: Any, do_convert_rgb: bool, input_data_format: str | None) -> np.ndarray:
    """One input -> a channels-first numpy array (a view where possible), RGB-converted as transformers does."""
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image)) if do_convert_rgb else np.asarray(image)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"unsupported image of type {type(image).__name__}")
    if image.ndim == 2:
        image = image[None]
        input_data_format = "channels_first"
    if image.ndim != 3:
        raise ValueError(f"expected an image of 2 or 3 dimensions, got shape {image.shape}")
    last = image.transpose(1, 2, 0) if _channels_first(image.shape, input_data_format) else image  # (H, W, C)
    if do_convert_rgb:
        last = _array_to_rgb(last)
    return last.transpose(2, 0, 1)  # (C, H, W)


def _pad_square_array(image: np.ndarray, image_mean: Any) -> np.ndarray:
    channels, height, width = image.shape
    if height == width:
        return image
    color = _background(image_mean)
    color = (color,) if isinstance(color, int) else color
    if len(color) != channels:
        raise ValueError(f"the pad colour has {len(color)} values but the image has {channels} channels")
    side, top, left = _square_offsets(height, width)
    out = np.empty((channels, side, side), dtype=image.dtype)
    out[...] = np.asarray(color, dtype=np.float64).astype(image.dtype)[:, None, None]
    out[:, top : top + height, left : left + width] = image
    return out


def _to_uint8_for_pil(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """transformers' to_pil_image value rule: returns (uint8 image, whether it was scaled by 255)."""
    if image.dtype == np.uint8:
        return image, False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return image.astype(np.uint8), False
        raise ValueError(f"image values [{image.min()}, {image.max()}] cannot be converted to uint8 for resizing")
    if np.all(image >= 0) and np.all(image <= 1):
        return (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    raise ValueError(f"float image values must be in [0, 1] or whole numbers in [0, 255], got [{image.min()}, "
                     f"{image.max()}]")


def _pil_resize_array(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """(C, H, W) -> (C, h, w) through Pillow, as transformers' resize does (8-bit, scaled back when needed)."""
    pixels, scaled = _to_uint8_for_pil(image)
    hwc = pixels.transpose(1, 2, 0)
    pil = Image.fromarray(np.ascontiguousarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc))
    out = np.asarray(pil.resize((size[1], size[0]), resample=resample))
    out = out[..., None] if out.ndim == 2 else out
    out = out.transpose(2, 0, 1)
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else out


def _center_crop_array(image: np.ndarray, crop: dict[str, int]) -> np.ndarray:
    channels, height, width = image.shape
    (sy, ny, dy), (sx, nx, dx) = _crop_window(height, crop["height"]), _crop_window(width, crop["width"])
    if dy == 0 and dx == 0:
        return image[:, sy : sy + ny, sx : sx + nx]
    out = np.zeros((channels, crop["height"], crop["width"]), dtype=image.dtype)
    out[:, dy : dy + ny, dx : dx + nx] = image[:, sy : sy + ny, sx : sx + nx]
    return out


def _rescale_array(image: np.ndarray, factor: float) -> np.ndarray:
    return (image.astype(np.float64) * factor).astype(np.float32)


def _normalize_array(image: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    channels = image.shape[0]
    mean = np.asarray(mean if isinstance(mean, tuple) else (mean,) * channels, dtype=image.dtype)
    std = np.asarray(std if isinstance(std, tuple) else (std,) * channels, dtype=image.dtype)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"image_mean/image_std have {len(mean)}/{len(std)} values for {channels} channels")
    return (image - mean[:, None, None]) / std[:, None, None]


def _value_table(options: dict[str, Any], channels: int) -> np.ndarray | None:
    """(C, 256) float32: rescale + normalize of every uint8 value, computed with transformers' exact arithmetic."""
    if not (options["do_rescale"] or options["do_normalize"]):
        return None
    key = tuple(options[k] for k in ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"))
    return _cached_table(key, channels)


def _write_values(pixels: np.ndarray, out: np.ndarray, top: int, left: int, options: dict[str, Any]) -> None:
    """(h, w, 3) uint8 -> rescaled/normalized float32 at out[:, top:top+h, left:left+w] of out (3, H, W); the rest
    of out gets the value of a 0 pixel, as transformers zero-pads a centre crop before rescaling. Needs
    do_rescale or do_normalize. numpy releases the GIL here and starts no threads of its own in the workers."""
    # A lookup keeps pixel_values bit-identical to transformers'; a fused multiply-add per channel would be ~1.5x
    # faster on this step (a few % of the total) but off by up to ~5e-7, and no float32 constants make it exact.
    table = _value_table(options, 3)  # (3, 256)
    height, width = pixels.shape[:2]
    source = pixels.transpose(2, 0, 1)  # (3, h, w) view
    if (height, width) != out.shape[1:]:
        out[...] = table[:, :1, None]
    for channel in range(3):  # np.take with uint8 indices: a 256-entry lookup, no index conversion
        np.take(table[channel], source[channel], out=out[channel, top : top + height, left : left + width],
                mode="clip")


@lru_cache(maxsize=64)
def _cached_table(key: tuple, channels: int) -> np.ndarray:
    options = dict(zip(("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"), key))
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 256))[:, None, :]  # (C, 1, 256)
    if options["do_rescale"]:
        values = _rescale_array(values, options["rescale_factor"])
    if options["do_normalize"]:
        values = _normalize_array(values, options["image_mean"], options["image_std"])
    return np.ascontiguousarray(values[:, 0, :])


# --- the processors ---------------------------------------------------------------------------------------------


class _LlavaImageProcessorBase:
    """Options, serialization and input checks shared by both processors."""

    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs: Any):
        kwargs = dict(kwargs)
        style = str(kwargs.get("image_processor_type") or "")
        defaults = _SIGLIP_DEFAULTS if style.startswith("Siglip") else _CLIP_DEFAULTS
        for key in _DROPPED_KEYS:
            kwargs.pop(key, None)
        default_to_square = kwargs.pop("default_to_square", False)
        options = {}
        for key in _OPTIONS:  # an explicit None means "the default", as in transformers
            value = kwargs.pop(key, None)
            options[key] = copy.deepcopy(defaults[key]) if value is None else value
        for key in _CALL_ONLY:
            kwargs.pop(key, None)
        self.__dict__.update(_standardize(options, default_to_square))
        self._extra = kwargs  # unknown keys: kept, readable as attributes, written back by to_dict
        for key, value in kwargs.items():
            setattr(self, key, value)

    # ---- options per call
    def _options(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        unknown = set(kwargs) - set(_OPTIONS) - set(_CALL_ONLY)
        if unknown:
            raise TypeError(f"{type(self).__name__}.preprocess got unexpected keyword arguments {sorted(unknown)}")
        call = {key: kwargs.pop(key) for key in _CALL_ONLY if key in kwargs}
        options = {key: getattr(self, key) for key in _OPTIONS}
        options.update({key: value for key, value in kwargs.items() if value is not None})
        options = _standardize(options, bool(call.get("default_to_square") or False))
        _validate(options)
        data_format = call.get("data_format")
        data_format = str(getattr(data_format, "value", data_format or "channels_first"))
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        call["data_format"] = data_format
        return options, call

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    # ---- serialization
    def to_dict(self) -> dict[str, Any]:
        out = {key: copy.deepcopy(getattr(self, key)) for key in _OPTIONS}
        for key in ("image_mean", "image_std"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        out.update(copy.deepcopy(self._extra))
        out["image_processor_type"] = "LlavaImageProcessor"  # both classes save as transformers does
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json_string(), encoding="utf-8")

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_pretrained needs a directory, {directory} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / IMAGE_PROCESSOR_NAME
        self.to_json_file(path)
        return [str(path)]

    @classmethod
    def from_dict(cls, config: dict[str, Any], **kwargs: Any):
        return_unused = kwargs.pop("return_unused_kwargs", False)
        merged = dict(config)
        used = {key: value for key, value in kwargs.items() if key in _OPTIONS}
        merged.update(used)
        processor = cls(**merged)
        unused = {key: value for key, value in kwargs.items() if key not in used}
        return (processor, unused) if return_unused else processor

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        return cls.from_dict(_read_json(Path(path)))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load from a directory (preprocessor_config.json, else processor_config.json["image_processor"]) or a
        JSON file; a hub id is resolved through the local Hugging Face cache only (never the network here)."""
        for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
                    "trust_remote_code", "use_fast", "proxies"):
            kwargs.pop(key, None)
        return cls.from_dict(_find_config(Path(os.fspath(pretrained_model_name_or_path))), **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LlavaImageProcessorBase) and self.to_dict() == other.to_dict()

    def fetch_images(self, sources: Any):
        """Load URLs / paths (nested lists allowed) as RGB PIL images; images pass through."""
        if isinstance(sources, (list, tuple)):
            return [self.fetch_images(item) for item in sources]
        if isinstance(sources, (str, Path, bytes)):
            return load_image(sources)
        return sources


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _find_config(location: Path) -> dict[str, Any]:
    if location.is_file():
        data = _read_json(location)
        return data.get("image_processor", data) if location.name == PROCESSOR_NAME else data
    directories = [location] if location.is_dir() else _hub_snapshots(str(location))
    for directory in directories:
        processor_file = directory / PROCESSOR_NAME
        if processor_file.is_file():
            data = _read_json(processor_file)
            if isinstance(data.get("image_processor"), dict):
                return data["image_processor"]
        if (directory / IMAGE_PROCESSOR_NAME).is_file():
            return _read_json(directory / IMAGE_PROCESSOR_NAME)
    raise OSError(
        f"no {IMAGE_PROCESSOR_NAME} (or {PROCESSOR_NAME} with an 'image_processor' entry) found for "
        f"'{location}': pass a directory that holds one, or the JSON file itself"
    )


def _hub_snapshots(repo_id: str) -> list[Path]:
    """Snapshot directories of a hub id in the local Hugging Face cache (newest first); no downloads."""
    if repo_id.count("/") != 1:
        return []
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = root / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return []
    return sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)


class LlavaImageProcessorPil(_LlavaImageProcessorBase):
    """PIL/numpy processor: transformers' ``LlavaImageProcessorPil`` step by step; returns numpy arrays."""

    def preprocess(self, images: Any, **kwargs: Any) -> BatchFeature:
        options, call = self._options(kwargs)
        outputs = [self._process_one(image, options, call) for image in _flatten(images)]
        return _finish(outputs, call, stack_numpy=True)

    def _process_one(self, image: Any, options: dict[str, Any], call: dict[str, Any]) -> np.ndarray:
        array = _prepare_array(image, options["do_convert_rgb"], call.get("input_data_format"))
        if options["do_pad"]:
            array = _pad_square_array(array, options["image_mean"])
        if options["do_resize"]:
            target = _output_size(array.shape[1], array.shape[2], options["size"])
            array = _pil_resize_array(array, target, options["resample"])
        if options["do_center_crop"]:
            array = _center_crop_array(array, options["crop_size"])
        if options["do_rescale"]:
            array = _rescale_array(array, options["rescale_factor"])
        if options["do_normalize"]:
            array = _normalize_array(array, options["image_mean"], options["image_std"])
        return np.ascontiguousarray(array)


class LlavaImageProcessor(_LlavaImageProcessorBase):
    """Torch processor: batched, crop-aware, on any device; same ``pixel_values`` as the PIL path.

    Per image it does only the work that survives the centre crop; 8-bit images are rescaled and normalized by
    a 256-entry table per channel (exactly transformers' float64-then-float32 arithmetic). On CPU the resize is
    the C++ resampler (``pil_resample.kernel_resize``, Pillow's integers for the cropped window only, the table
    applied in the same call) or, without it, Pillow's own, given a box that computes only the cropped window
    where such a box is exact (``pil_resample.pillow_box``); the values go straight into a preallocated batch
    tensor; the images run in a thread pool of ``torch.get_num_threads()`` workers, largest first, and a failing image is named by its
    index. On accelerators (``device=`` or CUDA tensors) the resize is ``pil_resample``'s exact banded matmul,
    batched over images of one shape.
    """

    def preprocess(self, images: Any, **kwargs: Any) -> BatchFeature:
        options, call = self._options(kwargs)
        flat = _flatten(images)
        device = call.get("device")
        if device is None and flat and isinstance(flat[0], torch.Tensor) and flat[0].device.type != "cpu":
            device = flat[0].device
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cpu" and not getattr(self, "_force_matmul", False):
            return self._cpu(flat, options, call)
        outputs = self._accelerated(flat, options, call, device)
        return _finish(outputs, call, stack_numpy=False)

    # ---- CPU: Pillow resizes only the window the crop keeps; values written straight into the batch tensor
    def _cpu(self, flat: list, options: dict[str, Any], call: dict[str, Any]) -> BatchFeature:
        for index, image in enumerate(flat):
            if isinstance(image, Image.Image):
                # decode lazily opened files here, once: threads may share an image object, and Pillow's decoders
                # hold the GIL anyway
                try:
                    image.load()
                except Exception as error:
                    raise _naming_image(error, index) from error
        fmt = call.get("input_data_format")
        shapes = [_fast_shape(image, options, fmt) for image in flat]  # None: the image takes the general path
        batch = None
        if (flat and call.get("return_tensors") in ("pt", "np") and call["data_format"] == "channels_first"
                and shapes[0] is not None and all(shape == shapes[0] for shape in shapes)):
            batch = torch.empty((len(flat), *shapes[0]), dtype=torch.float32)  # (N, C, H, W)

        alone = len(flat) == 1  # one image: its rows split across the torch threads instead

        def work(index: int) -> torch.Tensor:
            if shapes[index] is None:
                return self._cpu_one(flat[index], options, call)
            slot = batch[index] if batch is not None else torch.empty(shapes[index], dtype=torch.float32)
            _fast_one(flat[index], options, slot.numpy(), fmt, parallel=alone)
            return slot

        # largest first, so that the last image to finish is a small one (threads end together)
        order = sorted(range(len(flat)), key=lambda i: -_pixel_count(flat[i]))
        outputs = _run_threaded(work, order)
        if batch is not None:
            return BatchFeature({"pixel_values": batch.numpy() if call["return_tensors"] == "np" else batch})
        return _finish(outputs, call, stack_numpy=False)

    # ---- CPU, general path: arrays, tensors, odd value ranges, no resize
    def _cpu_one(self, image: Any, options: dict[str, Any], call: dict[str, Any]) -> torch.Tensor:
        pil = _as_rgb_pil(image, options) if options["do_resize"] else None
        if pil is None:
            array = _prepare_array(image, options["do_convert_rgb"], call.get("input_data_format"))
            if options["do_pad"]:
                array = _pad_square_array(array, options["image_mean"])
            if options["do_resize"]:
                target = _output_size(array.shape[1], array.shape[2], options["size"])
                array = _pil_resize_array(array, target, options["resample"])
        else:
            if options["do_pad"]:
                pil = _pad_square_pil(pil, options["image_mean"])
            height, width = _output_size(pil.height, pil.width, options["size"])
            array = np.asarray(pil.resize((width, height), resample=options["resample"])).transpose(2, 0, 1)
        return _finish_values(_tensor(array), options)

    # ---- accelerators: exact banded matmuls, one batch per input shape
    def _accelerated(self, flat: list, options: dict[str, Any], call: dict[str, Any], device: torch.device):
        prepared = []
        for image in flat:
            if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and not (
                options["do_convert_rgb"] and _channel_count(image.shape, call.get("input_data_format")) in (1, 4)
            ):
                first = _channels_first(tuple(image.shape), call.get("input_data_format"))
                tensor = image if first else image.permute(2, 0, 1)
            else:
                tensor = _tensor(_prepare_array(image, options["do_convert_rgb"], call.get("input_data_format")))
            prepared.append(tensor.to(device, non_blocking=True))
        outputs: list = [None] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for index, tensor in enumerate(prepared):
            groups.setdefault((tuple(tensor.shape), tensor.dtype), []).append(index)
        for (_, dtype), indices in groups.items():
            batch = torch.stack([prepared[i] for i in indices])  # (N, C, H, W)
            for i, result in zip(indices, self._accelerated_batch(batch, options)):
                outputs[i] = result
        return outputs

    def _accelerated_batch(self, batch: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
        if options["do_pad"]:
            batch = _pad_square_tensor(batch, options["image_mean"])
        integral = batch.dtype == torch.uint8
        if options["do_resize"] and not integral:  # non-8-bit data follows the PIL path's value rules
            return torch.stack([self._cpu_like(image, options) for image in batch.cpu()]).to(batch.device)
        height, width = batch.shape[-2:]
        if options["do_resize"]:
            height, width = _output_size(height, width, options["size"])
        crop = options["crop_size"] if options["do_center_crop"] else None
        (sy, ny, dy), (sx, nx, dx) = (
            (_crop_window(height, crop["height"]), _crop_window(width, crop["width"])) if crop
            else ((0, height, 0), (0, width, 0))
        )
        if options["do_resize"]:
            pixels = pil_resample.resize(batch, (height, width), options["resample"], region=(sy, sx, ny, nx))
        else:
            pixels = batch[..., sy : sy + ny, sx : sx + nx]
        if crop and (dy or dx):
            canvas = torch.zeros(*pixels.shape[:-2], crop["height"], crop["width"], dtype=pixels.dtype,
                                 device=pixels.device)
            canvas[..., dy : dy + ny, dx : dx + nx] = pixels
            pixels = canvas
        if integral and pixels.dtype != torch.uint8:
            pixels = pixels.to(torch.uint8)  # exact: the resize returns whole numbers in [0, 255]
        return _finish_values(pixels, options)

    def _cpu_like(self, image: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
        array = image.numpy()
        array = _pil_resize_array(array, _output_size(array.shape[1], array.shape[2], options["size"]),
                                  options["resample"])
        return _finish_values(_tensor(array), dict(options, do_resize=False))


def _channel_count(shape: tuple, input_data_format: str | None) -> int:
    return shape[0] if _channels_first(shape, input_data_format) else shape[-1]


def _fast_shape(image: Any, options: dict[str, Any], input_data_format: str | None) -> tuple[int, int, int] | None:
    """Output shape (3, H, W) of an image the fast CPU path takes (a PIL image, or a 3-channel uint8 array or CPU
    tensor, to resize; 8-bit values mapped to floats), without touching its pixels; None for every other input."""
    if not (options["do_resize"] and (options["do_rescale"] or options["do_normalize"])):
        return None
    if isinstance(image, Image.Image):
        if not (options["do_convert_rgb"] or (image.mode == "RGB" and image.info.get("transparency") is None)):
            return None
        height, width = image.height, image.width
    else:
        layout = _uint8_rgb_layout(image, input_data_format)
        if layout is None:
            return None
        height, width = image.shape[1:] if layout == "chw" else image.shape[:2]
    if options["do_center_crop"]:
        return 3, options["crop_size"]["height"], options["crop_size"]["width"]
    if options["do_pad"]:
        height = width = max(height, width)
    return (3, *_output_size(height, width, options["size"]))


def _uint8_rgb_layout(image: Any, input_data_format: str | None) -> str | None:
    """"chw" / "hwc" for a 3-D uint8 numpy array or CPU tensor with 3 channels (what Pillow can take as RGB)."""
    if isinstance(image, torch.Tensor):
        if image.device.type != "cpu" or image.dtype != torch.uint8:
            return None
    elif not (isinstance(image, np.ndarray) and image.dtype == np.uint8):
        return None
    if image.ndim != 3:
        return None
    try:
        first = _channels_first(tuple(image.shape), input_data_format)
    except ValueError:
        return None  # the general path raises the error
    if (image.shape[0] if first else image.shape[-1]) != 3:
        return None
    return "chw" if first else "hwc"


def _array_to_pil(image: Any, layout: str) -> Image.Image:
    """A 3-channel uint8 array as an RGB PIL image: what transformers' to_pil_image hands to Pillow."""
    array = image.detach().numpy() if isinstance(image, torch.Tensor) else image
    if layout == "hwc":
        return Image.fromarray(np.ascontiguousarray(array))
    height, width = array.shape[1:]
    # merging three planes avoids a slow strided CHW -> HWC transpose (~15x faster on a 2 Mpx image)
    planes = [Image.frombuffer("L", (width, height), np.ascontiguousarray(plane), "raw", "L", 0, 1) for plane in array]
    return Image.merge("RGB", planes)


def _fast_one(image: Any, options: dict[str, Any], out: np.ndarray, input_data_format: str | None = None,
              parallel: bool = False) -> None:
    """Convert, pad, resize (only the kept window), crop and map values of one image into out (3, H, W).

    The resize is the C++ kernel (``pil_resample.kernel_resize``: Pillow's integers, computed for the window
    only, values mapped by the table in the same pass) where it is available and handles the filter; otherwise
    Pillow's own, given an exact box (``_resize_window``). ``parallel``: the kernel splits this image's rows
    across torch's threads (an image alone in its batch)."""
    kernel = pil_resample.kernel_available(options["resample"])
    layout = None if isinstance(image, Image.Image) else _uint8_rgb_layout(image, input_data_format)
    if kernel and layout is not None and not options["do_pad"]:
        _kernel_one(_array_planes(image, layout), image.shape[1:] if layout == "chw" else image.shape[:2],
                    options, out, parallel)
        return
    pil = _as_rgb_pil(image, options) if layout is None else _array_to_pil(image, layout)
    if options["do_pad"]:
        pil = _pad_square_pil(pil, options["image_mean"])
    if kernel:
        source, channels, keep = pil_resample.pil_source(pil)
        _kernel_one([(source, 0)], (pil.height, pil.width), options, out, parallel)
        del keep
        return
    height, width = _output_size(pil.height, pil.width, options["size"])
    (sy, ny, dy), (sx, nx, dx) = _windows(height, width, options)
    pixels = _resize_window(pil, (height, width), options["resample"], (sy, ny), (sx, nx))  # (ny, nx, 3) uint8
    _write_values(pixels, out, dy, dx, options)


def _windows(height: int, width: int, options: dict[str, Any]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, count, offset) per axis: the part of the resized image the centre crop keeps and where it lands."""
    if options["do_center_crop"]:
        crop = options["crop_size"]
        return _crop_window(height, crop["height"]), _crop_window(width, crop["width"])
    return (0, height, 0), (0, width, 0)


def _array_planes(image: Any, layout: str) -> list[tuple[torch.Tensor, int]]:
    """A 3-channel uint8 array/tensor as kernel sources: [(HWC view, first channel 0)] or one (H, W, 1) view per
    plane of a CHW one [(plane, channel c)], without copying where the pixels are already contiguous."""
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(
        image if image.flags.writeable else np.array(image))
    if layout == "hwc":
        if tensor.stride(2) != 1 or tensor.stride(1) != 3:
            tensor = tensor.contiguous()
        return [(tensor, 0)]
    planes = []
    for channel in range(3):
        plane = tensor[channel]
        if plane.stride(1) != 1:
            plane = plane.contiguous()
        planes.append((plane.unsqueeze(-1), channel))
    return planes


def _kernel_one(sources: list[tuple[torch.Tensor, int]], shape: tuple[int, int], options: dict[str, Any],
                out: np.ndarray, parallel: bool = False) -> None:
    """Resize (the kept window only) and map the values of sources [(H, W, P) uint8, first channel] into out."""
    height, width = _output_size(int(shape[0]), int(shape[1]), options["size"])
    (sy, ny, dy), (sx, nx, dx) = _windows(height, width, options)
    table = _value_table(options, 3)  # (3, 256)
    if (ny, nx) != out.shape[1:]:
        out[...] = table[:, :1, None]  # a crop larger than the image: transformers' zero padding, mapped
    target = torch.from_numpy(out)
    for source, channel in sources:
        channels = min(3 - channel, int(source.shape[2]), 3)
        pil_resample.kernel_resize(source, channels, (height, width), options["resample"], (sy, ny), (sx, nx),
                                   out=target[channel : channel + channels],
                                   table=_table_tensor(table, channel, channels), dy=dy, dx=dx,
                                   parallel=parallel)


def _table_tensor(table: np.ndarray, channel: int, channels: int) -> torch.Tensor:
    if channel == 0 and channels == table.shape[0]:
        return torch.from_numpy(table)
    return torch.from_numpy(np.ascontiguousarray(table[channel : channel + channels]))


def _resize_window(image: Image.Image, size: tuple[int, int], resample: int, rows: tuple[int, int],
                   cols: tuple[int, int]) -> np.ndarray:
    """Rows/cols (start, count) of ``image.resize(size)`` as an (rows, cols, 3) uint8 array, equal to cropping the
    full resize; Pillow computes only the part the window needs when a box reproduces it exactly."""
    height, width = size
    in_w, in_h = image.size
    box = [0.0, 0.0, float(in_w), float(in_h)]
    out_size = [width, height]
    offset = [cols[0], rows[0]]  # (x, y) of the window in what Pillow returns
    for axis, (in_size, out_axis, (start, count)) in enumerate(((in_w, width, cols), (in_h, height, rows))):
        if in_size == out_axis or count >= out_axis:
            continue  # an axis Pillow leaves alone, or one the crop keeps whole
        found = pil_resample.pillow_box(in_size, out_axis, int(resample), start, count)
        if found is not None:
            box[axis], box[axis + 2], first, out_size[axis] = found
            offset[axis] = start - first
    # Pillow picks the pass order from the output size, and the uint8 rounding between the passes must fall at the
    # same place as in the full resize: otherwise resize it all.
    vertical_first = pil_resample._vertical_first(in_h, in_w, height, width)
    if vertical_first != pil_resample._vertical_first(in_h, in_w, out_size[1], out_size[0]) or (
            vertical_first and pil_resample._PILLOW < (13, 0)):
        box, out_size, offset = [0.0, 0.0, float(in_w), float(in_h)], [width, height], [cols[0], rows[0]]
    if (in_w, in_h) == tuple(out_size) and box == [0.0, 0.0, float(in_w), float(in_h)]:
        resized = image  # Pillow would return a copy
    else:
        resized = image.resize(tuple(out_size), resample=resample, box=tuple(box))
    array = np.asarray(resized)  # (h, w, 3), a fresh copy of Pillow's buffer
    return array[offset[1] : offset[1] + rows[1], offset[0] : offset[0] + cols[1]]


def _pixel_count(image: Any) -> int:
    if isinstance(image, Image.Image):
        return image.width * image.height
    shape = getattr(image, "shape", None)
    return int(np.prod(shape)) if shape is not None else 0


def _as_rgb_pil(image: Any, options: dict[str, Any]) -> Image.Image | None:
    """The input as an RGB PIL image when Pillow can take it as is (the fast CPU path), else None."""
    if isinstance(image, Image.Image):
        if image.mode == "RGB" and image.info.get("transparency") is None:
            return image  # convert("RGB") would only copy it
        if options["do_convert_rgb"]:
            return to_rgb(image)
    return None


def _pad_square_pil(image: Image.Image, image_mean: Any) -> Image.Image:
    side, top, left = _square_offsets(image.height, image.width)
    if image.height == image.width:
        return image
    color = _background(image_mean)
    canvas = Image.new("RGB", (side, side), color if isinstance(color, tuple) else (color, 0, 0))
    canvas.paste(image, (left, top))
    return canvas


def _pad_square_tensor(batch: torch.Tensor, image_mean: Any) -> torch.Tensor:
    height, width = batch.shape[-2:]
    if height == width:
        return batch
    color = _background(image_mean)
    color = (color,) if isinstance(color, int) else color
    if len(color) != batch.shape[-3]:
        raise ValueError(f"the pad colour has {len(color)} values but the image has {batch.shape[-3]} channels")
    side, top, left = _square_offsets(height, width)
    fill = torch.tensor(np.asarray(color, dtype=np.float64), device=batch.device).to(batch.dtype)
    out = fill.view(1, -1, 1, 1).expand(batch.shape[0], -1, side, side).clone()  # (N, C, side, side)
    out[..., top : top + height, left : left + width] = batch
    return out


def _finish_values(pixels: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """Centre crop (CPU path) is done by the caller for the accelerator path; here: crop if still needed, then
    rescale + normalize, by table for 8-bit values."""
    if options.get("do_center_crop") and tuple(pixels.shape[-2:]) != (
        options["crop_size"]["height"], options["crop_size"]["width"]
    ):
        pixels = _tensor(_center_crop_array(pixels.cpu().numpy(), options["crop_size"])).to(pixels.device)
    if (pixels.dtype == torch.uint8 and pixels.device.type == "cpu" and pixels.ndim == 3 and pixels.shape[0] == 3
            and (options["do_rescale"] or options["do_normalize"])):
        out = torch.empty(pixels.shape, dtype=torch.float32)
        _write_values(pixels.numpy().transpose(1, 2, 0), out.numpy(), 0, 0, options)
        return out
    if pixels.dtype == torch.uint8:
        table = _value_table(options, pixels.shape[-3])
        if table is None:
            return pixels
        table = torch.from_numpy(table).to(pixels.device)  # (C, 256)
        # gather: per channel, value v -> table[c, v]; offsets make it one flat lookup
        offsets = torch.arange(table.shape[0], device=pixels.device).view(-1, 1, 1) * 256
        return table.view(-1)[pixels.long() + offsets]
    array = pixels.cpu().numpy()
    if options["do_rescale"]:
        array = _rescale_array(array, options["rescale_factor"])
    if options["do_normalize"]:
        array = _normalize_array(array, options["image_mean"], options["image_std"])
    return _tensor(array).to(pixels.device)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch without warnings: read-only arrays (views of PIL images) are copied."""
    if not array.flags.writeable:
        return torch.from_numpy(np.array(array, order="C"))
    return torch.from_numpy(np.ascontiguousarray(array))


def _run_threaded(function, order: list[int]) -> list:
    """function(index) for every index, taken in the given order, results by index. Pillow and numpy release the
    GIL, so the images of a batch run in parallel on the cores torch may use (``torch.get_num_threads()``). A
    failure names the image: "image 3 of the batch: ...", same exception type where it can be rebuilt."""
    results: list = [None] * len(order)

    def run(index: int) -> None:
        try:
            results[index] = function(index)
        except Exception as error:
            raise _naming_image(error, index) from error

    workers = min(len(order), max(1, torch.get_num_threads()))
    if workers <= 1:
        for index in order:
            run(index)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(run, index) for index in order]:
                future.result()
    return results


def _naming_image(error: Exception, index: int) -> Exception:
    message = f"image {index} of the batch: {error}"
    try:
        return type(error)(message)
    except Exception:  # an exception type with another constructor
        return ValueError(message)


def _finish(outputs: list, call: dict[str, Any], stack_numpy: bool) -> BatchFeature:
    if call["data_format"] == "channels_last":
        outputs = [o.transpose(1, 2, 0) if isinstance(o, np.ndarray) else o.permute(1, 2, 0) for o in outputs]
    return_tensors = call.get("return_tensors")
    return_tensors = getattr(return_tensors, "value", return_tensors)
    if return_tensors is None:
        return BatchFeature({"pixel_values": outputs})
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot stack images of different shapes {sorted(shapes)} into one tensor; use do_center_crop, "
            "a fixed size, or return_tensors=None"
        )
    if return_tensors == "np":
        arrays = [o if isinstance(o, np.ndarray) else o.cpu().numpy() for o in outputs]
        return BatchFeature({"pixel_values": np.stack(arrays) if arrays else np.zeros((0,))})
    tensors = [_tensor(o) if isinstance(o, np.ndarray) else o for o in outputs]
    return BatchFeature({"pixel_values": torch.stack(tensors) if tensors else torch.zeros((0,))})
