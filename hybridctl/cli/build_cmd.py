"""`hybridctl build`: a model from a preset, a layer pattern or ratios, summarised; optionally written."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from hybridctl.cli.common import (SEED_MAX, DtypeOpt, JsonOpt, OutOpt, SeedOpt, SetOpt, VerboseOpt, app,
                                  check_numbers, errors, fmt_bytes, fmt_count, print_json, setup_logging, table)


@app.command(epilog="Examples:\n\n  hybridctl build --preset hybrid-8b\n\n"
             "  hybridctl build --layers 48 --attention-ratio 0.08 --mlp-ratio 0.5 --set d_model=1024 --json\n\n"
             "  hybridctl build --pattern 'M-M*-M-' --set vocab_size=512 --out runs/init")
@errors
def build(
    preset: Annotated[Optional[str], typer.Option(help="Preset name (hybrid-8b, mamba2-8b, transformer-8b, tiny, "
                                                  "hybrid-130m/370m/1.3b/2.7b).")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="Layer pattern: M Mamba-2, * attention, - MLP.")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Number of layers for ratio allocation.")] = None,
    attention_ratio: Annotated[Optional[float], typer.Option(help="Fraction of attention layers.")] = None,
    mlp_ratio: Annotated[Optional[float], typer.Option(help="Fraction of MLP layers.")] = None,
    set_: SetOpt = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "float32",
    out: OutOpt = None,
    seq_len: Annotated[int, typer.Option(help="Sequence length for FLOPs and KV memory figures.")] = 4096,
    skip_memory_check: Annotated[bool, typer.Option(help="With --out: skip the RAM/disk check made before "
                                                    "allocating the model.")] = False,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Build a model from a preset, a layer pattern or Megatron's ratio allocation; summarise it; with --out write an
    initialised native checkpoint (built on meta otherwise: the 8B presets cost nothing)."""
    setup_logging(verbose)
    check_numbers(layers=(layers, 1, 100_000), attention_ratio=(attention_ratio, 0, 1), mlp_ratio=(mlp_ratio, 0, 1),
                   seed=(seed, 0, SEED_MAX), seq_len=(seq_len, 1, 2**40))
    from hybridctl.build import build as run

    res = run(preset=preset, pattern=pattern, layers=layers, attention_ratio=attention_ratio, mlp_ratio=mlp_ratio,
              overrides=set_, seed=seed, dtype=dtype, out=out, seq_len=seq_len, skip_memory_check=skip_memory_check)
    s = dict(res.summary, out=str(res.out) if res.out else None)
    if json_:
        return print_json(s, device="cpu" if res.out else "meta", dtype=s["dtype"])
    rows = [("pattern", s["pattern"]), ("layers", f"{s['n_layers']}  " + ", ".join(
        f"{v} {k}" for k, v in s["layer_counts"].items())), ("parameters", f"{s['params_total']:,} "
                                                             f"({fmt_count(s['params_total'])})")]
    rows += [(f"  {k}", f"{v:,}") for k, v in s["params_by_type"].items()]
    rows += [(f"FLOPs/token @ {s['seq_len']}", f"{fmt_count(s['flops_per_token_forward'])} forward, "
              f"{fmt_count(s['flops_per_token_training'])} training"),
             ("SSM+conv state / sequence", fmt_bytes(s["state_bytes_per_sequence"])),
             ("KV cache / token", fmt_bytes(s["kv_bytes_per_token"])),
             (f"KV cache @ {s['seq_len']}", fmt_bytes(s["kv_bytes_at_seq_len"])),
             (f"weights ({s['dtype']})", fmt_bytes(s["weights_bytes"]))]
    if res.out:
        rows.append(("checkpoint", str(res.out)))
    typer.echo(table(rows))
