"""Every checkpoint writer behind one signature, so ``convert`` is a table lookup (``WRITERS[to]``).

A target is a ``Writer``:

- ``plan(src: Source, opts: WriteOptions) -> WritePlan``: validate the export (architecture, representability,
  vocab, tokenizer) and say what would be written; writes nothing (``--dry-run`` stops here);
- ``write(out: Path, plan: WritePlan, opts: WriteOptions, progress: Callable[[int], None] | None) -> list[str]``:
  stream ``plan.src`` tensor by tensor into a temporary directory renamed to ``out`` when complete (a failure leaves
  nothing); returns the file names written. ``progress(1)`` is called ``plan.units()`` times.

The format modules keep their own entry functions (``write_native``, ``write_hf``, ``write_megatron_dist``,
``write_megatron_legacy``); this module adapts each to the one signature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridctl.checkpoint.source import Source, specs_nbytes

Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class WriteOptions:
    """What a writer may be told. dtype: of the written floating tensors (None: as stored); vocab_size: strip the
    embedding/head to this many rows (Megatron padding); hf_arch: hf only; tp / pp / megatron_keys: megatron-legacy
    only; extra: native only (more config.json keys, e.g. converted_from)."""

    dtype: torch.dtype | None = None
    vocab_size: int | None = None
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    hf_arch: str = "auto"
    tp: int = 1
    pp: int = 1
    megatron_keys: str = "current"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class WritePlan:
    """What a writer will write: the source it streams (vocab stripped; cast where the format stores ``get()`` as
    it is), the counts the summary reports, the progress units (a function: counting may validate more, and only a
    real write needs it), notes, the architecture (hf) and the format's own plan (``detail``: hf's HFPlan)."""

    src: Source
    n_tensors: int
    nbytes: int
    units: Callable[[], int]
    notes: list[str] = field(default_factory=list)
    arch: str | None = None
    detail: Any = None


@dataclass(frozen=True)
class Writer:
    plan: Callable[[Source, WriteOptions], WritePlan]
    write: Callable[[Path, WritePlan, WriteOptions, Progress], list[str]]


def _listing(out: Path) -> list[str]:
    return sorted(p.name for p in Path(out).iterdir())


def _check_tokenizer(final: Source) -> None:
    """The tokenizer carried along must fit the (possibly --vocab-size stripped) embedding: refused before writing."""
    if final.tokenizer_dir is None:
        return
    from hybridctl.checkpoint.io import check_tokenizer_fits
    from hybridctl.tokenizer import load_tokenizer

    where = f"{final.path}" + (" (--vocab-size)" if "vocab_stripped_from" in final.info else "")
    check_tokenizer_fits(load_tokenizer(final.tokenizer_dir), final.config.vocab_size, where)


def _stripped(src: Source, opts: WriteOptions) -> Source:
    from hybridctl.checkpoint.hf import strip_vocab

    final = strip_vocab(src, opts.vocab_size) if opts.vocab_size is not None else src
    _check_tokenizer(final)
    return final


def _cast(src: Source, dtype: torch.dtype) -> Source:
    """A view of ``src`` whose tensors come out in ``dtype``."""
    get = src.get
    return dataclasses.replace(src, specs={k: (s, dtype) for k, (s, _) in src.specs.items()},
                               get=lambda name: get(name).to(dtype))


# ---- native ---------------------------------------------------------------------------------------------------------


def _plan_native(src: Source, opts: WriteOptions) -> WritePlan:
    final = _stripped(src, opts)
    notes = ([f"vocab: {final.info['vocab_stripped_from']} → {opts.vocab_size} rows (padding removed)"]
             if "vocab_stripped_from" in final.info else [])
    n = len(final.specs)
    return WritePlan(final, n, specs_nbytes(final.specs, opts.dtype), lambda: n, notes)


def _write_native(out: Path, plan: WritePlan, opts: WriteOptions, progress: Progress) -> list[str]:
    from hybridctl.checkpoint.native import write_native

    f = plan.src
    write_native(out, config=f.config, specs=f.specs, get=f.get, dtype=opts.dtype, tokenizer_dir=f.tokenizer_dir,
                 max_shard_size=opts.max_shard_size, overwrite=opts.overwrite, extra=opts.extra, progress=progress,
                 validated=f.validated)
    return _listing(out)


# ---- hf -------------------------------------------------------------------------------------------------------------


def _plan_hf(src: Source, opts: WriteOptions) -> WritePlan:
    from hybridctl.checkpoint.hf import plan_hf

    if src.info.get("quantization") is not None:  # integer weights: the compressed-tensors layout (compressed.py)
        from hybridctl.checkpoint import compressed

        hf, packed = compressed.plan_compressed(src, arch=opts.hf_arch, dtype=opts.dtype, vocab_size=opts.vocab_size)
        n = len(hf.specs)
        return WritePlan(packed.view, n, specs_nbytes(hf.specs), lambda: n, list(hf.notes), arch=hf.arch,
                         detail=(hf, packed))
    hf, stripped = plan_hf(src, arch=opts.hf_arch, dtype=opts.dtype, vocab_size=opts.vocab_size)
    n = len(hf.specs)
    return WritePlan(stripped, n, specs_nbytes(hf.specs), lambda: n, list(hf.notes), arch=hf.arch, detail=hf)


def _write_hf(out: Path, plan: WritePlan, opts: WriteOptions, progress: Progress) -> list[str]:
    from hybridctl.checkpoint.hf import write_hf

    if isinstance(plan.detail, tuple):  # a quantized source (_plan_hf)
        from hybridctl.checkpoint import compressed

        hf, packed = plan.detail
        return compressed.write_compressed(out, hf, packed, max_shard_size=opts.max_shard_size,
                                           overwrite=opts.overwrite, progress=progress).files
    return write_hf(out, plan.src, max_shard_size=opts.max_shard_size, overwrite=opts.overwrite, progress=progress,
                    plan=plan.detail).files


# ---- megatron (torch_dist) and megatron-legacy ----------------------------------------------------------------------


def _plan_megatron(src: Source, opts: WriteOptions, count: Callable[[Source], int]) -> WritePlan:
    final = _stripped(src, opts)
    n, nbytes = len(final.specs), specs_nbytes(final.specs, opts.dtype)
    if opts.dtype is not None:  # the Megatron writers store what get() returns
        final = _cast(final, opts.dtype)
    return WritePlan(final, n, nbytes, lambda: count(final))


def _plan_dist(src: Source, opts: WriteOptions) -> WritePlan:
    from hybridctl.checkpoint.megatron import count_writes_dist

    return _plan_megatron(src, opts, count_writes_dist)


def _write_dist(out: Path, plan: WritePlan, opts: WriteOptions, progress: Progress) -> list[str]:
    from hybridctl.checkpoint.megatron import write_megatron_dist

    write_megatron_dist(out, plan.src, overwrite=opts.overwrite, progress=progress)
    return _listing(out)


def _plan_legacy(src: Source, opts: WriteOptions) -> WritePlan:
    from hybridctl.checkpoint.megatron import count_writes

    return _plan_megatron(src, opts, lambda f: count_writes(f, tp=opts.tp, pp=opts.pp, keys=opts.megatron_keys))


def _write_legacy(out: Path, plan: WritePlan, opts: WriteOptions, progress: Progress) -> list[str]:
    from hybridctl.checkpoint.megatron import write_megatron_legacy

    write_megatron_legacy(out, plan.src, tp=opts.tp, pp=opts.pp, keys=opts.megatron_keys, overwrite=opts.overwrite,
                          progress=progress)
    return _listing(out)


WRITERS: dict[str, Writer] = {
    "native": Writer(_plan_native, _write_native),
    "hf": Writer(_plan_hf, _write_hf),
    "megatron": Writer(_plan_dist, _write_dist),
    "megatron-legacy": Writer(_plan_legacy, _write_legacy),
}
