"""What the tensor readers and writers share: dtype tables of the two formats, TensorInfo, the damaged-file
error. Checkpoints are read and written one tensor at a time, so memory never grows with model depth
(tensor_read, tensor_write).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_ner.io_utils import UserError

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
