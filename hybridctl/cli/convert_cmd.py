"""`hybridctl convert`: between native, Hugging Face and Megatron checkpoints."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from hybridctl.cli.common import (CkptArg, JsonOpt, OutOpt, VerboseOpt, app, check_numbers, errors, fmt_bytes,
                                  print_json, setup_logging, table)


@app.command(epilog="Examples:\n\n  hybridctl convert runs/tiny --to hf --out export/tiny-hf\n\n"
             "  hybridctl convert nvidia-nemotron-h-dir --to native --out ckpt --dtype bfloat16\n\n"
             "  hybridctl convert ckpt --to hf --hf-arch mamba2 --shard-size 2GB --out hf/ --json\n\n"
             "  hybridctl convert megatron-run/ --to hf --vocab-size 256000 --out hf/ --dry-run")
@errors
def convert(
    src: CkptArg,
    to: Annotated[str, typer.Option(help="Target: native | hf | megatron (torch_dist) | megatron-legacy.")],
    out: OutOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="Cast weights: float32 | bfloat16 | float16 (default: "
                                                 "keep).")] = None,
    shard_size: Annotated[str, typer.Option(help="Largest safetensors shard (e.g. 5GB, 500MB).")] = "5GB",
    hf_arch: Annotated[str, typer.Option(help="auto (Mamba2ForCausalLM when all layers are Mamba-2, else "
                                         "NemotronH) | nemotron_h | mamba2.")] = "auto",
    tp: Annotated[int, typer.Option(help="Tensor-parallel size (megatron-legacy).")] = 1,
    pp: Annotated[int, typer.Option(help="Pipeline-parallel size (megatron-legacy).")] = 1,
    megatron_keys: Annotated[str, typer.Option(help="Megatron key style for megatron-legacy: current | "
                                               "2024.")] = "current",
    iteration: Annotated[Optional[str], typer.Option(help="Megatron source iteration (default: latest).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Megatron source: allow pickled objects beyond the "
                                               "allowlist.")] = False,
    vocab_size: Annotated[Optional[int], typer.Option(help="Keep only the first N vocab rows (strip padding).")
                          ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; write nothing.")] = False,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Convert between native, Hugging Face (NemotronH, Mamba2ForCausalLM, mamba_ssm) and Megatron checkpoints:
    streamed tensor by tensor, written atomically, refusing anything the target cannot represent exactly."""
    setup_logging(verbose)
    check_numbers(tp=(tp, 1, 4096), pp=(pp, 1, 4096), vocab_size=(vocab_size, 1, 2**31 - 1))
    from hybridctl.convert import convert as run

    it = int(iteration) if iteration is not None and iteration.isdigit() else iteration
    res = run(src=src, to=to, out=out, dtype=dtype, shard_size=shard_size, hf_arch=hf_arch, tp=tp, pp=pp,
              megatron_keys=megatron_keys, iteration=it, trust_pickle=trust_pickle, vocab_size=vocab_size,
              overwrite=force, progress=not json_, dry_run=dry_run)
    if json_:
        return print_json(res.to_dict(), device="cpu", dtype=res.dtype)
    rows = [("source", f"{res.src} ({res.src_format})"), ("target", res.to + (f" ({res.arch})" if res.arch else "")),
            ("pattern", res.pattern), ("tensors", f"{res.n_tensors}, {fmt_bytes(res.nbytes)} {res.dtype}"),
            ("vocab", f"{res.vocab_size}" + (" (tied embeddings)" if res.tied else "")),
            ("tokenizer", res.tokenizer or "none found in the source: none written"),
            ("output", "(dry run: nothing written)" if res.dry_run else f"{res.out} ({len(res.files)} files, "
             f"{res.seconds:.1f} s)")]
    typer.echo(table(rows + [("note", n) for n in res.notes]))
