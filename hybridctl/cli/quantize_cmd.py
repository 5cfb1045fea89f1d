"""`hybridctl quantize`: weight-only int8 / int4, with the quality it cost."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from hybridctl.cli.common import (CkptArg, JsonOpt, OutOpt, VerboseOpt, app, errors, fmt_bytes, print_json,
                                  setup_logging, table)


@app.command(epilog="Examples:\n\n  hybridctl quantize runs/tiny/final --out q8\n\n"
             "  hybridctl quantize ckpt --method int4 --group-size 128 --calib builtin --out q4\n\n"
             "  hybridctl quantize ckpt --method int4 --policy aggressive --include-head --dry-run --json")
@errors
def quantize(
    src: CkptArg,
    out: OutOpt = None,
    method: Annotated[str, typer.Option(help="int8 (per output channel) | int4 (group-wise).")] = "int8",
    group_size: Annotated[int, typer.Option(help="int4 group size: 32 | 64 | 128.")] = 128,
    policy: Annotated[str, typer.Option(help="default (Mamba + MLP projections) | aggressive (+ attention) | "
                                        "conservative (MLP only).")] = "default",
    calib: Annotated[Optional[str], typer.Option(help="Calibration data (any train data source): GPTQ instead of "
                                                 "round-to-nearest.")] = None,
    eval_data: Annotated[str, typer.Option(help="Held-out text for the perplexity / greedy comparison "
                                           "('none' skips it).")] = "builtin",
    include_head: Annotated[bool, typer.Option("--include-head", help="Quantize the LM head too.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-tensor plan; write nothing.")] = False,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Weight-only int8 / int4 quantization that keeps the Mamba-critical tensors (A_log, D, dt_bias, conv1d, norms,
    embeddings) dense: writes a native checkpoint that generate runs, and reports the quality it cost."""
    setup_logging(verbose)
    from hybridctl.quantize import quantize as run

    res = run(source=src, out=out, method=method, group_size=group_size, policy=policy, include_head=include_head,
              calib=calib, eval_data=None if eval_data == "none" else eval_data, dry_run=dry_run)
    if json_:
        return print_json(res.summary(), device="cpu", dtype=method)
    if dry_run:
        typer.echo("\n".join(f"{r.name:<40} {'x'.join(map(str, r.shape)):>12}  {r.action:<9} "
                             f"{fmt_bytes(r.bytes_before):>9} → {fmt_bytes(r.bytes_after):>9}  {r.reason}"
                             for r in res.plan))
    ev = res.eval or {}
    rows = [("source", str(res.source)),
            ("method", f"{res.method}" + (f" g{res.group_size}" if res.group_size else "")
             + f", {res.calibration}, policy {res.policy}"),
            ("tensors", f"{len(res.modules)} quantized of {len(res.plan)}"),
            ("weights", f"{fmt_bytes(res.bytes_before)} → {fmt_bytes(res.bytes_after)}"),
            ("output", "(dry run: nothing written)" if res.dry_run else f"{res.out} ({res.seconds:.1f} s)")]
    if ev:
        rows += [("perplexity", f"{ev['ppl_source']:.4f} → {ev['ppl_quantized']:.4f} "
                                f"({100 * ev['ppl_change']:+.2f}%)"),
                 ("greedy", f"{100 * ev['greedy_agreement']:.1f}% of {ev['greedy_tokens']} tokens agree "
                  f"(identical for the first {ev['greedy_identical_prefix']})")]
    typer.echo(table(rows + [("note", n) for n in res.notes]))
