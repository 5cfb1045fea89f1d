"""The ``convert`` workflow: any readable checkpoint → native | hf | megatron | megatron-legacy.

The source format is detected from content (checkpoint.open_checkpoint). Writers stream tensor by tensor into a
temporary directory renamed when complete, so peak memory stays near one output shard and a failure leaves nothing.
``dry_run`` opens and validates the source and the target plan (architecture, representability, vocab) and reports
it without writing.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridctl.config import HybridctlError

log = logging.getLogger(__name__)
TARGETS = ("native", "hf", "megatron", "megatron-legacy")


@dataclass
class ConvertResult:
    src: Path
    src_format: str
    to: str
    out: Path | None
    dry_run: bool
    arch: str | None  # hf: nemotron_h | mamba2
    pattern: str
    n_tensors: int
    nbytes: int
    dtype: str
    vocab_size: int
    tied: bool
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tokenizer: str | None = None  # where the carried tokenizer came from; None: the source has none, none written

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["src"], d["out"] = str(self.src), (str(self.out) if self.out else None)
        d["tokenizer"] = self.tokenizer
        return d


def _check_options(to: str, out: Path | None, src: Path, dry_run: bool, overwrite: bool, hf_arch: str, tp: int,
                   pp: int, megatron_keys: str) -> None:
    """Refuse option combinations that would be silently ignored, before touching any file."""
    if to not in TARGETS:
        raise HybridctlError(f"--to {to!r} is unknown; use one of {', '.join(TARGETS)}")
    if out is None and not dry_run:
        raise HybridctlError("--out is required (or use --dry-run)")
    if out is not None and not dry_run:
        from hybridctl.checkpoint.io import check_out_path

        check_out_path(out, [src])
        if Path(out).exists() and not overwrite and (not Path(out).is_dir() or any(Path(out).iterdir())):
            raise HybridctlError(f"{out}: already exists (choose another --out, or pass --force)")
    if hf_arch != "auto" and to != "hf":
        raise HybridctlError("--hf-arch applies only to --to hf")
    if (tp, pp) != (1, 1) and to != "megatron-legacy":
        raise HybridctlError("--tp/--pp apply only to --to megatron-legacy (torch_dist checkpoints are global)")
    if tp < 1 or pp < 1:
        raise HybridctlError(f"--tp and --pp must be >= 1, got {tp}, {pp}")
    if megatron_keys != "current" and to != "megatron-legacy":
        raise HybridctlError("--megatron-keys applies only to --to megatron-legacy")


def _check_source_options(fmt: str, src: Path, iteration: int | str | None, trust_pickle: bool) -> None:
    """--iteration / --trust-pickle mean something only for Megatron sources; refuse them for others rather than
    ignore them (the format is known by now, from the files' contents)."""
    if fmt == "megatron":
        return
    given = [o for o, v in (("--iteration", iteration is not None), ("--trust-pickle", trust_pickle)) if v]
    if given:
        raise HybridctlError(f"{' and '.join(given)} apply only to Megatron checkpoints; {src} is a {fmt} "
                             "checkpoint")


def _write_units(to: str, final: Any, n_tensors: int, tp: int, pp: int, megatron_keys: str) -> int:
    """How many times the writer for ``to`` calls progress(1): the progress bar's total."""
    if to == "megatron":
        from hybridctl.checkpoint.megatron import count_writes_dist

        return count_writes_dist(final)
    if to == "megatron-legacy":
        from hybridctl.checkpoint.megatron import count_writes

        return count_writes(final, tp=tp, pp=pp, keys=megatron_keys)
    return n_tensors  # native and hf: one tick per written tensor


def _auto_vocab(source: Any, to: str, vocab_size: int | None, notes: list[str]) -> int | None:
    """Megatron pads the vocab; exporting such a checkpoint strips the padding to the tokenizer's size — said out
    loud in the notes, never silently. An explicit --vocab-size always wins."""
    if vocab_size is not None or to != "hf" or not source.format.startswith("megatron"):
        return vocab_size
    n, why = source.info.get("vocab_size_unpadded"), "the checkpoint's unpadded vocab_size"
    if n is None and source.tokenizer_dir is not None:
        from hybridctl.tokenizer import load_tokenizer

        n, why = load_tokenizer(source.tokenizer_dir).vocab_size, "the tokenizer's size"
    if n is not None and n < source.config.vocab_size:
        notes.append(f"vocab: Megatron padding stripped, {source.config.vocab_size} → {n} rows ({why}); pass "
                     "--vocab-size to choose otherwise")
        return n
    return None


def _check_tokenizer(final: Any) -> None:
    """The tokenizer carried along must fit the (possibly --vocab-size stripped) embedding: refused before writing."""
    if final.tokenizer_dir is None:
        return
    from hybridctl.checkpoint.io import check_tokenizer_fits
    from hybridctl.tokenizer import load_tokenizer

    where = f"{final.path}" + (" (--vocab-size)" if "vocab_stripped_from" in final.info else "")
    check_tokenizer_fits(load_tokenizer(final.tokenizer_dir), final.config.vocab_size, where)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # only on a terminal: bar residue would otherwise precede an error line in a log
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled or not sys.stderr.isatty(),
                leave=False)


