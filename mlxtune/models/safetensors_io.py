"""Read and write safetensors files with numpy alone (the format is an 8-byte little-endian
header size, a JSON header of name -> {dtype, shape, data_offsets}, then the raw data).

numpy has no bfloat16, and both base models and exports often are: here bfloat16 is read into
float32 (exact) and written from float32 with round-to-nearest-even, as torch and mlx cast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
_CODE = {np.dtype(v): k for k, v in _NP.items()}
FLOAT_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header without ``__metadata__``). ValueError when the header is cut or
    is not the format's JSON object (its size is checked against the file before it is read)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: header cut or corrupt ({size} bytes)")
        header = json.loads(f.read(n).decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + n, header


def data_end(header: dict[str, Any]) -> int:
    """Bytes of tensor data the header's offsets cover (TypeError/KeyError/... when it is malformed)."""
    return max((int(v["data_offsets"][1]) for v in header.values()), default=0)


def read_tensors(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file (``names``: only these) as numpy arrays; bfloat16 as float32."""
    return dict(iter_tensors(path, names))


def iter_tensors(path: Path, names: list[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) one tensor at a time, so a large shard is never in memory as a whole."""
    start, header = read_header(Path(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name in names if names is not None else list(header):
        info = header[name]
        a, b = info["data_offsets"]
        raw = data[start + a: start + b]
        if info["dtype"] == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _NP:
            arr = raw.view(_NP[info["dtype"]]).copy()
        else:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not know")
        yield name, arr.reshape(info["shape"])


def read_float32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``path`` as float32 (the ``load`` that :func:`~mlxtune.adapters.lora.read_adapter` takes)."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in read_tensors(path).items()}


def to_dtype(arr: np.ndarray, dtype: str) -> tuple[str, bytes]:
    """(safetensors dtype code, bytes) of a float array cast to ``dtype`` (float32/float16/bfloat16)."""
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
        nan = np.isnan(x)
        out = rounded.astype(np.uint16)
        out[nan] = 0x7FC0
        return "BF16", out.tobytes()
    return FLOAT_CODES[dtype], x.astype(np.float16 if dtype == "float16" else np.float32).tobytes()


def raw_bytes(arr: np.ndarray) -> tuple[str, bytes]:
    """(dtype code, bytes) of a tensor written as it is (integer buffers and the like)."""
    arr = np.ascontiguousarray(arr)
    return _CODE[arr.dtype], arr.tobytes()


def write_file(path: Path, tensors: list[tuple[str, str, tuple[int, ...], bytes]], metadata: dict[str, str] | None = None) -> None:
    """Write (name, dtype code, shape, bytes) entries as one safetensors file, in the given order."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, code, shape, data in tensors:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, _, _, data in tensors:
            f.write(data)
