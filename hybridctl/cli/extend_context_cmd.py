"""`hybridctl extend-context`: continued pretraining to a longer context, planned and evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hybridctl.cli.common import (BackendOpt, CkptArg, DeviceOpt, JsonOpt, SetOpt, VerboseOpt, app, check_numbers,
                                  errors, fmt_bytes, fmt_count, print_json, setup_logging, table)


@app.command("extend-context", epilog="Examples:\n\n"
             "  hybridctl extend-context runs/tiny/final --seq-len 1024 --out runs/tiny-1k --dry-run\n\n"
             "  hybridctl extend-context runs/tiny/final --seq-len 1024 --out runs/tiny-1k --steps 60\n\n"
             "  hybridctl extend-context ckpt --seq-len 16384 --out runs/16k --tokens 2e9 "
             "--mix corpus=0.9,phonebook=0.05,needle=0.05 --json\n\n"
             "  torchrun --nproc-per-node 8 -m hybridctl extend-context ckpt --seq-len 32768 --out runs/32k")
@errors
def extend_context(
    ckpt: CkptArg,
    seq_len: Annotated[int, typer.Option(help="Target context length (above the checkpoint's trained one).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (recipe, checkpoints, report, plots).")],
    tokens: Annotated[Optional[float], typer.Option(help="Token budget (e.g. 2e9); or --steps.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 100 without --tokens).")] = None,
    data: Annotated[str, typer.Option(help="Corpus: builtin | file / directory / glob | Megatron prefix.")
                    ] = "builtin",
    mix: Annotated[Optional[str], typer.Option(help="Row mix by weight, summing to 1, of corpus / phonebook / "
                                               "needle / copy (default corpus=0.8,needle=0.1,phonebook=0.1).")
                   ] = None,
    short_fraction: Annotated[Optional[float], typer.Option(help="Fraction of rows of trained-length sequences "
                                                            "(default 0.2).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak LR (default: a third of the pretraining peak).")] = None,
    set_: SetOpt = None,
    eval_lengths: Annotated[Optional[str], typer.Option(help="Comma-separated lengths (default: trained length, "
                                                        "powers of two, target).")] = None,
    eval_examples: Annotated[int, typer.Option(help="Examples per task cell.")] = 4,
    rope_base: Annotated[Optional[float], typer.Option(help="RoPE base for rotary attention (default NTK rule).")
                         ] = None,
    base_seq_len: Annotated[Optional[int], typer.Option(help="Trained length when the config has no "
                                                        "max_seq_len.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    resume: Annotated[str, typer.Option(help="auto | never | PATH (as train).")] = "auto",
    device: DeviceOpt = None,
    backend: BackendOpt = None,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Continued pretraining to a longer context: a planned recipe (saved as DIR/recipe.toml, rerunnable by train),
    resumable training, long-context evaluation before/after (DIR/report.json, DIR/plots/)."""
    setup_logging(verbose)
    check_numbers(seq_len=(seq_len, 2, None), tokens=(tokens, 1, None), steps=(steps, 1, None))
    from hybridctl import extend_context as ec

    plan = ec.plan_extension(checkpoint=ckpt, seq_len=seq_len, out=out, tokens=None if tokens is None else
                             int(tokens), steps=steps, data=data, mix=mix, short_fraction=short_fraction, lr=lr,
                             overrides=set_, eval_lengths=eval_lengths, eval_examples=eval_examples,
                             rope_base=rope_base, base_seq_len=base_seq_len, device=device, backend=backend)
    if dry_run:
        s = plan.summary()
        return print_json(s, device=s["device"], dtype="auto") if json_ else typer.echo(_extend_table(s))
    from hybridctl.train import main_entry

    res = ec.run_extension(plan, train_fn=main_entry, resume=resume, device=device, backend=backend)
    if res is None:  # a torchrun rank other than 0
        return None
    s = res.summary()
    if json_:
        return print_json(s, device=plan.device, dtype="auto")
    typer.echo(table([("run dir", s["run_dir"]), ("report", s["report"]), ("plots", ", ".join(s["plots"]))]
                      + [(k, f"{v['before']:.3g} → {v['after']:.3g}") for k, v in s.items() if k.startswith("ppl")
                         and v["before"] is not None and v["after"] is not None]))


def _extend_table(s: dict) -> str:
    m, i = s["memory"], s["inference"]
    b = fmt_bytes
    return table([
        ("checkpoint", f"{s['checkpoint']} ({fmt_count(s['parameters'])} parameters, trained at {s['base_seq_len']})"),
        ("target", f"{s['seq_len']} tokens, {s['steps']} steps, {fmt_count(s['tokens'])} tokens"),
        ("batch", f"global {s['global_batch']}, micro {s['micro_batch']} × {s['world_size']} device(s), "
                  f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}"),
        ("lr", f"{s['lr']['peak']:.3g} → {s['lr']['min']:.3g} {s['lr']['schedule']}, "
               f"warm-up {s['lr']['warmup_steps']}"),
        ("data", f"{s['data']['source']}, mix {s['data']['mix']}, short {s['data']['short_fraction']:g}"),
        ("params+grads+AdamW", b(m["params"] + m["grads"] + m["optimizer"])),
        ("activations/micro-batch", f"{b(m['activations'])} (checkpointed {b(m['activations_checkpointed'])})"),
        ("training peak", f"{b(m['total'])} (checkpointed {b(m['total_checkpointed'])}), limit {b(m['limit'])}"),
        ("inference/sequence", f"SSM state {b(i['ssm_state_bytes'])} + KV {b(i['kv_cache_bytes'])}; Transformer "
                               f"{i['transformer_pattern'][:12]}… KV {b(i['transformer_kv_bytes'])}"),
        ("rope", "unchanged (NoPE)" if s["rope"] is None else f"{s['rope']['old']:g} → {s['rope']['new']:.6g}"),
        ("fits", f"{'yes' if s['fits'] else 'no'} on {s['device']}"),
        ("eval lengths", ", ".join(map(str, s["eval_lengths"])))])
