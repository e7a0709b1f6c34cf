"""Read checkpoints one tensor at a time: safetensors, torch .pth/.bin, a set of shards.

    reader = open_tensor_file("model-00001-of-00002.safetensors")   # or pytorch_model.bin, *.pth
    w = reader.read("model.layers.0.self_attn.q_proj.weight")       # fresh memory, file not mapped

Readers parse the header (safetensors JSON or torch's pickle) without touching the data and read each
tensor with plain file reads: a memory map would leave every page it touched in the process's resident
memory until the end.
"""

from __future__ import annotations

import collections
import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_ner.weights.tensor_io import (
    SAFETENSORS_DTYPES,
    STORAGE_DTYPES,
    TensorFileError,
    TensorInfo,
    contiguous_stride,
    damaged,
)


def _read_exact(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    """nbytes from path at offset into a new uint8 tensor (no memory map)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        if nbytes and f.readinto(memoryview(buf.numpy())) != nbytes:
            raise damaged(path, f"ends before the {nbytes} bytes at offset {offset}")
    return buf


class SafetensorsFile:
    """Lazy reader of one .safetensors file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        file_size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise damaged(self.path, f"{file_size} bytes, shorter than a safetensors header")
            (size,) = struct.unpack("<Q", head)
            if 8 + size > file_size:
                raise damaged(self.path, f"{file_size} bytes, but its header alone claims {8 + size}")
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise damaged(self.path, "its header is not valid JSON") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + size
        self._entries = {}
        for name, entry in header.items():
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise TensorFileError(f"{self.path}: {name} has unsupported dtype {entry['dtype']}")
            self._entries[name] = (SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"])
        expected = self._start + max((end for *_, (_, end) in self._entries.values()), default=0)
        if expected != file_size:
            raise damaged(self.path, f"{file_size} bytes, but its header describes {expected}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        dtype, shape, _ = self._entries[name]
        return TensorInfo(dtype, shape)

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self._entries[name]
        return _read_exact(self.path, self._start + begin, end - begin).view(dtype).reshape(shape)


@dataclass
class _StorageRef:
    key: str
    dtype: torch.dtype


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *args) -> _TensorRef:
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *args) -> _TensorRef:
    return _TensorRef(_StorageRef(storage.key, dtype), storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *args) -> _TensorRef:
    return data


class _LazyUnpickler(pickle.Unpickler):
    """Unpickles a torch.save'd dict into _TensorRefs, allowing only what checkpoints use."""

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_tensor_v3
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return name
        if module == "torch" and name in ("float16", "float32", "bfloat16", "float64"):
            return getattr(torch, name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a weights file")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid
        return _StorageRef(str(key), STORAGE_DTYPES[storage_type])


class TorchZipFile:
    """Lazy reader of a torch.save'd state dict (pytorch_model.bin, consolidated.NN.pth, adapter_model.bin)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._open()
        except (zipfile.BadZipFile, EOFError, KeyError, struct.error) as err:
            raise damaged(self.path, f"{type(err).__name__}: {err}") from None

    def _open(self) -> None:
        if not zipfile.is_zipfile(self.path):
            with open(self.path, "rb") as f:
                magic = f.read(4)
            if magic[:2] == b"\x80\x02":  # torch < 1.6 wrote a bare pickle stream
                raise TensorFileError(
                    f"{self.path}: saved by torch < 1.6, which this reader does not stream; "
                    "re-save it with torch.save(torch.load(f), f) on a recent torch"
                )
            detail = "a zip file cut short" if magic == b"PK\x03\x04" else f"starts with {magic!r}, not a torch zip"
            raise damaged(self.path, detail)
        file_size = self.path.stat().st_size
        with zipfile.ZipFile(self.path) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise TensorFileError(f"{self.path}: expected one data.pkl inside, found {len(pickles)}")
            prefix = pickles[0][: -len("data.pkl")]
            try:
                state = _LazyUnpickler(zf.open(pickles[0])).load()
            except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as err:
                raise TensorFileError(f"{self.path}: not a plain state dict ({err})") from None
            if not isinstance(state, dict):
                raise TensorFileError(f"{self.path}: holds a {type(state).__name__}, not a state dict")
            self._refs = {k: v for k, v in state.items() if isinstance(v, _TensorRef)}
            self._records = {}
            with open(self.path, "rb") as raw:
                for ref in self._refs.values():
                    key = ref.storage.key
                    if key in self._records:
                        continue
                    info = zf.getinfo(f"{prefix}data/{key}")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise TensorFileError(f"{self.path}: compressed record data/{key}; re-save with torch.save")
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    start = info.header_offset + 30 + name_len + extra_len
                    if start + info.file_size > file_size:
                        raise damaged(self.path, f"record data/{key} ends past the end of the file")
                    self._records[key] = (start, info.file_size)

    def keys(self) -> list[str]:
        return list(self._refs)

    def info(self, name: str) -> TensorInfo:
        ref = self._refs[name]
        return TensorInfo(ref.storage.dtype, ref.shape)

    def read(self, name: str) -> torch.Tensor:
        ref = self._refs[name]
        dtype, item = ref.storage.dtype, ref.storage.dtype.itemsize
        start, size = self._records[ref.storage.key]
        numel = math.prod(ref.shape)
        if ref.stride == contiguous_stride(ref.shape) or numel <= 1:
            return _read_exact(self.path, start + ref.offset * item, numel * item).view(dtype).reshape(ref.shape)
        storage = _read_exact(self.path, start, size).view(dtype)
        return storage.as_strided(ref.shape, ref.stride, ref.offset).clone()


def open_tensor_file(path: str | Path) -> SafetensorsFile | TorchZipFile:
    path = Path(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return TorchZipFile(path)


class TensorSource:
    """Several files seen as one name -> tensor mapping (a sharded checkpoint)."""

    def __init__(self, files: list[str | Path], ignore_suffixes: tuple[str, ...] = ()) -> None:
        self.files = [Path(f) for f in files]
        self._where = {}
        for reader in map(open_tensor_file, self.files):
            for name in reader.keys():
                if not name.endswith(ignore_suffixes):
                    self._where[name] = reader

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].info(name)

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)
