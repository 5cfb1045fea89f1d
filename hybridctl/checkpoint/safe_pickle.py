"""Loading pickles that other programs wrote, without letting them run code.

Megatron's checkpoints are pickles: legacy ``model_optim_rng.pt`` files, ``common.pt``, the DCP ``.metadata`` file
and DCP object entries (``common_state``, ``_extra_state``). Unpickling can call any importable function, so a
checkpoint from the internet must never be unpickled with the full unpickler. Two paths:

* torch-format files (zip archives written by ``torch.save``): first list every global the pickle names without
  executing anything (``torch.serialization.get_unsafe_globals_in_checkpoint``); refuse the file if one is neither on
  the allowlist nor a known-inert name; then ``torch.load(weights_only=True)`` under ``safe_globals``. Globals we do
  not need the behaviour of (Megatron's enums, numpy RNG state pieces) are *substituted* by :class:`Inert`, a class
  of ours that only records its arguments, so the real Megatron/numpy code is never imported or called.
* plain pickles (the DCP ``.metadata``): :func:`restricted_pickle_load`, a ``pickle.Unpickler`` whose ``find_class``
  returns only the exact classes named in an allowlist.

``trust_pickle=True`` uses ``weights_only=False``: the file may then run arbitrary code (only for files you made).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import logging
import os
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_meta
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from hybridctl.config import HybridctlError

log = logging.getLogger(__name__)

TRUST_HINT = ("if you made this file yourself, pass --trust-pickle (trust_pickle=True), which unpickles it fully "
              "and lets it run arbitrary code")


class Inert:
    """Stand-in for a class whose behaviour we never need (e.g. ``megatron.core.enums.ModelType``).

    Construction and ``__setstate__`` only store their arguments; nothing is imported or executed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Inert{self.args!r}"


# Real classes whose construction is harmless and whose value we may read (args is a Namespace).
_REAL = {
    "argparse.Namespace": argparse.Namespace,
    "_io.BytesIO": io.BytesIO,  # Transformer Engine extra state
    "io.BytesIO": io.BytesIO,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "datetime.timedelta": datetime.timedelta,
    "pathlib.PosixPath": pathlib.PosixPath,  # paths in args (save/load dirs) only construct path objects
    "pathlib._local.PosixPath": pathlib.PosixPath,
    "pathlib.PurePosixPath": pathlib.PurePosixPath,
}
# Names replaced by Inert: numpy's RNG state pieces (rng_state) and Megatron's own types stored in args.
_INERT_EXACT = {
    "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
}
_INERT_PATTERNS = (re.compile(r"^numpy\.dtypes\.\w+DType$"), re.compile(r"^megatron\.[\w.]+$"))


def _classify(name: str) -> str:
    if name in _REAL:
        return "real"
    if name in _INERT_EXACT or any(p.match(name) for p in _INERT_PATTERNS):
        return "inert"
    return "refused"


def _inert_for(name: str) -> type:
    # A distinct subclass per name keeps reprs readable and BUILD allowed (torch checks the instance's type).
    return type(name.rsplit(".", 1)[-1], (Inert,), {"__module__": "hybridctl.inert"})


def _refusal(where: str, name: str, n_more: int) -> HybridctlError:
    more = f" (and {n_more} more)" if n_more else ""
    return HybridctlError(f"{where}: refusing to unpickle: it needs the global {name!r}{more}, which is not on "
                          f"hybridctl's allowlist of inert types; {TRUST_HINT}")


