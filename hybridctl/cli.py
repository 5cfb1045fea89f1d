"""The Typer app. Thin: each command parses, calls one entry function, prints a summary.

Heavy imports (torch, the workflows) live inside command bodies so ``hybridctl --help`` is instant. A
``HybridctlError`` becomes one line on stderr and exit code 1; any other exception too, with the traceback only when
``HYBRIDCTL_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperGroup

from hybridctl import __version__
from hybridctl.config import HybridctlError


class _OneLineGroup(TyperGroup):
    """Usage errors (exit 2) as one line plus a pointer to --help, instead of click/rich's multi-line panel."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            from typer import _click as click  # typer >= 0.2x vendors click
        except ImportError:
            import click

        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            code = e.exit_code
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"hybridctl: error: {' '.join(e.format_message().split())}{hint}", err=True)
            code = e.exit_code
        except getattr(click.exceptions, "Abort", getattr(click, "Abort", ())):  # typer's vendored click has none
            typer.echo("hybridctl: error: aborted", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineGroup,
    name="hybridctl",
    help="Build, train, convert, quantize, run and measure hybrid Mamba-2 / attention / MLP language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---- shared options, declared once ---------------------------------------------------------------------------------
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: key=value (repeatable).",
                                                     metavar="KEY=VALUE")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (written atomically).")]
BackendOpt = Annotated[Optional[str], typer.Option(
    "--backend", help="auto | kernel | ref (default: $HYBRIDCTL_BACKEND or auto).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu | cuda | cuda:N (default: cuda if present).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")]
CkptArg = Annotated[Path, typer.Argument(help="Checkpoint directory: native, Hugging Face or Megatron.")]


class _OneLineFormatter(logging.Formatter):
    """A log record as one line: never a traceback or stack (libraries such as torch DCP log their own)."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return " ".join(super().format(record).split())


class _BufferHandler(logging.Handler):
    """Without --verbose: hybridctl's own warnings are held back and printed only if the command succeeds (a failure
    prints its one error line alone); other libraries' records are dropped."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] == "hybridctl":
            self.records.append(record)

    def flush_to_stderr(self) -> None:
        for r in self.records:
            typer.echo(self.format(r), err=True)
        self.records.clear()


_HANDLER: list[logging.Handler] = []


def _setup_logging(verbose: bool) -> None:
    """Route all logging through one handler on the root logger (replacing any earlier one of ours)."""
    root = logging.getLogger()
    for h in _HANDLER:
        root.removeHandler(h)
    _HANDLER.clear()
    if verbose:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        h = _BufferHandler()
    root.addHandler(h)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(verbose)  # --verbose: library warnings as one-line log records
    _HANDLER.append(h)


def _flush_held_logs() -> None:
    for h in _HANDLER:
        if isinstance(h, _BufferHandler):
            h.flush_to_stderr()