def _megatron_writer(to: str):
    try:
        from hybridctl.checkpoint import megatron
    except ImportError:
        megatron = None
    name = "write_megatron_dist" if to == "megatron" else "write_megatron_legacy"
    fn = getattr(megatron, name, None)
    if fn is None:
        raise HybridctlError(f"--to {to}: the Megatron writer is not available in this build yet")
    return fn


def convert(*, src: str | Path, to: str, out: str | Path | None, dtype: str | None = None, shard_size: str = "5GB",
            hf_arch: str = "auto", tp: int = 1, pp: int = 1, megatron_keys: str = "current",
            iteration: int | str | None = None, trust_pickle: bool = False, vocab_size: int | None = None,
            overwrite: bool = False, progress: bool = True, dry_run: bool = False) -> ConvertResult:
    """Convert the checkpoint at ``src`` to format ``to`` in ``out``; returns what was (or would be) written."""
    from hybridctl.checkpoint import detect_format, open_checkpoint, specs_nbytes
    from hybridctl.checkpoint.hf import plan_hf, strip_vocab, write_hf
    from hybridctl.checkpoint.io import parse_size
    from hybridctl.checkpoint.native import dtype_name, torch_dtype, write_native

    t0 = time.perf_counter()
    src, out = Path(src), (Path(out) if out is not None else None)
    _check_options(to, out, src, dry_run, overwrite, hf_arch, tp, pp, megatron_keys)
    tdtype = torch_dtype(dtype) if dtype else None
    parse_size(shard_size)  # validate early
    _check_source_options(detect_format(src), src, iteration, trust_pickle)
    source = open_checkpoint(src, iteration=iteration, trust_pickle=trust_pickle)
    quantized = source.info.get("quantization") is not None
    if quantized:  # integer weights: only the compressed-tensors HF layout holds them (checkpoint/compressed.py)
        from hybridctl.checkpoint import compressed

        compressed.refuse_target(source, to)
    notes = list(source.info.get("notes", []))
    vocab_size = _auto_vocab(source, to, vocab_size, notes)
    arch, files = None, []
    if to == "hf":
        if quantized:
            plan, packed = compressed.plan_compressed(source, arch=hf_arch, dtype=tdtype, vocab_size=vocab_size)
            stripped = packed.view
        else:
            plan, stripped = plan_hf(source, arch=hf_arch, dtype=tdtype, vocab_size=vocab_size)
        arch, n_tensors, nbytes = plan.arch, len(plan.specs), specs_nbytes(plan.specs)
        notes += plan.notes
        if not dry_run:
            with _progress(n_tensors, progress, "convert → hf") as bar:
                if quantized:
                    plan = compressed.write_compressed(out, plan, packed, max_shard_size=shard_size,
                                                       overwrite=overwrite, progress=bar.update)
                else:
                    plan = write_hf(out, stripped, max_shard_size=shard_size, overwrite=overwrite,
                                    progress=bar.update, plan=plan)
            files = plan.files
        final = stripped
    else:
        final = strip_vocab(source, vocab_size) if vocab_size is not None else source
        if "vocab_stripped_from" in final.info and to == "native":
            notes.append(f"vocab: {final.info['vocab_stripped_from']} → {vocab_size} rows (padding removed)")
        _check_tokenizer(final)
        n_tensors = len(final.specs)
        nbytes = specs_nbytes(final.specs, tdtype)
        writer = _megatron_writer(to) if to != "native" else None
        if writer is not None and tdtype is not None:  # the Megatron writers store what get() returns
            final = _cast(final, tdtype)
        if not dry_run:
            total = _write_units(to, final, n_tensors, tp, pp, megatron_keys)
            with _progress(total, progress, f"convert → {to}") as bar:
                if to == "native":
                    write_native(out, config=final.config, specs=final.specs, get=final.get, dtype=tdtype,
                                 tokenizer_dir=final.tokenizer_dir, max_shard_size=shard_size, overwrite=overwrite,
                                 extra={"converted_from": source.format}, progress=bar.update,
                                 validated=final.validated)
                elif to == "megatron":
                    writer(out, final, overwrite=overwrite, progress=bar.update)
                else:
                    writer(out, final, tp=tp, pp=pp, keys=megatron_keys, overwrite=overwrite, progress=bar.update)
            files = sorted(p.name for p in Path(out).iterdir())
    tok_from = None if final.tokenizer_dir is None else str(final.tokenizer_dir)
    if tok_from is None:
        log.info("convert: the source carries no tokenizer: none is written (generate will need --tokenizer)")
    for n in notes:
        log.info("convert: %s", n)
    cfg = final.config
    return ConvertResult(src=src, src_format=source.format, to=to, out=None if dry_run else out, dry_run=dry_run,
                         arch=arch, pattern=cfg.pattern, n_tensors=n_tensors, nbytes=nbytes,
                         dtype=dtype_name(tdtype or final.dtype), vocab_size=cfg.vocab_size,
                         tied=cfg.tie_embeddings, files=files, notes=notes, seconds=time.perf_counter() - t0,
                         tokenizer=tok_from)


def _cast(src: Any, dtype: Any) -> Any:
    """A view of ``src`` whose tensors come out in ``dtype``."""
    import dataclasses

    get = src.get
    return dataclasses.replace(src, specs={k: (s, dtype) for k, (s, _) in src.specs.items()},
                               get=lambda name: get(name).to(dtype))
