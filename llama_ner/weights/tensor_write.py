"""Write checkpoints one tensor at a time: Hugging Face safetensors shards, torch .pth.

    with SafetensorsShards(out_dir, plan) as out: out.write(name, tensor)

Writers lay out the header first (shapes are known before any data), then append each tensor as it is
computed: `SafetensorsShards` writes Hugging Face shards plus their index, `TorchZipWriter` writes what
`torch.save` writes (Meta's consolidated.NN.pth) without holding the dict in memory.
"""

from __future__ import annotations

import collections
import json
import math
import pickle
import struct
from pathlib import Path

import torch

from llama_ner.io_utils import UserError, peak_rss_mb
from llama_ner.weights.tensor_io import SAFETENSORS_NAMES, STORAGE_CLASSES, TensorInfo, contiguous_stride


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
