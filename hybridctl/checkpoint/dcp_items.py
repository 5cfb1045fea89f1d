"""What a DCP ``.metadata`` says about a tensor, checked against the data file before DCP reads it.

DCP trusts ``.metadata``: it copies each stored item into a tensor of the *declared* dtype (a float32 tensor declared
float16 is silently rounded), and it fills only the regions the declared chunks cover (a chunk moved outside the
tensor leaves uninitialised memory behind). Here, before any read:

* :func:`check_layout`: the chunks of every tensor lie inside it and tile it exactly (no gap, no overlap), and each
  has a storage item;
* :func:`check_items`: each storage item's own ``torch.save`` header (the zip directory and its tiny ``data.pkl``,
  read with an unpickler that builds plain records only) stores the declared dtype and the chunk's shape, with
  enough bytes behind it.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_meta

from hybridctl.config import HybridctlError

_DATA_RECORD = re.compile(r"^[^/]+/data/(\d+)$")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_layout(d: Path, key: str, v: dcp_meta.TensorStorageMetadata, storage: dict) -> None:
    """The declared chunks of ``key`` lie inside its size, tile it exactly, and each has a storage item."""
    size = tuple(v.size)
    if not size or any(not isinstance(n, int) or n < 0 for n in size):
        raise HybridctlError(f"{d}: tensor {key!r}: the .metadata gives it the size {size}, not a weight's shape")
    boxes = []
    for c in v.chunks:
        off, sz = tuple(c.offsets), tuple(c.sizes)
        if len(off) != len(size) or len(sz) != len(size) or any(
                o < 0 or s < 0 or o + s > n for o, s, n in zip(off, sz, size)):
            raise HybridctlError(f"{d}: tensor {key!r}: the .metadata places a chunk of size {sz} at {off}, outside "
                                 f"the tensor's size {size}")
        if dcp_meta.MetadataIndex(key, off) not in storage:
            raise HybridctlError(f"{d}: tensor {key!r}: the .metadata names no data for its chunk at {off}")
        boxes.append((off, sz))
    covered = sum(math.prod(sz) for _, sz in boxes)
    overlap = any(all(o1 < o2 + s2 and o2 < o1 + s1 for o1, s1, o2, s2 in zip(a[0], a[1], b[0], b[1]))
                  for i, a in enumerate(boxes) for b in boxes[i + 1:])
    if covered != math.prod(size) or overlap:
        raise HybridctlError(f"{d}: tensor {key!r}: the .metadata's chunks cover {covered} elements"
                             f"{' (overlapping)' if overlap else ''} of its {math.prod(size)}; the checkpoint is "
                             "inconsistent")


@dataclass
class _Stored:
    """What a stored item's header says: storage dtype and element count, and the tensor view on it."""

    dtype: torch.dtype | None
    storage_numel: int
    storage_offset: int
    size: tuple
    stride: tuple


def _rebuild_v2(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Stored:
    _, stype, _, _, numel = storage
    dtype = torch.storage._get_dtype_from_pickle_storage_type(stype) if stype != "UntypedStorage" else None
    return _Stored(dtype, numel, offset, tuple(size), tuple(stride))


def _rebuild_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                dtype: Any, *rest: Any) -> _Stored:
    s = _rebuild_v2(storage, offset, size, stride)
    s.dtype = dtype
    return s


class _HeaderUnpickler(pickle.Unpickler):
    """Reads a torch.save ``data.pkl`` of one tensor into a :class:`_Stored` record: the only globals it resolves
    are the two rebuild functions above (ours), storage-type names (kept as strings), dtypes and OrderedDict."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full == "torch._utils._rebuild_tensor_v2":
            return _rebuild_v2
        if full == "torch._utils._rebuild_tensor_v3":
            return _rebuild_v3
        if full == "collections.OrderedDict":
            return dict
        if full == "torch.storage.UntypedStorage":
            return "UntypedStorage"
        if module == "torch" and name.endswith("Storage"):
            return name
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"unexpected global {full}")

    def persistent_load(self, pid: Any) -> Any:
        return pid


class _Slice(io.RawIOBase):
    """A read-only, seekable window [start, start + length) of an open file (one DCP storage item), for zipfile."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, off: int, whence: int = 0) -> int:
        pos = {0: off, 1: self._pos + off, 2: self._len + off}[whence]
        if pos < 0:
            raise OSError("negative seek in a storage item")
        self._pos = pos
        return pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _stored(f: Any, start: int, length: int) -> tuple[_Stored, int] | None:
    """(header record, data bytes) of the torch.save item at [start, start + length); None when it is not one (DCP's
    own read then reports it)."""
    try:
        with zipfile.ZipFile(_Slice(f, start, length)) as z:
            names = z.namelist()
            pkl = next(n for n in names if n.endswith("/data.pkl"))
            nbytes = sum(z.getinfo(n).file_size for n in names if _DATA_RECORD.match(n))
            rec = _HeaderUnpickler(io.BytesIO(z.read(pkl))).load()
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, ValueError, KeyError, TypeError, OSError,
            EOFError, IndexError, AttributeError, RuntimeError, MemoryError):
        return None
    return (rec, nbytes) if isinstance(rec, _Stored) else None


def check_items(d: Path, key: str, v: dcp_meta.TensorStorageMetadata,
                items: list[tuple[dcp_meta.MetadataIndex, Any]]) -> None:
    """Each storage item of ``key`` stores the declared dtype and its chunk's shape, with the bytes to back it."""
    declared = v.properties.dtype
    chunks = {tuple(c.offsets): tuple(c.sizes) for c in v.chunks}
    for idx, info in items:
        if info.transform_descriptors:  # a transformed (e.g. compressed) item: only DCP can decode it
            continue
        with (d / info.relative_path).open("rb") as f:
            got = _stored(f, info.offset, info.length)
        if got is None:
            continue
        rec, nbytes = got
        if rec.dtype is not None and rec.dtype != declared:
            raise HybridctlError(f"{d}: tensor {key!r}: the .metadata declares {_name(declared)} but the data file "
                                 f"stores {_name(rec.dtype)}; the metadata contradicts the data (not reinterpreting "
                                 "it)")
        want = chunks.get(tuple(idx.offset or ()))
        if want is not None and rec.size != want:
            raise HybridctlError(f"{d}: tensor {key!r}: the .metadata declares a chunk of shape {want} but the data "
                                 f"file stores shape {rec.size}; the metadata contradicts the data")
        extent = rec.storage_offset + sum((n - 1) * s for n, s in zip(rec.size, rec.stride)) + 1 \
            if all(n > 0 for n in rec.size) else 0
        itemsize = (rec.dtype or declared).itemsize
        if min(rec.storage_numel * itemsize, nbytes) < extent * itemsize:
            raise HybridctlError(f"{d}: tensor {key!r}: its stored item holds {nbytes} bytes, its header needs "
                                 f"{extent * itemsize}; the data file is corrupt")
