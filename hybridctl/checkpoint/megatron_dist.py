"""Megatron's ``torch_dist`` format (megatron.core.dist_checkpointing on torch.distributed.checkpoint).

A checkpoint directory holds ``metadata.json`` (``sharded_backend: torch_dist``), DCP's ``.metadata`` and
``__{rank}_{n}.distcp`` files, and ``common.pt`` (megatron-core ≤ 0.18) and/or the DCP object
``common_state/shard_0_1`` (0.19) with the non-tensor state (args, iteration). Tensor keys are the Megatron names
with global layer indices and global shapes; Mamba's fused ``in_proj`` / ``conv1d`` are stored per component
(``….in_proj.weight.z`` …). No Megatron import is needed.

Safety: DCP unpickles ``.metadata`` and object entries with the full unpickler. Here ``.metadata`` goes through a
restricted unpickler (DCP's own metadata classes only), only tensor entries are loaded through DCP (tensor payloads
are read by DCP with ``weights_only=True``), and object entries are fetched as raw bytes and opened with
``safe_torch_load``.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_meta

from hybridctl.checkpoint.io import atomic_dir, carry_tokenizer, write_json
from hybridctl.checkpoint.megatron_args import args_from_config, padded_vocab
from hybridctl.checkpoint.megatron_keys import (
    Entry, Split, all_entries, dist_keys, dist_merge, dist_split, extra_state_keys, head_extra_state_keys,
)
from hybridctl.checkpoint.megatron_source import build_source, is_weight_key
from hybridctl.checkpoint.safe_pickle import SafeFileSystemReader, safe_torch_load
from hybridctl.checkpoint.source import Source, TensorSpec
from hybridctl.config import HybridctlError

log = logging.getLogger(__name__)
METADATA_JSON = "metadata.json"
COMMON_PT = "common.pt"
COMMON_KEY = "common_state/shard_0_1"
CHECKPOINT_VERSION = 3.0
IN_PROJ_PARTS, CONV_PARTS = ("z", "x", "B", "C", "dt"), ("x", "B", "C")


def _parts_of(base: str) -> tuple[str, ...]:
    return IN_PROJ_PARTS if base.endswith("in_proj.weight") else CONV_PARTS


class _RawBytesPlanner(DefaultLoadPlanner):
    """Collects object entries as raw bytes instead of unpickling them (DCP would use weights_only=False)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.raw: dict[str, bytes] = {}

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.raw[read_item.dest_index.fqn] = value.read()


