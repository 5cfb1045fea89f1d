"""Megatron's legacy ``torch`` checkpoint format: one pickle per (TP, PP) rank (FORMATS.md §4).

Layout: ``ROOT/latest_checkpointed_iteration.txt`` (an integer or ``release``) and
``ROOT/iter_{n:07d}/`` or ``ROOT/release/`` holding ``mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`` (the PP
suffix only when pp > 1). Each file is a dict: ``args`` (Namespace), ``checkpoint_version``, ``iteration``,
``model`` (flat state dict; layer indices local to the pipeline stage), optionally optimizer / RNG state.

Reading maps every rank file (``mmap``) and merges one tensor at a time, so memory stays near one TP group's copy
of the tensor being merged. Writing builds one rank file at a time.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hybridctl.checkpoint.io import atomic_dir, carry_tokenizer
from hybridctl.checkpoint.megatron_args import args_from_config, padded_vocab
from hybridctl.checkpoint.megatron_keys import (
    EXTRA_STATE, KEY_STYLES, Entry, Split, embedding_entries, extra_state_keys, head_entries, layer_entries,
    tp_merge, tp_slice, validate_tp,
)
from hybridctl.checkpoint.megatron_source import build_source, is_weight_key, tp_dim_of_key
from hybridctl.checkpoint.safe_pickle import safe_torch_load
from hybridctl.checkpoint.source import Source, TensorSpec
from hybridctl.config import HybridctlError

RANK_FILE = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def is_legacy_dir(d: Path) -> bool:
    return d.is_dir() and any(_RANK_DIR.match(c.name) for c in d.iterdir() if c.is_dir())


def _rank_layout(d: Path) -> tuple[int, int]:
    """(tp, pp) from the mp_rank_* directories; every (tp, pp) pair must exist with its file."""
    ranks = []
    for c in d.iterdir():
        m = _RANK_DIR.match(c.name)
        if m and c.is_dir():
            ranks.append((int(m.group(1)), int(m.group(2) or 0)))
    tp, pp = max(r[0] for r in ranks) + 1, max(r[1] for r in ranks) + 1
    for p in range(pp):
        for t in range(tp):
            f = d / rank_dir_name(t, p, pp) / RANK_FILE
            if not f.is_file():
                raise HybridctlError(f"{d}: missing rank file {f.relative_to(d)} (found ranks up to TP={tp}, "
                                     f"PP={pp}); the checkpoint is incomplete")
    return tp, pp


def _load_rank(f: Path, trust_pickle: bool) -> dict[str, Any]:
    obj = safe_torch_load(f, where=str(f), trust_pickle=trust_pickle, mmap=True)
    if not isinstance(obj, dict):
        raise HybridctlError(f"{f}: not a Megatron checkpoint (a {type(obj).__name__}, expected a dict)")
    if "model" not in obj:
        vpp = " (virtual pipeline checkpoints with model0, model1, … are not supported)" if "model0" in obj else ""
        raise HybridctlError(f"{f}: no 'model' state dict in this file{vpp}")
    return obj


def _stage_keys(files: list[dict[str, Any]], names: list[str], stage: int) -> list[str]:
    """Weight keys of one pipeline stage, checked identical (names and per-rank shapes) across its TP ranks."""
    ref = files[0]["model"]
    keys = [k for k in ref if is_weight_key(k)]
    bad = [k for k in keys if not isinstance(ref[k], torch.Tensor)]
    if bad:
        raise HybridctlError(f"{names[0]}: {bad[0]} is not a tensor")
    for f, name in zip(files[1:], names[1:]):
        other = [k for k in f["model"] if is_weight_key(k)]
        if set(other) != set(keys):
            diff = sorted(set(keys) ^ set(other))[0]
            raise HybridctlError(f"{name}: its tensors differ from {names[0]}'s (e.g. {diff!r}); the ranks of "
                                 f"pipeline stage {stage} are inconsistent")
        for k in keys:
            if not isinstance(f["model"][k], torch.Tensor):
                raise HybridctlError(f"{name}: {k} is not a tensor")
            a, b = tuple(ref[k].shape), tuple(f["model"][k].shape)
            if a != b:
                raise HybridctlError(f"{name}: {k} has shape {b} but {names[0]} has {a}; rank files are "
                                     "inconsistent")
    return keys


def open_legacy(d: Path, *, root: Path | None, trust_pickle: bool = False) -> Source:
    """Open an iteration directory of legacy per-rank files as a native Source."""
    tp, pp = _rank_layout(d)
    where = str(d)
    global_map: dict[str, tuple[int, str]] = {}  # global key → (stage, local key)
    all_files: list[list[dict[str, Any]]] = []
    offset = 0
    for p in range(pp):
        names = [str(d / rank_dir_name(t, p, pp) / RANK_FILE) for t in range(tp)]
        files = [_load_rank(Path(n), trust_pickle) for n in names]
        all_files.append(files)
        n_local = 0
        for k in _stage_keys(files, names, p):
            m = _LAYER.match(k)
            if m:
                n_local = max(n_local, int(m.group(1)) + 1)
                k_global = f"decoder.layers.{int(m.group(1)) + offset}.{k[m.end():]}"
            else:
                k_global = k
            if k_global in global_map and not k_global.startswith("output_layer"):
                raise HybridctlError(f"{names[0]}: {k} appears in more than one pipeline stage")
            global_map[k_global] = (p, k)
        offset += n_local
    args = all_files[0][0].get("args")
    for name, n in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        declared = getattr(args, name, None)
        if declared is not None and declared != n:
            raise HybridctlError(f"{where}: args.{name} is {declared} but {n} rank(s) were found; rank files are "
                                 "missing or extra")
    mspecs: dict[str, TensorSpec] = {}
    for k, (p, local) in global_map.items():
        t = all_files[p][0]["model"][local]
        shape, dim = list(t.shape), tp_dim_of_key(k)
        if dim is not None:
            shape[dim] *= tp
        mspecs[k] = (tuple(shape), t.dtype)

    def mget(key: str, split: Split | None) -> torch.Tensor:
        p, local = global_map[key]
        return tp_merge([f["model"][local] for f in all_files[p]], split)

    first = all_files[0][0]
    info = {"megatron_format": "torch", "tp": tp, "pp": pp, "iteration": first.get("iteration"),
            "checkpoint_version": first.get("checkpoint_version")}
    return build_source("megatron-legacy", d, args, mspecs, mget, where=where, info=info,
                        search_dirs=[r for r in (root, d) if r is not None])


# ---- writing -------------------------------------------------------------------------------------------------------


def _relayer(key: str, offset: int) -> str:
    m = _LAYER.match(key)
    return key if not m else f"decoder.layers.{int(m.group(1)) - offset}.{key[m.end():]}"


def _stage_entries(cfg, stage: int, pp: int, padded: int, style: str) -> tuple[list[Entry], list[str], int]:
    per = cfg.n_layers // pp
    lo = stage * per
    entries = embedding_entries(cfg, padded) if stage == 0 else []
    extra: list[str] = []
    for i in range(lo, lo + per):
        entries += layer_entries(cfg, i, style)
        extra += extra_state_keys(cfg, i)
    if stage == pp - 1:
        entries += head_entries(cfg, padded, tied_copy=pp > 1)
        extra.append(f"output_layer.{EXTRA_STATE}")  # megatron-core's ColumnParallelLinear has extra state, tied too
    return entries, extra, lo


def write_megatron_legacy(out: str | Path, src: Source, *, tp: int = 1, pp: int = 1, keys: str = "current",
                          overwrite: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """Write ``src`` as a legacy Megatron checkpoint: ``out/release/mp_rank_*/model_optim_rng.pt`` + tracker.

    TP slices interleave per component (in_proj [z,x,B,C,dt], conv1d [x,B,C], swiglu fc1 [gate, up]); layer
    indices are local to each pipeline stage; the vocab is padded to a multiple of 128·tp (recorded in args).
    ``release`` makes Megatron load the weights without optimizer / RNG state.
    """
    if keys not in KEY_STYLES:
        raise HybridctlError(f"--megatron-keys must be one of {', '.join(KEY_STYLES)}, got {keys!r}")
    cfg = src.config
    if pp < 1 or cfg.n_layers % pp:
        raise HybridctlError(f"--pp {pp}: the model's {cfg.n_layers} layers do not divide into {pp} equal "
                             "pipeline stages")
    padded = padded_vocab(cfg.vocab_size, tp)
    validate_tp(cfg, tp, padded)
    unpadded = src.info.get("vocab_size_unpadded") or cfg.vocab_size
    args = args_from_config(cfg, padded=padded, unpadded=unpadded, tp=tp, pp=pp, ckpt_format="torch",
                            dtype=src.dtype)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        it_dir = tmp / "release"
        for stage in range(pp):
            entries, extra, lo = _stage_entries(cfg, stage, pp, padded, keys)
            for r in range(tp):
                model: OrderedDict[str, Any] = OrderedDict()
                for e in entries:
                    full = e.to_megatron([src.get(n) for n in e.natives])
                    model[_relayer(e.key, lo)] = tp_slice(full, e.split, tp, r)
                    del full
                    if progress:
                        progress(1)
                for k in extra:
                    model[_relayer(k, lo)] = None  # Transformer Engine accepts None extra state
                f = it_dir / rank_dir_name(r, stage, pp) / RANK_FILE
                f.parent.mkdir(parents=True)
                torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "model": model},
                           f)
                del model
        (tmp / TRACKER).write_text("release")
        carry_tokenizer(src.tokenizer_dir, tmp)
    return out


def count_writes(src: Source, *, tp: int = 1, pp: int = 1, keys: str = "current") -> int:
    """Progress units of write_megatron_legacy (one per entry per rank), for sizing a progress bar."""
    cfg = src.config
    padded = padded_vocab(cfg.vocab_size, tp)
    return tp * sum(len(_stage_entries(cfg, s, pp, padded, keys)[0]) for s in range(pp))


__all__ = ["open_legacy", "write_megatron_legacy", "is_legacy_dir", "TRACKER", "RANK_FILE", "EXTRA_STATE"]
