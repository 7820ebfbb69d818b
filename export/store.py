"""safetensors files written tensor by tensor and read by mapping, never whole.

The artifact keeps every weight once, in `weights.safetensors`: the ONNX graphs point into it by
byte offset (external data), the weightless torch.export programs are bound to it at load, the eager
reference maps it. Files are plain safetensors (an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, then the bytes), so any safetensors
reader opens them. Two things differ from `safetensors.torch.save_file`, both within the format:

- the header is known before any data (the plan gives every name, dtype and shape), so tensors are
  written one block at a time: memory holds a block, not a model;
- with `align` set, the data starts on a page boundary and every tensor of at least `align` bytes
  starts on one too (zero-filled `__padding__.<n>` uint8 entries fill the gaps; the format forbids
  holes). ONNX Runtime maps page-aligned external initializers instead of copying them into its
  own memory, and TensorRT / numpy read them in place.

Reading parses the header and hands out numpy/torch views of one private (copy-on-write) mapping:
pages come from the page cache on first touch, count as file-backed memory, and are never written
back."""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from jambatrt.errors import ArtifactError

PADDING = "__padding__."
PAGE = 4096
_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8", torch.uint8: "U8",
       torch.int64: "I64", torch.int32: "I32", torch.float64: "F64", torch.int16: "I16", torch.bool: "BOOL"}
_TORCH = {v: k for k, v in _ST.items()}
# numpy has no bfloat16: its bytes are viewed as int16, then reinterpreted by torch
_NP = {"F32": np.float32, "BF16": np.int16, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I64": np.int64,
       "I32": np.int32, "F64": np.float64, "I16": np.int16, "BOOL": np.bool_}


def torch_dtype(st: str) -> torch.dtype:
    return _TORCH[st]


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor without a copy where it is contiguous (bf16 through an int16 view)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


