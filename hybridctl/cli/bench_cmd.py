"""`hybridctl bench`: speed, memory and quality of checkpoints and presets side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hybridctl.cli.common import (MAX_NEW_TOKENS, SEED_MAX, BackendOpt, DeviceOpt, JsonOpt, SeedOpt, VerboseOpt, app,
                                  check_numbers, errors, print_json, setup_logging)


@app.command(epilog="The first model is the baseline: each speed row shows its ratio to it. --json prints one object"
             " (schema in the README's bench section).\n\nExamples:\n\n"
             "  hybridctl bench --preset tiny\n\n"
             "  hybridctl bench --preset hybrid-1.3b --preset transformer-8b --batch 1,8,64 --prompt-len 1024,16384 "
             "--dtype bfloat16 --json\n\n"
             "  hybridctl bench runs/a/final runs/b/final --task needle --lengths 1024,4096 --depths 0,0.5,1 "
             "--no-speed --plot plots/\n\n"
             "  hybridctl bench runs/a/final --ppl held_out.txt --lengths 2048 --no-speed\n\n"
             "  hybridctl bench --preset hybrid-8b --batch 1,64 --prompt-len 131072 --dry-run")
@errors
def bench(
    ckpts: Annotated[Optional[list[Path]], typer.Argument(help="Checkpoint directories (any format).",
                                                          show_default=False)] = None,
    preset: Annotated[Optional[list[str]], typer.Option(
        "--preset", help="A preset with random weights (repeatable; after the checkpoints).")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,4",
    prompt_len: Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated.")] = "128,512",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per row and rep.")] = 32,
    reps: Annotated[int, typer.Option(help="Timed repetitions per row.")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed runs first (compile, packing, graph capture).")] = 1,
    device: DeviceOpt = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="Compute dtype (default: a checkpoint's own; presets bfloat16 on CUDA, float32 on CPU).")] = None,
    state_dtype: Annotated[str, typer.Option(help="SSM state dtype: float32 | bfloat16.")] = "float32",
    backend: BackendOpt = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure the speed grid.")] = True,
    ppl: Annotated[Optional[Path], typer.Option(help="Perplexity over this UTF-8 text file, by position.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Accuracy sweep: phonebook | needle | copy.")] = None,
    lengths: Annotated[str, typer.Option(help="Task prompt lengths (the --ppl window: the largest).")
                       ] = "1024,2048,4096",
    depths: Annotated[Optional[str], typer.Option(
        help="Target depths, 0..1 or 0%..100% (default: needle 0,0.25,0.5,0.75,1; phonebook 0,0.5,1).")] = None,
    samples: Annotated[int, typer.Option(help="Examples per task cell.")] = 4,
    plot: Annotated[Optional[Path], typer.Option(help="Write PNG plots into this directory.")] = None,
    memory_limit: Annotated[Optional[float], typer.Option(
        help="GiB a row may use (default: 90% of the device's memory; the host's available memory on CPU).")] = None,
    bandwidth: Annotated[Optional[float], typer.Option(
        help="Memory bandwidth in GB/s for the roofline column (default: measured).")] = None,
    seed: SeedOpt = 0,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's own).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the grid and memory estimates; run nothing.")]
    = False,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure speed, memory and quality of checkpoints and presets side by side, on generate's decode runtime."""
    setup_logging(verbose)
    check_numbers(new_tokens=(new_tokens, 1, MAX_NEW_TOKENS), reps=(reps, 1, 10_000), warmup=(warmup, 0, 10_000),
                   samples=(samples, 1, 1_000_000), memory_limit=(memory_limit, 1e-6, None),
                   bandwidth=(bandwidth, 1e-6, None), seed=(seed, 0, SEED_MAX), threads=(threads, 1, 4096))
    from hybridctl.bench import bench as run, parse_depths, parse_ints
    from hybridctl.bench_report import format_report

    res = run(checkpoints=ckpts or [], presets=preset or [], batch=parse_ints(batch, "--batch"),
              prompt_len=parse_ints(prompt_len, "--prompt-len"), new_tokens=new_tokens, reps=reps, warmup=warmup,
              device=device, dtype=dtype, state_dtype=state_dtype, backend=backend, speed=speed, ppl=ppl, task=task,
              lengths=parse_ints(lengths, "--lengths"), depths=parse_depths(depths) if depths else None,
              samples=samples, plot=plot, dry_run=dry_run, memory_limit_gib=memory_limit, bandwidth_gbps=bandwidth,
              seed=seed, threads=threads)
    if json_:
        return print_json(res, device=res["environment"]["device"], dtype=res["models"][0]["dtype"])
    typer.echo(format_report(res))