def safe_torch_load(source: str | os.PathLike | bytes, *, where: str, trust_pickle: bool = False,
                    mmap: bool = False) -> Any:
    """``torch.load`` a file (or bytes) written by ``torch.save`` without executing code (see module docstring).

    mmap=True maps tensor storages instead of reading them (files only), so huge rank files cost no memory until a
    tensor is touched.
    """
    is_bytes = isinstance(source, (bytes, bytearray))

    def fileobj() -> Any:
        return io.BytesIO(source) if is_bytes else source

    use_mmap = mmap and not is_bytes and _is_zip(source)  # pre-zip (torch < 1.6) files cannot be mapped
    try:
        if trust_pickle:
            log.warning("%s: unpickling with weights_only=False (--trust-pickle): it may run code", where)
            return torch.load(fileobj(), map_location="cpu", weights_only=False, mmap=use_mmap)
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(fileobj())
        except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError, OSError) as e:
            if _is_zip(source):
                raise HybridctlError(f"{where}: unreadable torch file ({_short(e)})") from None
            names = None  # a pre-zip (torch < 1.6) pickle: rely on the weights_only unpickler's own refusal
        if names is not None:
            refused = [n for n in names if _classify(n) == "refused"]
            if refused:
                raise _refusal(where, refused[0], len(refused) - 1)
            allow = [(_REAL[n], n) for n in names if _classify(n) == "real"]
            allow += [(_inert_for(n), n) for n in names if _classify(n) == "inert"]
        else:
            allow = [(cls, n) for n, cls in _REAL.items()]
        with torch.serialization.safe_globals(allow):
            return torch.load(fileobj(), map_location="cpu", weights_only=True, mmap=use_mmap)
    except HybridctlError:
        raise
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise _refusal(where, m.group(1), 0) from None
        raise HybridctlError(f"{where}: refusing to unpickle ({_short(e)}); {TRUST_HINT}") from None
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, TypeError, AttributeError) as e:
        raise HybridctlError(f"{where}: unreadable or truncated torch file ({_short(e)})") from None


def _is_zip(source: Any) -> bool:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:4]) == b"PK\x03\x04"
    with Path(source).open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f: BinaryIO, allowed: dict[str, Any], where: str) -> None:
        super().__init__(f)
        self._allowed, self._where = allowed, where

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        raise _refusal(self._where, full, 0)


def restricted_pickle_load(f: BinaryIO, allowed: dict[str, Any], *, where: str) -> Any:
    """``pickle.load`` that resolves only the exact globals in ``allowed`` (full name → object)."""
    try:
        return _RestrictedUnpickler(f, allowed, where).load()
    except HybridctlError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise HybridctlError(f"{where}: unreadable or truncated pickle ({_short(e)})") from None
    except (MemoryError, OverflowError):  # a corrupt length or memo index asks for an absurd allocation
        raise HybridctlError(f"{where}: corrupt pickle (a length or index in it is out of range)") from None


# ---- torch.distributed.checkpoint without unpickling untrusted data ----------------------------------------------
# DCP reads ``.metadata`` with plain ``pickle.load`` and object entries with full unpickling: a checkpoint written by
# someone else could run code on load. These two pieces are what every DCP read in hybridctl goes through.

def _metadata_allowlist() -> dict[str, Any]:
    allowed: dict[str, Any] = {f"torch.distributed.checkpoint.metadata.{n}": getattr(dcp_meta, n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    # megatron-core 0.19 also pickles the (cached) save plan: plain dataclasses and one Enum. Unpickling builds them
    # with ``cls.__new__`` + a __dict__ update (dataclasses) or an Enum value lookup; none defines __reduce__ /
    # __setstate__, so nothing but these constructors can run.
    for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"):
        if hasattr(dcp_planner, n):
            allowed[f"torch.distributed.checkpoint.planner.{n}"] = getattr(dcp_planner, n)
    allowed["torch.distributed.checkpoint.filesystem._StorageInfo"] = _StorageInfo
    allowed["torch.Size"] = torch.Size
    allowed["torch.serialization._get_layout"] = torch.serialization._get_layout
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        for mod in ("pathlib", "pathlib._local"):
            allowed[f"{mod}.{name}"] = getattr(pathlib, name)
    allowed["collections.OrderedDict"] = dict
    return allowed


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose ``.metadata`` is unpickled with an allowlist (DCP itself uses plain ``pickle.load``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._metadata: dcp_meta.Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_meta.Metadata:
        if self._metadata is None:
            f = Path(self.path) / ".metadata"
            if not f.is_file():
                raise HybridctlError(f"{self.path}: no DCP .metadata file; the checkpoint is incomplete")
            with f.open("rb") as fh:
                md = restricted_pickle_load(fh, _metadata_allowlist(), where=str(f))
            if not isinstance(md, dcp_meta.Metadata):
                raise HybridctlError(f"{f}: not DCP metadata")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = dcp_meta.StorageMeta()
            self._metadata = md
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata



class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """A load planner that refuses object (pickled bytes) entries instead of unpickling them."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise HybridctlError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object where a tensor was "
                             "expected; refusing to unpickle it")