# ---- writing ----------------------------------------------------------------------------------
class StoreWriter:
    """Write a safetensors file whose entries are fixed up front: `entries` is [(name, dtype, shape)]
    in file order. Feed the bytes in that order with `write(name, block)`: a tensor may come in
    several consecutive blocks (e.g. expert by expert, rows at a time). `close()` checks that every
    tensor was written whole. `sha256` is the digest of the file as written (no second read).
    `on_bytes(n)` is called after every block, `on_tensor()` after every whole tensor (progress)."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 align: int | None = None, metadata: dict[str, str] | None = None,
                 on_bytes: Callable[[int], None] | None = None, on_tensor: Callable[[], None] | None = None):
        self.path = Path(path)
        self.on_bytes = on_bytes or (lambda n: None)
        self.on_tensor = on_tensor or (lambda: None)
        header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
        self.layout: list[tuple[str, int]] = []        # (name, nbytes) in file order, padding included
        offset, pads = 0, 0
        seen = set()
        for name, dtype, shape in entries:
            if name in seen or name.startswith(PADDING) or name == "__metadata__":
                raise ValueError(f"weight name {name!r} repeated or reserved")
            seen.add(name)
            size = nbytes(dtype, shape)
            if align and size >= align and offset % align:
                pad = align - offset % align
                header[f"{PADDING}{pads}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
                self.layout.append((f"{PADDING}{pads}", pad))
                offset, pads = offset + pad, pads + 1
            header[name] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.layout.append((name, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        start = 8 + len(text)
        if align:       # spaces are allowed at the end of the header: the data begins on a page
            text += b" " * ((-start) % align)
        else:
            text += b" " * ((-start) % 8)
        self.header, self.data_start, self.total = header, 8 + len(text), 8 + len(text) + offset
        self._hash = hashlib.sha256()
        self._f = open(self.path, "wb")
        # hashing and writing run on a thread (both release the GIL) while the caller computes the
        # next block; the queue is short, so at most a few blocks are in flight
        self._q: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="store-writer", daemon=True)
        self._thread.start()
        self._emit(struct.pack("<Q", len(text)) + text)
        self._unreported = self.data_start        # header and padding: reported with the next block
        self._i, self._left = 0, 0          # current layout entry, bytes still owed to it
        self._advance()

    def _drain(self) -> None:
        while (item := self._q.get()) is not None:
            if self._error is None:
                try:
                    self._f.write(item)
                    self._hash.update(item)
                except BaseException as e:      # reported by the next _emit or by close()
                    self._error = e

    def _raise(self) -> None:
        e = self._error
        if isinstance(e, OSError):      # ENOSPC, EFBIG, EIO: name the file, the caller removes it
            raise ArtifactError(f"{self.path}: cannot write ({e.strerror or e}); "
                                f"{self.total / 1e9:.2f} GB are needed") from None
        raise e

    def _emit(self, data) -> None:
        if self._error is not None:
            self._raise()
        self._q.put(data)             # `data` keeps its tensor alive until written

    def _advance(self) -> None:
        """Skip to the next real tensor, writing the padding entries in between."""
        while self._left == 0 and self._i < len(self.layout):
            name, size = self.layout[self._i]
            if name.startswith(PADDING):
                self._emit(bytes(size))
                self._unreported += size
                self._i += 1
            else:
                self._left = size
                if size == 0:
                    self._i += 1

    @property
    def expecting(self) -> str | None:
        return self.layout[self._i][0] if self._i < len(self.layout) else None

    def write(self, name: str, block: torch.Tensor) -> None:
        want = self.expecting
        if name != want:
            raise ValueError(f"store written out of order: got {name!r}, expected {want!r}")
        info = self.header[name]
        if _ST.get(block.dtype) != info["dtype"]:
            raise ValueError(f"{name}: block dtype {block.dtype}, the plan says {info['dtype']}")
        data = raw_bytes(block)
        if data.nbytes > self._left:
            raise ValueError(f"{name}: {data.nbytes} bytes written past the tensor's end ({self._left} left)")
        self._emit(data)
        self._left -= data.nbytes
        self.on_bytes(data.nbytes + self._unreported)
        self._unreported = 0
        if self._left == 0:
            self._i += 1
            self.on_tensor()
            self._advance()

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def close(self) -> str:
        """-> sha256 of the whole file. Raises if a tensor is missing or short, or a write failed."""
        self._finish()
        try:
            if self._error is not None:
                self._raise()
            if self.expecting is not None:
                raise ValueError(f"store incomplete: {self.expecting!r} and later tensors were not written")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise ArtifactError(f"{self.path}: cannot write ({e.strerror or e})") from None
        finally:
            self._f.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._finish()
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()


def write_tensors(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  entries: list[tuple[str, torch.dtype, tuple[int, ...]]], **kw) -> str:
    """Write `tensors` ((name, tensor) pairs, in `entries` order) as one safetensors file -> sha256."""
    with StoreWriter(path, entries, **kw) as w:
        for name, t in tensors:
            w.write(name, t)
        return w.close()


# ---- reading ----------------------------------------------------------------------------------
def read_header(path: str | Path, error=ArtifactError) -> tuple[dict, int]:
    """-> ({name: info} without padding or metadata, absolute offset of the data). Checks that the
    offsets lie inside the file; `error` is the exception type raised for a malformed file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 1 << 28):
                raise error(f"{path}: not a safetensors file (header length {n:,} of a {size:,}-byte file)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: malformed safetensors header (expected a JSON object)")
    start, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in info["data_offsets"])
            shape = [int(s) for s in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise error(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in _NP:
            raise error(f"{path}: tensor {name} has dtype {dtype} (accepted: {', '.join(_NP)})")
        if not 0 <= b <= e or start + e > size or e - b != math.prod(shape) * np.dtype(_NP[dtype]).itemsize:
            raise error(f"{path}: tensor {name} lies outside the file or disagrees with its shape "
                        "(truncated or corrupt file)")
        if not name.startswith(PADDING):
            out[name] = {"dtype": dtype, "shape": shape, "offset": start + b, "nbytes": e - b}
    return out, start


class MappedStore:
    """A safetensors file mapped once (private, copy-on-write): `tensor(name)` is a torch tensor over
    the mapping (no copy; writing to it never reaches the file), `array(name)` the numpy view."""

    def __init__(self, path: str | Path, error=ArtifactError):
        self.path = Path(path)
        self.entries, self.data_start = read_header(self.path, error)
        self._error = error
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def mapping(self):
        """The whole file's mapping (mmap; None for an empty file)."""
        return self._map

    def names(self) -> list[str]:
        return list(self.entries)

    def array(self, name: str) -> np.ndarray:
        info = self.entries.get(name)
        if info is None:
            raise self._error(f"{self.path}: no tensor {name!r}")
        dt = np.dtype(_NP[info["dtype"]])
        return np.frombuffer(self._map, dtype=dt, count=info["nbytes"] // dt.itemsize,
                             offset=info["offset"]).reshape(info["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        import warnings
        with warnings.catch_warnings():       # the mapping is writable (private): no copy is made
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(self.array(name))
        return t.view(torch.bfloat16) if self.entries[name]["dtype"] == "BF16" else t

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH[self.entries[name]["dtype"]]


def iter_blocks(t: torch.Tensor, block_bytes: int) -> Iterator[torch.Tensor]:
    """Consecutive row blocks of `t` (dim 0) of about `block_bytes` each."""
    if t.dim() == 0 or t.numel() == 0:
        yield t
        return
    row = max(1, t[0].numel() * t.element_size())
    step = max(1, block_bytes // row)
    for r in range(0, t.shape[0], step):
        yield t[r:r + step]
