"""Read and write checkpoints one tensor at a time, so memory never grows with model depth.

    reader = open_tensor_file("model-00001-of-00002.safetensors")   # or pytorch_model.bin, *.pth
    w = reader.read("model.layers.0.self_attn.q_proj.weight")       # fresh memory, file not mapped
    with SafetensorsShards(out_dir, plan) as out: out.write(name, tensor)

Readers parse the header (safetensors JSON or torch's pickle) without touching the data and
read each tensor with plain file reads: a memory map would leave every page it touched in the
process's resident memory until the end. Writers lay out the header first (shapes are known
before any data), then append each tensor as it is computed: `SafetensorsShards` writes
Hugging Face shards plus their index, `TorchZipWriter` writes what `torch.save` writes (Meta's
consolidated.NN.pth) without holding the dict in memory.
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

from llama_ner.io_utils import UserError, peak_rss_mb

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
STORAGE_CLASSES = {dtype: getattr(torch, name) for name, dtype in STORAGE_DTYPES.items() if name != "UntypedStorage"}


class TensorFileError(UserError):
    """A checkpoint file this module cannot read: the one-line error the user sees (exit code 2)."""


def damaged(path: Path, detail: str) -> TensorFileError:
    """The error for a cut or corrupted weight file: almost always an incomplete download."""
    return TensorFileError(f"{path}: damaged or incomplete ({detail}); download it again")


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for dim in reversed(shape):
        stride.append(acc)
        acc *= dim
    return tuple(reversed(stride))


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


def parse_size(text: str, flag: str = "--max_shard_size") -> int:
    """'2GB' / '500MB' / '1.5GiB' / bytes -> bytes; anything else is a one-line error naming `flag`."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    number = upper.rstrip("KMGIB")
    unit = upper[len(number) :]
    try:
        size = int(float(number) * units[unit])
    except (KeyError, ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise UserError(f"{flag} {text!r} is not a size: write e.g. 2GB, 500MB or 1.5GiB")
    return size


def plan_shards(entries: list[tuple[str, TensorInfo]], max_shard_bytes: int) -> list[list[tuple[str, TensorInfo]]]:
    """Split entries, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, info in entries:
        if current and size + info.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, info))
        size += info.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


class SafetensorsWriter:
    """One .safetensors file whose header is written first; tensors appended in the planned order."""

    def __init__(self, path: str | Path, entries: list[tuple[str, TensorInfo]], metadata: dict | None = None) -> None:
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = metadata
        for name, info in entries:
            header[name] = {
                "dtype": SAFETENSORS_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._expected = list(entries)
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want = self._expected[self._next]
        if name != want_name or tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise ValueError(f"writing {name} {tensor.dtype} {tuple(tensor.shape)}, planned {want_name} {want}")
        self._file.write(_tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._expected):
            raise ValueError(f"{self._file.name}: {len(self._expected) - self._next} planned tensors never written")


class SafetensorsShards:
    """Hugging Face sharded safetensors (model-0000i-of-0000n.safetensors + index), written in order."""

    def __init__(self, out_dir: str | Path, shards: list[list[tuple[str, TensorInfo]]]) -> None:
        self.out_dir = Path(out_dir)
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._shard_of = {name: i for i, shard in enumerate(shards) for name, _ in shard}
        self._current: tuple[int, SafetensorsWriter] | None = None

    def __enter__(self) -> SafetensorsShards:
        return self

    def __exit__(self, *exc) -> None:
        current, self._current = self._current, None
        if current is not None and exc[0] is not None:
            current[1]._file.close()  # failing anyway: keep the original error
        elif current is not None:
            current[1].close()
        if exc[0] is None:
            weight_map = {name: self.files[i] for name, i in self._shard_of.items()}
            total = sum(info.nbytes for shard in self._shards for _, info in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i = self._shard_of[name]
        if self._current is None or self._current[0] != i:
            if self._current is not None:
                self._current[1].close()
            writer = SafetensorsWriter(self.out_dir / self.files[i], self._shards[i], {"format": "pt"})
            self._current = (i, writer)
        self._current[1].write(name, tensor)


class _StorageStub:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor whose storage is written separately."""

    def __init__(self, storage: _StorageStub, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        args = (self.storage, 0, tuple(self.shape), contiguous_stride(self.shape), False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageStub):
            return ("storage", STORAGE_CLASSES[obj.dtype], obj.key, "cpu", obj.numel)
        return None


class TorchZipWriter:
    """A file `torch.load` reads as {name: tensor}, written one tensor at a time (as torch.save lays it out)."""

    def __init__(self, path: str | Path, entries: list[tuple[str, TensorInfo]]) -> None:
        self._file = open(path, "wb")
        self._zip = torch._C.PyTorchFileWriter(self._file)
        self._keys, stubs = {}, {}
        for i, (name, info) in enumerate(entries):
            self._keys[name] = (str(i), info)
            stubs[name] = _TensorStub(_StorageStub(str(i), info.dtype, math.prod(info.shape)), info.shape)
        buf = _pickle_bytes(stubs)
        self._zip.write_record("data.pkl", buf, len(buf))
        for record, value in ((".format_version", "1"), (".storage_alignment", "64"), ("byteorder", "little")):
            self._zip.write_record(record, value, len(value))
        self._written = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        key, info = self._keys[name]
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape or name in self._written:
            raise ValueError(f"writing {name} {tensor.dtype} {tuple(tensor.shape)}, planned {info}")
        tensor = tensor.contiguous()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view: write only its own bytes
        self._zip.write_record(f"data/{key}", tensor.untyped_storage(), tensor.nbytes)
        self._written.add(name)

    def __enter__(self) -> TorchZipWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
            return
        self._zip.write_end_of_file()  # failing anyway; a writer left open would abort at teardown
        del self._zip
        self._file.close()

    def close(self) -> None:
        missing = set(self._keys) - self._written
        if missing:
            raise ValueError(f"{self._file.name}: {len(missing)} planned tensors never written")
        self._zip.write_end_of_file()
        del self._zip
        self._file.close()


def _pickle_bytes(obj) -> bytes:
    import io

    out = io.BytesIO()
    _StubPickler(out, protocol=2).dump(obj)
    return out.getvalue()


def print_summary(what: str, written: list[Path], start: float) -> None:
    """One closing line: files written, their size, this process's peak memory, elapsed time."""
    import time

    total = sum(p.stat().st_size for p in written)
    print(
        f"wrote {what}: {len(written)} file(s), {total / 1e9:.2f} GB; "
        f"peak memory {peak_rss_mb():.0f} MB; {time.time() - start:.1f} s"
    )
