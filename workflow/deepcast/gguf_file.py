"""A GGUF file's header: its scalar metadata and its tensor table, without its arrays.

gguf-py's GGUFReader builds a numpy view of every element of every metadata array: a DeepSeek tokenizer's
129,280 tokens and 127,741 merges take it 8 to 11 seconds on 2 cores, for a model of any size. deepcast reads
only scalars (the BOS id, the gating function, the pre-tokenizer) and the tensor table (names, types,
shapes), so this reader steps over each array by its lengths instead, and checks that the tensor data
the table describes is all in the file. The layout is the GGUF specification's
(little-endian, versions 2 and 3); the per-type block sizes come from the pinned tree's gguf-py.
"""

from __future__ import annotations

import math
import mmap
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from deepcast.errors import DeepcastError

MAGIC = b"GGUF"
# GGUFValueType: the struct format of each scalar type; 8 is a string, 9 an array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32  # where general.alignment is absent


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: int  # GGMLQuantizationType
    type_name: str
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, object]  # scalars and strings; an array is recorded as ("array", item type, length)
    tensors: list[Tensor]


class _Cursor:
    def __init__(self, data) -> None:
        self.data, self.offset = data, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.take("Q")
        start, self.offset = self.offset, self.offset + length
        if self.offset > len(self.data):
            raise ValueError("a string runs past the end of the file")
        return bytes(self.data[start : self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item == STRING:
                for _ in range(count):
                    self.offset += 8 + struct.unpack_from("<Q", self.data, self.offset)[0]
            elif item in SCALARS:
                self.offset += count * struct.calcsize("<" + SCALARS[item])
            else:  # arrays of arrays: not written by llama.cpp's tools, read element by element
                for _ in range(count):
                    self.value(item)
            return ("array", item, count)
        raise ValueError(f"unknown metadata value type {kind}")


def read_header(path: Path, llama) -> Header:
    """The header of the GGUF at `path`; `llama` (a located llama.cpp) gives the quant types' block sizes."""
    sys.path.insert(0, str(llama.root / "src" / "gguf-py"))
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    finally:
        sys.path.remove(str(llama.root / "src" / "gguf-py"))
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(data)
            if data[:4] != MAGIC:
                raise ValueError("no GGUF magic")
            cursor.offset = 4
            version = cursor.take("I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (big-endian or unsupported)")
            tensor_count, kv_count = cursor.take("Q"), cursor.take("Q")
            metadata = {}
            for _ in range(kv_count):
                key = cursor.string()
                metadata[key] = cursor.value(cursor.take("I"))
            tensors, ends = [], []
            for _ in range(tensor_count):
                name = cursor.string()
                shape = tuple(cursor.take("Q") for _ in range(cursor.take("I")))
                kind = cursor.take("I")
                offset = cursor.take("Q")  # from the start of the data section
                quant = GGMLQuantizationType(kind)
                block, size = GGML_QUANT_SIZES[quant]
                elements = math.prod(shape)
                tensors.append(Tensor(name, shape, kind, quant.name, elements, elements // block * size))
                ends.append(offset + tensors[-1].n_bytes)
            alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
            data_start = -(-cursor.offset // alignment) * alignment
            if ends and data_start + max(ends) > len(data):
                raise ValueError(f"its tensors end at byte {data_start + max(ends):,}, the file at {len(data):,}")
    except (ValueError, OSError, struct.error, KeyError) as error:
        raise DeepcastError(f"{path} is not a readable GGUF ({error}). Fix: rebuild it.") from None
    return Header(metadata, tensors)
