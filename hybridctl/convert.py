"""The ``convert`` workflow: any readable checkpoint → native | hf | megatron | megatron-legacy.

The source format is detected from content (checkpoint.open_checkpoint); the target is a table lookup
(checkpoint.writers.WRITERS: one plan/write signature for every format). Writers stream tensor by tensor into a
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
from typing import TYPE_CHECKING, Any

from hybridctl.config import HybridctlError

if TYPE_CHECKING:
    from hybridctl.checkpoint import Source

log = logging.getLogger(__name__)
TARGETS = ("native", "hf", "megatron", "megatron-legacy")  # = checkpoint.writers.WRITERS, in --help order


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


def _auto_vocab(source: Source, to: str, vocab_size: int | None, notes: list[str]) -> int | None:
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


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # only on a terminal: bar residue would otherwise precede an error line in a log
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled or not sys.stderr.isatty(),
                leave=False)


def convert(*, src: str | Path, to: str, out: str | Path | None, dtype: str | None = None, shard_size: str = "5GB",
            hf_arch: str = "auto", tp: int = 1, pp: int = 1, megatron_keys: str = "current",
            iteration: int | str | None = None, trust_pickle: bool = False, vocab_size: int | None = None,
            overwrite: bool = False, progress: bool = True, dry_run: bool = False) -> ConvertResult:
    """Convert the checkpoint at ``src`` to format ``to`` in ``out``; returns what was (or would be) written."""
    from hybridctl.checkpoint import detect_format, open_checkpoint
    from hybridctl.checkpoint.io import parse_size
    from hybridctl.checkpoint.native import dtype_name, torch_dtype
    from hybridctl.checkpoint.writers import WRITERS, WriteOptions

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
    writer = WRITERS[to]
    opts = WriteOptions(dtype=tdtype, vocab_size=vocab_size, max_shard_size=shard_size, overwrite=overwrite,
                        hf_arch=hf_arch, tp=tp, pp=pp, megatron_keys=megatron_keys,
                        extra={"converted_from": source.format})
    plan = writer.plan(source, opts)
    notes += plan.notes
    files: list[str] = []
    if not dry_run:
        with _progress(plan.units(), progress, f"convert → {to}") as bar:
            files = writer.write(out, plan, opts, bar.update)
    final = plan.src
    tok_from = None if final.tokenizer_dir is None else str(final.tokenizer_dir)
    if tok_from is None:
        log.info("convert: the source carries no tokenizer: none is written (generate will need --tokenizer)")
    for n in notes:
        log.info("convert: %s", n)
    cfg = final.config
    return ConvertResult(src=src, src_format=source.format, to=to, out=None if dry_run else out, dry_run=dry_run,
                         arch=plan.arch, pattern=cfg.pattern, n_tensors=plan.n_tensors, nbytes=plan.nbytes,
                         dtype=dtype_name(tdtype or final.dtype), vocab_size=cfg.vocab_size,
                         tied=cfg.tie_embeddings, files=files, notes=notes, seconds=time.perf_counter() - t0,
                         tokenizer=tok_from)