@contextlib.contextmanager
def _quiet_libraries() -> Any:
    """Library warnings filtered (unless --verbose); C++ logs errors only. (Progress bars show only on a terminal.)"""
    saved = {k: os.environ.get(k) for k in ("TORCH_CPP_LOG_LEVEL",)}
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        with warnings.catch_warnings():
            if not logging.getLogger().isEnabledFor(logging.INFO):
                warnings.simplefilter("ignore")
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _error_line(e: BaseException) -> str:
    """The one line for an exception reaching the CLI boundary."""
    if isinstance(e, HybridctlError):
        return str(e)
    if isinstance(e, OSError) and (e.filename or e.strerror):
        return f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}"
    if isinstance(e, (MemoryError, OverflowError)):
        return f"{type(e).__name__}: {e or 'out of memory'} (a size in the input or options is too large?)"
    return f"internal error: {type(e).__name__}: {e} (set HYBRIDCTL_DEBUG=1 for a traceback)"


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """HybridctlError (and anything unexpected) → one line on stderr, exit 1; traceback with HYBRIDCTL_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _quiet_libraries():
                rv = fn(*args, **kwargs)
            _flush_held_logs()
            return rv
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("hybridctl: interrupted", err=True)
            raise typer.Exit(130) from None
        except BaseException as e:  # noqa: BLE001 - the CLI boundary (some libraries raise BaseException subclasses)
            if os.environ.get("HYBRIDCTL_DEBUG") == "1":
                raise
            msg = _error_line(e)
            typer.echo(f"hybridctl: error: {' '.join(msg.split())}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _print_json(obj: Any, *, device: str, dtype: str) -> None:
    """One JSON object: the command's result plus hybridctl's version and the resolved device / dtype."""
    obj = dict(obj)
    obj.setdefault("device", device)
    obj.setdefault("dtype", dtype)
    typer.echo(json.dumps({"hybridctl_version": __version__, **obj}, indent=2, default=str))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hybridctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print hybridctl's version and exit.")] = False) -> None:
    """Build, train, convert, quantize, run and measure hybrid Mamba-2 / attention / MLP language models."""


def _check_numbers(**checks: tuple[Any, float | None, float | None]) -> None:
    """Command-line numbers: finite and within [lo, hi] (None: unbounded); the option named in the one error line."""
    import math

    for name, (v, lo, hi) in checks.items():
        if v is None:
            continue
        opt = "--" + name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise HybridctlError(f"{opt} {v}: must be a finite number")
        if lo is not None and v < lo:
            raise HybridctlError(f"{opt} {v}: must be >= {lo:g}")
        if hi is not None and v > hi:
            raise HybridctlError(f"{opt} {v}: must be <= {hi:g}")


SEED_MAX = 2**63 - 1
MAX_NEW_TOKENS = 1 << 20


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


# ---- build ---------------------------------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n  hybridctl build --preset hybrid-8b\n\n"
             "  hybridctl build --layers 48 --attention-ratio 0.08 --mlp-ratio 0.5 --set d_model=1024 --json\n\n"
             "  hybridctl build --pattern 'M-M*-M-' --set vocab_size=512 --out runs/init")
@_errors
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
    _setup_logging(verbose)
    _check_numbers(layers=(layers, 1, 100_000), attention_ratio=(attention_ratio, 0, 1), mlp_ratio=(mlp_ratio, 0, 1),
                   seed=(seed, 0, SEED_MAX), seq_len=(seq_len, 1, 2**40))
    from hybridctl.build import build as run

    res = run(preset=preset, pattern=pattern, layers=layers, attention_ratio=attention_ratio, mlp_ratio=mlp_ratio,
              overrides=set_, seed=seed, dtype=dtype, out=out, seq_len=seq_len, skip_memory_check=skip_memory_check)
    s = dict(res.summary, out=str(res.out) if res.out else None)
    if json_:
        return _print_json(s, device="cpu" if res.out else "meta", dtype=s["dtype"])
    rows = [("pattern", s["pattern"]), ("layers", f"{s['n_layers']}  " + ", ".join(
        f"{v} {k}" for k, v in s["layer_counts"].items())), ("parameters", f"{s['params_total']:,} "
                                                             f"({_fmt_count(s['params_total'])})")]
    rows += [(f"  {k}", f"{v:,}") for k, v in s["params_by_type"].items()]
    rows += [(f"FLOPs/token @ {s['seq_len']}", f"{_fmt_count(s['flops_per_token_forward'])} forward, "
              f"{_fmt_count(s['flops_per_token_training'])} training"),
             ("SSM+conv state / sequence", _fmt_bytes(s["state_bytes_per_sequence"])),
             ("KV cache / token", _fmt_bytes(s["kv_bytes_per_token"])),
             (f"KV cache @ {s['seq_len']}", _fmt_bytes(s["kv_bytes_at_seq_len"])),
             (f"weights ({s['dtype']})", _fmt_bytes(s["weights_bytes"]))]
    if res.out:
        rows.append(("checkpoint", str(res.out)))
    typer.echo(_table(rows))


@app.command(epilog="Examples:\n\n  hybridctl train recipes/tiny.toml\n\n"
             "  hybridctl train recipes/tiny.toml --set optim.lr=3e-4 --set data.seq_len=512 --max-steps 20\n\n"
             "  hybridctl train recipes/phonebook.toml --run-dir runs/pb --resume never --json\n\n"
             "  torchrun --nproc-per-node 2 -m hybridctl train recipes/hybrid-1.3b.toml   (FSDP2; gloo on CPU)")
@_errors
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
    _setup_logging(verbose)
    _check_numbers(max_steps=(max_steps, 1, None))
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
        return _print_json(s, device=str(dev), dtype=prec)
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    typer.echo(_table([("steps", str(s["steps"])), ("tokens", _fmt_count(s["tokens"])),
                       ("final loss", f(s["final_loss"], ".4f")),
                       ("eval loss / ppl", f"{f(s['eval_loss'], '.4f')} / {f(s['eval_ppl'], '.2f')}"),
                       ("eval accuracy", f(s["eval_accuracy"], ".3f")), ("wall time", f"{s['wall_s']:.1f} s"),
                       ("tokens/s", f(s["tokens_per_s"], ",.0f")), ("checkpoint", str(s["checkpoint"])),
                       ("export", str(s["export"]))]))



@app.command("extend-context", epilog="Examples:\n\n"
             "  hybridctl extend-context runs/tiny/final --seq-len 1024 --out runs/tiny-1k --dry-run\n\n"
             "  hybridctl extend-context runs/tiny/final --seq-len 1024 --out runs/tiny-1k --steps 60\n\n"
             "  hybridctl extend-context ckpt --seq-len 16384 --out runs/16k --tokens 2e9 "
             "--mix corpus=0.9,phonebook=0.05,needle=0.05 --json\n\n"
             "  torchrun --nproc-per-node 8 -m hybridctl extend-context ckpt --seq-len 32768 --out runs/32k")
@_errors
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
    _setup_logging(verbose)
    _check_numbers(seq_len=(seq_len, 2, None), tokens=(tokens, 1, None), steps=(steps, 1, None))
    from hybridctl import extend_context as ec

    plan = ec.plan_extension(checkpoint=ckpt, seq_len=seq_len, out=out, tokens=None if tokens is None else
                             int(tokens), steps=steps, data=data, mix=mix, short_fraction=short_fraction, lr=lr,
                             overrides=set_, eval_lengths=eval_lengths, eval_examples=eval_examples,
                             rope_base=rope_base, base_seq_len=base_seq_len, device=device)
    if dry_run:
        s = plan.summary()
        return _print_json(s, device=s["device"], dtype="auto") if json_ else typer.echo(_extend_table(s))
    from hybridctl.train import main_entry

    res = ec.run_extension(plan, train_fn=main_entry, resume=resume, device=device, backend=backend)
    if res is None:  # a torchrun rank other than 0
        return None
    s = res.summary()
    if json_:
        return _print_json(s, device=plan.device, dtype="auto")
    typer.echo(_table([("run dir", s["run_dir"]), ("report", s["report"]), ("plots", ", ".join(s["plots"]))]
                      + [(k, f"{v['before']:.3g} → {v['after']:.3g}") for k, v in s.items() if k.startswith("ppl")
                         and v["before"] is not None and v["after"] is not None]))


def _extend_table(s: dict) -> str:
    m, i = s["memory"], s["inference"]
    b = _fmt_bytes
    return _table([
        ("checkpoint", f"{s['checkpoint']} ({_fmt_count(s['parameters'])} parameters, trained at {s['base_seq_len']})"),
        ("target", f"{s['seq_len']} tokens, {s['steps']} steps, {_fmt_count(s['tokens'])} tokens"),
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


@app.command(epilog="Examples:\n\n  hybridctl convert runs/tiny --to hf --out export/tiny-hf\n\n"
             "  hybridctl convert nvidia-nemotron-h-dir --to native --out ckpt --dtype bfloat16\n\n"
             "  hybridctl convert ckpt --to hf --hf-arch mamba2 --shard-size 2GB --out hf/ --json\n\n"
             "  hybridctl convert megatron-run/ --to hf --vocab-size 256000 --out hf/ --dry-run")
@_errors
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
    _setup_logging(verbose)
    _check_numbers(tp=(tp, 1, 4096), pp=(pp, 1, 4096), vocab_size=(vocab_size, 1, 2**31 - 1))
    from hybridctl.convert import convert as run

    it = int(iteration) if iteration is not None and iteration.isdigit() else iteration
    res = run(src=src, to=to, out=out, dtype=dtype, shard_size=shard_size, hf_arch=hf_arch, tp=tp, pp=pp,
              megatron_keys=megatron_keys, iteration=it, trust_pickle=trust_pickle, vocab_size=vocab_size,
              overwrite=force, progress=not json_, dry_run=dry_run)
    if json_:
        return _print_json(res.to_dict(), device="cpu", dtype=res.dtype)
    rows = [("source", f"{res.src} ({res.src_format})"), ("target", res.to + (f" ({res.arch})" if res.arch else "")),
            ("pattern", res.pattern), ("tensors", f"{res.n_tensors}, {_fmt_bytes(res.nbytes)} {res.dtype}"),
            ("vocab", f"{res.vocab_size}" + (" (tied embeddings)" if res.tied else "")),
            ("tokenizer", res.tokenizer or "none found in the source: none written"),
            ("output", "(dry run: nothing written)" if res.dry_run else f"{res.out} ({len(res.files)} files, "
             f"{res.seconds:.1f} s)")]
    typer.echo(_table(rows + [("note", n) for n in res.notes]))



@app.command(epilog="Prompts: --prompt TEXT (repeatable: one batch), --prompt - (stdin), --prompt-file PATH (each file"
             " is one prompt). --json prints one object for a single prompt; for several, one object whose \"results\""
             " lists the per-prompt objects next to the batch timings.\n\nExamples:\n\n"
             "  hybridctl generate runs/tiny --prompt 'Once upon a time' --max-new-tokens 64\n\n"
             "  echo 'Hello' | hybridctl generate runs/tiny --prompt - --temperature 0.8 --top-p 0.9 --seed 1\n\n"
             "  hybridctl generate ckpt/ -p 'Q: 2+2?' -p 'Q: capital of France?' --stop 'Q:' --json")
@_errors
def generate(
    ckpt: CkptArg,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", help="Prompt text; '-' reads stdin; repeat for a batch.")] = None,
    prompt_file: Annotated[Optional[list[Path]], typer.Option(help="File holding one prompt (repeatable).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p × the top probability (0 = off).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeating tokens (1 = off).")] = 1.0,
    seed: SeedOpt = 0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this text appears (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past the tokenizer's EOS.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer override: 'byte' or a path.")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype (default: the checkpoint's).")] = None,
    backend: BackendOpt = None,
    state_dtype: Annotated[str, typer.Option(help="SSM state dtype: float32 | bfloat16.")] = "float32",
    cuda_graph: Annotated[bool, typer.Option(help="Replay the decode step from a CUDA graph (GPU).")] = True,
    compile: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="torch.compile the decode step (each layer's elementwise work fused into a few "
        "kernels): faster GPU decode after a one-off compile, reported as warm-up. Default: on for CUDA; on the CPU "
        "only the batch-1 matrix-vector product of the large weights is compiled (--no-compile: nothing is).",
        show_default=False)] = None,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate text from any checkpoint: chunked-scan prefill, then one constant-state recurrent step per token.
    A single prompt streams to stdout as it is produced; timings go to stderr."""
    _setup_logging(verbose)
    _check_numbers(max_new_tokens=(max_new_tokens, 1, MAX_NEW_TOKENS), temperature=(temperature, 0, None),
                   top_k=(top_k, 0, None), top_p=(top_p, 0, 1), min_p=(min_p, 0, 1),
                   repetition_penalty=(repetition_penalty, 1e-6, 1e6), seed=(seed, 0, SEED_MAX))
    from hybridctl.generate import generate as run

    prompts = _gather_prompts(prompt, prompt_file)
    stream = None if (json_ or len(prompts) > 1) else (lambda _i, piece: typer.echo(piece, nl=False))
    res = run(ckpt, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
              top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
              stop=stop or (), use_eos=not ignore_eos, device=device, dtype=dtype, backend=backend,
              state_dtype=state_dtype, cuda_graph=cuda_graph, compile=compile, on_text=stream)
    if json_:
        return _print_json(res.per_prompt(0) if len(prompts) == 1 else dict(
            results=[{k: res.per_prompt(i)[k] for k in ("text", "tokens", "prompt_tokens", "finish_reason")}
                     for i in range(len(prompts))], **res.summary()), device=res.device, dtype=res.dtype)
    if stream is None:
        for i, text in enumerate(res.texts):
            typer.echo(f"--- prompt {i} ---\n{text}")
    else:
        typer.echo("")
    typer.echo(f"[{res.batch_size}×{res.decode_steps + 1} tokens | TTFT {res.time_to_first_token_s:.3f} s | "
               f"prefill {res.prefill_tokens_per_s:.1f} tok/s | decode {res.decode_tokens_per_s:.1f} tok/s | "
               f"{res.device} {res.backend}{' compiled' if res.extra.get('compiled') else ''}"
               f"{' cuda-graph' if res.cuda_graph else ''}{' fast-cpu' if res.extra.get('cpu_fast_path') else ''}"
               f"{f' | warm-up {res.warmup_s:.1f} s' if res.warmup_s >= 0.1 else ''}"
               f" | first token after {res.extra.get('first_token_wall_s', 0.0):.1f} s]", err=True)