def _dcp_load(reader: SafeFileSystemReader, state: dict[str, Any], planner: Any = None) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns that no process group exists; that is intended here
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
    except HybridctlError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps reader errors in CheckpointException (a
        # BaseException); one clear line either way
        msg = str(e).strip().splitlines()
        raise HybridctlError(f"{reader.path}: cannot read tensors ({msg[-1][:200] if msg else type(e).__name__}); "
                             "the checkpoint may be truncated or corrupt") from None


def _check_storage(d: Path, md: dcp_meta.Metadata) -> None:
    """Every referenced .distcp byte range exists (a truncated file is reported before anything is converted)."""
    sizes: dict[str, int] = {}
    for idx, info in md.storage_data.items():
        f = d / info.relative_path
        if info.relative_path not in sizes:
            if not f.is_file():
                raise HybridctlError(f"{d}: missing data file {info.relative_path}")
            sizes[info.relative_path] = f.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise HybridctlError(f"{f}: truncated ({sizes[info.relative_path]} bytes, the metadata needs "
                                 f"{info.offset + info.length}); the checkpoint is incomplete")


def read_common(d: Path, reader: SafeFileSystemReader, *, trust_pickle: bool) -> dict[str, Any]:
    """The non-tensor state: ``common.pt`` (wins, as in megatron-core) or the ``common_state`` DCP object."""
    if (d / COMMON_PT).is_file():
        obj = safe_torch_load(d / COMMON_PT, where=str(d / COMMON_PT), trust_pickle=trust_pickle)
    else:
        md = reader.read_metadata()
        if COMMON_KEY not in md.state_dict_metadata:
            raise HybridctlError(f"{d}: neither {COMMON_PT} nor a {COMMON_KEY.split('/')[0]} entry; cannot find "
                                 "the checkpoint's args")
        planner = _RawBytesPlanner()
        _dcp_load(reader, {COMMON_KEY: io.BytesIO()}, planner)
        obj = safe_torch_load(planner.raw[COMMON_KEY], where=f"{d}:{COMMON_KEY}", trust_pickle=trust_pickle)
        obj = obj[0] if isinstance(obj, list) and obj else obj
    if not isinstance(obj, dict):
        raise HybridctlError(f"{d}: the common state is a {type(obj).__name__}, expected a dict")
    return obj


def open_dist(d: Path, *, root: Path | None, trust_pickle: bool = False) -> Source:
    """Open a torch_dist checkpoint directory as a native Source."""
    meta = _read_backend(d)
    if meta.get("sharded_backend") != "torch_dist":
        raise HybridctlError(f"{d}: sharded backend {meta.get('sharded_backend')!r} is not supported (only "
                             "torch_dist)")
    reader = SafeFileSystemReader(d)
    md = reader.read_metadata()
    _check_storage(d, md)
    common = read_common(d, reader, trust_pickle=trust_pickle)
    tensors = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, dcp_meta.TensorStorageMetadata)
               and is_weight_key(k)}
    mspecs: dict[str, TensorSpec] = {}
    parts: dict[str, list[str]] = {}
    for k, v in tensors.items():
        base, _, last = k.rpartition(".")
        if base.endswith(("in_proj.weight", "conv1d.weight", "conv1d.bias")) and last in _parts_of(base):
            parts.setdefault(base, []).append(k)
        else:
            mspecs[k] = (tuple(v.size), v.properties.dtype)
    for base, ks in parts.items():  # fused tensor = its components concatenated along dim 0
        if len(ks) != len(_parts_of(base)):
            lacking = [p for p in _parts_of(base) if f"{base}.{p}" not in ks]
            raise HybridctlError(f"{d}: missing tensor {base + '.' + lacking[0]!r}")
        first = tensors[ks[0]]
        rows = sum(tensors[k].size[0] for k in ks)
        mspecs[base] = ((rows, *tuple(first.size)[1:]), first.properties.dtype)

    def mget(key: str, split: Split | None) -> torch.Tensor:
        entry = Entry(key, (), mspecs[key][0], split,
                      dist_parts=_parts_of(key) if key in parts else ())
        want = {k: torch.empty(tuple(tensors[k].size), dtype=tensors[k].properties.dtype) for k in dist_keys(entry)}
        missing = [k for k in want if k not in tensors]
        if missing:
            raise HybridctlError(f"{d}: missing tensor {missing[0]!r}")
        _dcp_load(reader, want)
        return dist_merge(entry, want)

    info = {"megatron_format": "torch_dist", "iteration": common.get("iteration"),
            "checkpoint_version": common.get("checkpoint_version")}
    return build_source("megatron-dist", d, common.get("args"), mspecs, mget, where=str(d), info=info,
                        search_dirs=[r for r in (root, d) if r is not None])


