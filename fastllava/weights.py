"""Checkpoint files: find them, read safetensors without copies, map key layouts, write them back.

``resolve_checkpoint`` turns a directory or a hub id into a local directory (the huggingface_hub cache first,
a download only when allowed). ``CheckpointReader`` opens a single ``model.safetensors`` or a sharded set with
its index, validates every header against the file size (a truncated download is an error naming the file),
and hands out tensors that are zero-copy views of a private memory map, so loading costs no second copy of the
weights. ``hub_to_internal`` maps both key layouts in use (the hub's ``language_model.model.*`` /
``vision_tower.vision_model.*`` and newer transformers' ``model.language_model.*`` / ``model.vision_tower.*``)
onto fastllava's module names; ``internal_to_hub`` writes the hub layout, which every transformers version loads.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HEADER_LIMIT = 100 * 1024 * 1024  # a header larger than this is corrupt, not a real checkpoint


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------
# Locating a checkpoint


def resolve_checkpoint(
    path_or_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local directory holding the checkpoint: the path itself, or the hub snapshot (cache first)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/")) or name.count("/") != 1:
        raise CheckpointError(f"{name!r} is not a checkpoint directory nor a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.md"]
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:  # cache first: no network round trip when the snapshot is already there
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                      local_files_only=True, token=token))
    except Exception as cache_miss:  # noqa: BLE001 - any cache miss falls through to the download
        if local_files_only:
            raise CheckpointError(
                f"{name!r} is not in the Hugging Face cache and downloads are disabled (offline)"
            ) from cache_miss
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                      token=token))
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"could not download {name!r} from the Hugging Face hub: {error}") from error


# ----------------------------------------------------------------------------------------------------------
# Reading safetensors


class SafetensorsFile:
    """One .safetensors file: the header, validated, and zero-copy tensor views into a private mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path} is truncated or empty ({size} bytes): not a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _HEADER_LIMIT):
                raise CheckpointError(f"{self.path} is truncated or corrupt: header length {header_len}, file {size} bytes")
            try:
                header = json.loads(handle.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CheckpointError(f"{self.path} has a corrupt safetensors header: {error}") from error
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            if end > data_len:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {key!r} ends at byte {self.data_start + end}, file has {size}"
                )
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        self._map: mmap.mmap | None = None
        self._file = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self.entries[key]["dtype"]]

    def tensor(self, key: str) -> torch.Tensor:
        """A view of the tensor in a copy-on-write mapping: no bytes are read until used, writes stay private."""
        entry = self.entries[key]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            self._file = open(self.path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        offset = self.data_start + begin
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset % itemsize:  # unaligned data cannot be viewed in place; copy it out
            raw = bytearray(self._map[offset:self.data_start + end])
            return torch.frombuffer(raw, dtype=dtype).reshape(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // itemsize, offset=offset).reshape(shape)

    def release(self, key: str) -> None:
        """Tell the kernel we are done with a tensor's pages (after it was converted into a copy)."""
        if self._map is None:
            return
        begin, end = self.entries[key]["data_offsets"]
        page = mmap.PAGESIZE
        # only the pages wholly inside the tensor: a page it shares with a neighbour may hold that neighbour's
        # rewritten bytes (the map is copy-on-write and int8 codes are rearranged in place, quantization.py
        # use_pair_layout), which dropping the page would revert to the file's
        start = -(-(self.data_start + begin) // page) * page
        stop = (self.data_start + end) // page * page
        if stop <= start:
            return
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (AttributeError, OSError, ValueError):  # madvise is advisory: not every platform has it
            pass


class CheckpointReader:
    """All tensors of a checkpoint directory, single file or sharded, by their on-disk key."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.files: dict[str, SafetensorsFile] = {}
        self.key_to_file: dict[str, str] = {}
        self._torch_state: dict[str, torch.Tensor] | None = None
        index = self.directory / SAFE_WEIGHTS_INDEX_NAME
        single = self.directory / SAFE_WEIGHTS_NAME
        if index.is_file():
            self._open_index(index)
        elif single.is_file():
            self._open_file(SAFE_WEIGHTS_NAME)
        elif (self.directory / PT_WEIGHTS_NAME).is_file() or (self.directory / PT_WEIGHTS_INDEX_NAME).is_file():
            self._open_pickles()
        else:
            raise CheckpointError(
                f"no weights in {self.directory}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}"
            )

    def _open_file(self, name: str) -> SafetensorsFile:
        if name not in self.files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"shard {name} listed in the index is missing from {self.directory}")
            self.files[name] = SafetensorsFile(path)
            for key in self.files[name].keys():
                self.key_to_file.setdefault(key, name)
        return self.files[name]

    def _open_index(self, index: Path) -> None:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index: {error}") from error
        for name in sorted(set(weight_map.values())):
            self._open_file(name)
        for key, name in weight_map.items():
            if key not in self.files[name].entries:
                raise CheckpointError(f"tensor {key!r} is listed in the index for {name} but that shard lacks it")

    def _open_pickles(self) -> None:
        # Only tensors, never code: weights_only refuses anything a pickle could execute.
        index = self.directory / PT_WEIGHTS_INDEX_NAME
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [PT_WEIGHTS_NAME]
        self._torch_state = {}
        for name in names:
            self._torch_state.update(torch.load(self.directory / name, map_location="cpu", weights_only=True, mmap=True))
        self.key_to_file = {key: PT_WEIGHTS_NAME for key in self._torch_state}

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._torch_state is not None:
            return tuple(self._torch_state[key].shape)
        return self.files[self.key_to_file[key]].shape(key)

    def tensor(self, key: str) -> torch.Tensor:
        if self._torch_state is not None:
            return self._torch_state[key]
        return self.files[self.key_to_file[key]].tensor(key)

    def release(self, key: str) -> None:
        if self._torch_state is None:
            self.files[self.key_to_file[key]].release(key)

    def dtypes(self) -> set[torch.dtype]:
        if self._torch_state is not None:
            return {t.dtype for t in self._torch_state.values()}
        return {f.dtype(k) for f in self.files.values() for k in f.keys()}


# ----------------------------------------------------------------------------------------------------------
# Key layouts

# (on-disk prefix, internal prefix), most specific first.
_HUB_TO_INTERNAL = [
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]
_INTERNAL_TO_HUB = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]
# Buffers that old checkpoints saved but that are recomputed, never learned.
IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def _replace_prefix(key: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def hub_to_internal(key: str) -> str:
    """Map a checkpoint key of either layout onto fastllava's parameter name."""
    return _replace_prefix(key, _HUB_TO_INTERNAL)


def internal_to_hub(key: str) -> str:
    """Map a fastllava parameter name onto the hub layout that transformers 4.x and 5.x both load."""
    return _replace_prefix(key, _INTERNAL_TO_HUB)


# ----------------------------------------------------------------------------------------------------------
# Writing


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as model.safetensors, or as shards plus an index when larger than max_shard_size."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in list(directory.glob("model*.safetensors")) + [directory / SAFE_WEIGHTS_INDEX_NAME]:
        stale.unlink(missing_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        shard_bytes += nbytes
    metadata = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        path = directory / SAFE_WEIGHTS_NAME
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    paths, weight_map, total = [], {}, 0
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        paths.append(directory / name)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths


def iter_hub_state(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in state.items():
        yield internal_to_hub(key), tensor