def _read_stdin() -> str:
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise HybridctlError(f"--prompt -: stdin is not valid UTF-8 (byte {e.start})") from None


def _gather_prompts(prompt: Optional[list[str]], prompt_file: Optional[list[Path]]) -> list[str]:
    """--prompt values ('-' = stdin) then --prompt-file contents, in order; at least one."""
    out = [_read_stdin() if p == "-" else p for p in prompt or []]
    for f in prompt_file or []:
        if not f.is_file():
            raise HybridctlError(f"--prompt-file {f}: no such file")
        try:
            out.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise HybridctlError(f"--prompt-file {f}: not valid UTF-8 (byte {e.start})") from None
        except OSError as e:
            raise HybridctlError(f"--prompt-file {f}: {e.strerror or e}") from None
    for i, p in enumerate(out):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise HybridctlError(f"prompt {i}: not valid UTF-8 (character {e.start})") from None
    if not out:
        raise HybridctlError("no prompt: pass --prompt TEXT, --prompt - (stdin) or --prompt-file PATH")
    return out



# ---- completion ----------------------------------------------------------------------------------------------------
SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_HYBRIDCTL_COMPLETE"


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` (Typer's own scripts, answered at run time by ``main``)."""
    from typer.completion import get_completion_script

    if shell not in SHELLS:
        raise HybridctlError(f"shell {shell!r} is not supported; use one of {', '.join(SHELLS)}")
    return get_completion_script(prog_name="hybridctl", complete_var=COMPLETE_VAR, shell=shell)


@app.command(epilog="Examples:\n\n  hybridctl quantize runs/tiny/final --out q8\n\n"
             "  hybridctl quantize ckpt --method int4 --group-size 128 --calib builtin --out q4\n\n"
             "  hybridctl quantize ckpt --method int4 --policy aggressive --include-head --dry-run --json")
@_errors
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
    _setup_logging(verbose)
    from hybridctl.quantize import quantize as run

    res = run(source=src, out=out, method=method, group_size=group_size, policy=policy, include_head=include_head,
              calib=calib, eval_data=None if eval_data == "none" else eval_data, dry_run=dry_run)
    if json_:
        return _print_json(res.summary(), device="cpu", dtype=method)
    if dry_run:
        typer.echo("\n".join(f"{r.name:<40} {'x'.join(map(str, r.shape)):>12}  {r.action:<9} "
                             f"{_fmt_bytes(r.bytes_before):>9} → {_fmt_bytes(r.bytes_after):>9}  {r.reason}"
                             for r in res.plan))
    ev = res.eval or {}
    rows = [("source", str(res.source)),
            ("method", f"{res.method}" + (f" g{res.group_size}" if res.group_size else "")
             + f", {res.calibration}, policy {res.policy}"),
            ("tensors", f"{len(res.modules)} quantized of {len(res.plan)}"),
            ("weights", f"{_fmt_bytes(res.bytes_before)} → {_fmt_bytes(res.bytes_after)}"),
            ("output", "(dry run: nothing written)" if res.dry_run else f"{res.out} ({res.seconds:.1f} s)")]
    if ev:
        rows += [("perplexity", f"{ev['ppl_source']:.4f} → {ev['ppl_quantized']:.4f} "
                                f"({100 * ev['ppl_change']:+.2f}%)"),
                 ("greedy", f"{100 * ev['greedy_agreement']:.1f}% of {ev['greedy_tokens']} tokens agree "
                  f"(identical for the first {ev['greedy_identical_prefix']})")]
    typer.echo(_table(rows + [("note", n) for n in res.notes]))


# ---- bench -----------------------------------------------------------------------------------------------------
@app.command(epilog="The first model is the baseline: each speed row shows its ratio to it. --json prints one object"
             " (schema in the README's bench section).\n\nExamples:\n\n"
             "  hybridctl bench --preset tiny\n\n"
             "  hybridctl bench --preset hybrid-1.3b --preset transformer-8b --batch 1,8,64 --prompt-len 1024,16384 "
             "--dtype bfloat16 --json\n\n"
             "  hybridctl bench runs/a/final runs/b/final --task needle --lengths 1024,4096 --depths 0,0.5,1 "
             "--no-speed --plot plots/\n\n"
             "  hybridctl bench runs/a/final --ppl held_out.txt --lengths 2048 --no-speed\n\n"
             "  hybridctl bench --preset hybrid-8b --batch 1,64 --prompt-len 131072 --dry-run")
@_errors
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
    lengths: Annotated[str, typer.Option(help="Task prompt lengths (the --ppl window: the largest).")] = "1024,2048,4096",
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
    _setup_logging(verbose)
    _check_numbers(new_tokens=(new_tokens, 1, MAX_NEW_TOKENS), reps=(reps, 1, 10_000), warmup=(warmup, 0, 10_000),
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
        return _print_json(res, device=res["environment"]["device"], dtype=res["models"][0]["dtype"])
    typer.echo(format_report(res))


@app.command(epilog="Examples:\n\n  hybridctl completion bash > ~/.local/share/bash-completion/completions/hybridctl"
             "\n\n  hybridctl completion fish > ~/.config/fish/completions/hybridctl.fish")
@_errors
def completion(shell: Annotated[str, typer.Argument(help="bash | zsh | fish")]) -> None:
    """Print a shell completion script (committed copies live in completions/)."""
    typer.echo(completion_script(shell), nl=False)




def main() -> None:
    if os.environ.get(COMPLETE_VAR):  # a completion request from a shell script: register Typer's shell classes
        from typer.completion import completion_init

        completion_init()
    app(prog_name="hybridctl")


if __name__ == "__main__":
    main()