def _read_backend(d: Path) -> dict[str, Any]:
    import json

    try:
        meta = json.loads((d / METADATA_JSON).read_text())
    except (OSError, ValueError) as e:
        raise HybridctlError(f"{d / METADATA_JSON}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise HybridctlError(f"{d / METADATA_JSON}: expected a JSON object")
    return meta


def is_dist_dir(d: Path) -> bool:
    return (d / METADATA_JSON).is_file()


# ---- writing -------------------------------------------------------------------------------------------------------


class _LazySavePlanner(DefaultSavePlanner):
    """Plans on meta tensors and produces each tensor only when DCP writes it (one fused tensor in memory at a
    time). Also records an empty ``mcore_data`` for every tensor, as megatron-core's own planner does."""

    def __init__(self, producers: dict[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._producers = producers

    def resolve_data(self, write_item: Any) -> Any:
        fqn = write_item.index.fqn
        if fqn in self._producers:
            return self._producers[fqn]().contiguous()
        return super().resolve_data(write_item)

    def create_global_plan(self, all_plans: list[Any]) -> tuple[list[Any], dcp_meta.Metadata]:
        plans, md = super().create_global_plan(all_plans)
        md.mcore_data = {k: {} for k in self._producers}
        return plans, md


def _producers(src: Source, entries: list[Entry], progress: Callable[[int], None] | None
               ) -> dict[str, Callable[[], torch.Tensor]]:
    """{DCP key: () -> tensor}; the components of one fused tensor share one packed copy (kept until the next)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def make(e: Entry, k: str) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            if e.key not in cache:
                cache.clear()
                cache[e.key] = dist_split(e, e.to_megatron([src.get(n) for n in e.natives]))
                if progress:
                    progress(1)
            return cache[e.key][k]
        return produce

    return {k: make(e, k) for e in entries for k in dist_keys(e)}


def write_megatron_dist(out: str | Path, src: Source, *, overwrite: bool = False,
                        progress: Callable[[int], None] | None = None) -> Path:
    """Write ``src`` as a torch_dist checkpoint megatron-core loads into a hybrid MambaModel at any TP/PP.

    Layout: ``out/latest_checkpointed_iteration.txt`` = ``release`` and ``out/release/`` with ``metadata.json``,
    ``common.pt`` (args, iteration, checkpoint_version), DCP ``.metadata`` + ``__0_0.distcp`` holding the tensors
    under Megatron keys with global shapes (Mamba fused tensors split per component), the same common state as the
    ``common_state/shard_0_1`` object (megatron-core 0.19) and ``[None]`` for every ``_extra_state`` a
    megatron-core HybridModel (TE or local spec) may ask for at default strictness, ``output_layer``'s included. The vocab is padded to a multiple of 128 (Megatron's default at TP 1; at TP k Megatron must
    compute the same padded size, e.g. ``--make-vocab-size-divisible-by`` 128/k).
    """
    cfg = src.config
    padded = padded_vocab(cfg.vocab_size, 1)
    unpadded = src.info.get("vocab_size_unpadded") or cfg.vocab_size
    args = args_from_config(cfg, padded=padded, unpadded=unpadded, tp=1, pp=1, ckpt_format="torch_dist",
                            dtype=src.dtype)
    common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    entries = all_entries(cfg, padded, style="dist")
    producers = _producers(src, entries, progress)
    state: dict[str, Any] = {}
    for e in entries:
        for k, part in dist_split(e, torch.empty(e.shape, dtype=_stored_dtype(src, e), device="meta")).items():
            state[k] = torch.empty(part.shape, dtype=part.dtype, device="meta")
    for k in [k for i in range(cfg.n_layers) for k in extra_state_keys(cfg, i)] + head_extra_state_keys():
        state[f"{k}/shard_0_1"] = [None]
    state[COMMON_KEY] = [common]
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        d = tmp / "release"
        d.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no process group: intended (no_dist=True)
            dcp.save(state, storage_writer=FileSystemWriter(d, single_file_per_rank=True, thread_count=1),
                     planner=_LazySavePlanner(producers), no_dist=True)
        torch.save(common, d / COMMON_PT)
        write_json(d / METADATA_JSON, {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                       "common_backend": "torch", "common_backend_version": 1})
        (tmp / "latest_checkpointed_iteration.txt").write_text("release")
        carry_tokenizer(src.tokenizer_dir, tmp)
    return out


def count_writes_dist(src: Source) -> int:
    """Progress units of write_megatron_dist (one per Megatron entry), for sizing a progress bar."""
    return len(all_entries(src.config, padded_vocab(src.config.vocab_size, 1), style="dist"))


def _stored_dtype(src: Source, e: Entry) -> torch.dtype:
    return src.specs[e.natives[0]][1]
