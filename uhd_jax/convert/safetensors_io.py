"""Streaming safetensors: read one tensor at a time, write tensors one at a time, single file or sharded.

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw bytes.
We parse the header ourselves and read each tensor with `readinto` into a fresh numpy buffer instead of
`safetensors.safe_open`: that one memory-maps the file, and every mapped page it touches counts in the
process's resident memory, so converting a 2.6 GB checkpoint would hold the whole file in RSS on top of
the converted copy. Files we write are read back by `safetensors.safe_open` and `transformers` in the tests.

Directories hold `model.safetensors`, or shards listed in `model.safetensors.index.json` (`weight_map`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def dtype_code(dtype) -> str:
    """numpy dtype -> safetensors dtype string ("BF16", "F32", ...)."""
    try:
        return DTYPE_CODES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no safetensors code") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, size; dtype as the safetensors code."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict, list[str]]:
    """Parses one file's header. Returns (tensors, __metadata__, problems); a broken file gives no tensors."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return {}, {}, [f"{name}: truncated safetensors file ({size} bytes, no header)"]
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                return {}, {}, [f"{name}: truncated or corrupt safetensors file (header of {n} bytes, "
                                f"file of {size} bytes)"]
            header = json.loads(f.read(n))
    except OSError as e:
        return {}, {}, [f"{name}: cannot read: {e}"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {}, {}, [f"{name}: corrupt safetensors header: {e}"]
    if not isinstance(header, dict):
        return {}, {}, [f"{name}: corrupt safetensors header (not a JSON object)"]
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    tensors, problems = {}, []
    for key, h in header.items():
        try:
            dt, shape, (begin, end) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: tensor `{key}`: malformed header entry {h!r}")
            continue
        if dt not in DTYPES:
            problems.append(f"tensor `{key}` ({name}): unknown dtype {dt!r}")
            continue
        want = math.prod(shape) * DTYPES[dt].itemsize
        if end - begin != want or begin < 0:
            problems.append(f"tensor `{key}` ({name}): header says {end - begin} bytes for {dt} {list(shape)} "
                            f"({want} bytes)")
            continue
        if end > data_size:
            problems.append(f"tensor `{key}` ({name}): truncated file: its data ends at byte {data_start + end}, "
                            f"the file has {size} bytes")
            continue
        tensors[key] = TensorInfo(key, dt, shape, path, data_start + begin, want)
    return tensors, metadata, problems


class SafetensorsReader:
    """All tensors of a safetensors file or model directory, read one at a time.

    Opening parses every header; problems (truncated or corrupt file, missing shard, index not matching the
    shards) are collected in `problems`, not raised, so the caller reports them with its own.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self.problems: list[str] = []
        self._handles: dict[str, object] = {}
        if os.path.isdir(path):
            index, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
            if os.path.exists(index):
                self._open_index(index)
            elif os.path.exists(single):
                self._open_files([single])
            else:
                self.problems.append(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
        elif os.path.isfile(path):
            self._open_files([path])
        else:
            self.problems.append(f"{path}: no such file or directory")

    def _open_files(self, files: Iterable[str]):
        for f in files:
            tensors, metadata, problems = read_header(f)
            self.problems += problems
            self.metadata.update(metadata)
            for k, info in tensors.items():
                if k in self.tensors:
                    self.problems.append(f"tensor `{k}` is in both {os.path.basename(self.tensors[k].file)} "
                                         f"and {os.path.basename(f)}")
                else:
                    self.tensors[k] = info

    def _open_index(self, index: str):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            self.problems.append(f"{INDEX_FILE}: unreadable index: {e!r}")
            return
        root = os.path.dirname(index)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(root, s))]
        for s in missing:
            names = sorted(k for k, v in weight_map.items() if v == s)
            self.problems.append(f"shard {s} listed in {INDEX_FILE} is missing ({len(names)} tensors, e.g. "
                                 f"`{names[0]}`)")
        self._open_files(os.path.join(root, s) for s in shards if s not in missing)
        for k, s in weight_map.items():
            info = self.tensors.get(k)
            if s in missing:
                continue
            if info is None:
                if not any(p.startswith(f"tensor `{k}` ") for p in self.problems):
                    self.problems.append(f"tensor `{k}` is listed in {INDEX_FILE} under {s} but not in that file")
            elif os.path.basename(info.file) != s:
                self.problems.append(f"tensor `{k}` is listed under {s} but stored in "
                                     f"{os.path.basename(info.file)}")
        for k in sorted(set(self.tensors) - set(weight_map)):
            self.problems.append(f"tensor `{k}` in {os.path.basename(self.tensors[k].file)} is not listed in "
                                 f"{INDEX_FILE}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Reads tensor `name` into a new array (or into `out`, C-contiguous, same dtype and shape)."""
        info = self.tensors[name]
        if out is None:
            out = np.empty(info.shape, info.np_dtype)
        elif out.dtype != info.np_dtype or out.shape != info.shape or not out.flags.c_contiguous:
            raise ValueError(f"tensor `{name}`: cannot read {info.dtype} {list(info.shape)} into "
                             f"{out.dtype} {list(out.shape)}")
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb", buffering=0)
        f.seek(info.offset)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < info.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"tensor `{name}`: {os.path.basename(info.file)} ended after {done} of "
                              f"{info.nbytes} bytes (file changed since it was opened?)")
            done += n
        return out

    def close(self):
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header_bytes(specs, metadata) -> bytes:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(out_dir: str, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
                      get_tensor: Callable[[str], np.ndarray], *, max_shard_bytes: int | None = None,
                      metadata: dict | None = None) -> list[str]:
    """Writes tensors named in `specs` (name, dtype, shape), in that order, fetching each with `get_tensor`
    just before writing it, so only one tensor needs to exist at a time.

    One `model.safetensors`, or shards of at most `max_shard_bytes` (a larger tensor gets its own shard)
    plus `model.safetensors.index.json`. Returns the file names written.
    """
    metadata = {"format": "pt"} if metadata is None else metadata
    shards, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * np.dtype(spec[1]).itemsize
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    # one writer thread: the next tensor is made while the previous one is written (at most two alive)
    with concurrent.futures.ThreadPoolExecutor(1) as writer:
        for fname, shard in zip(names, shards):
            with open(os.path.join(out_dir, fname), "wb") as f:
                pending = writer.submit(f.write, _header_bytes(shard, metadata))
                for name, dtype, shape in shard:
                    a = np.ascontiguousarray(get_tensor(name))
                    if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
                        raise ValueError(f"tensor `{name}`: expected {np.dtype(dtype)} {list(shape)}, "
                                         f"got {a.dtype} {list(a.shape)}")
                    pending.result()
                    pending = writer.submit(f.write, memoryview(a.reshape(-1).view(np.uint8)))
                    del a
                pending.result()
    if len(shards) > 1:
        total = sum(math.prod(s[2]) * np.dtype(s[1]).itemsize for s in specs)
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        names.append(INDEX_FILE)
    return names
