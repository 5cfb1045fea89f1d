"""`hybridctl train`: a recipe, trained (one process or many under torchrun)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from hybridctl.cli.common import (BackendOpt, DeviceOpt, JsonOpt, SetOpt, VerboseOpt, app, check_numbers, errors,
                                  fmt_count, print_json, setup_logging, table)


@app.command(epilog="Examples:\n\n  hybridctl train recipes/tiny.toml\n\n"
             "  hybridctl train recipes/tiny.toml --set optim.lr=3e-4 --set data.seq_len=512 --max-steps 20\n\n"
             "  hybridctl train recipes/phonebook.toml --run-dir runs/pb --resume never --json\n\n"
             "  torchrun --nproc-per-node 2 -m hybridctl train recipes/hybrid-1.3b.toml   (FSDP2; gloo on CPU)")
@errors
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file (see recipes/).")],
    set_: SetOpt = None,
    resume: Annotated[str, typer.Option(help="auto (newest complete checkpoint of the run, if any) | never | PATH.")
                      ] = "auto",
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default: the recipe's checkpoint.dir).")
                       ] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this optimizer step (checkpointed; the LR "
                                                     "schedule still spans optim.steps).")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from this checkpoint (native, Hugging Face, "
                                                      "Megatron) instead of the recipe's model section.")] = None,
    device: DeviceOpt = None,
    backend: BackendOpt = None,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train from a recipe (TOML): resumable sharded checkpoints, a native export at the end; one process or many
    (torchrun, FSDP2)."""
    setup_logging(verbose)
    check_numbers(max_steps=(max_steps, 1, None))
    from hybridctl.recipe import load_recipe
    from hybridctl.train import main_entry

    rec = load_recipe(recipe, set_, init_from=init_from)
    res = main_entry(recipe=rec, run_dir=run_dir, resume=resume, device=device, backend=backend, max_steps=max_steps)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    s = res.summary()
    if json_:
        from hybridctl.parallel import resolve_device

        dev = resolve_device(device)
        prec = rec.precision.dtype if rec.precision.dtype != "auto" else (
            "bfloat16" if dev.type == "cuda" else "float32")
        return print_json(s, device=str(dev), dtype=prec)
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    typer.echo(table([("steps", str(s["steps"])), ("tokens", fmt_count(s["tokens"])),
                       ("final loss", f(s["final_loss"], ".4f")),
                       ("eval loss / ppl", f"{f(s['eval_loss'], '.4f')} / {f(s['eval_ppl'], '.2f')}"),
                       ("eval accuracy", f(s["eval_accuracy"], ".3f")), ("wall time", f"{s['wall_s']:.1f} s"),
                       ("tokens/s", f(s["tokens_per_s"], ",.0f")), ("checkpoint", str(s["checkpoint"])),
                       ("export", str(s["export"]))]))
