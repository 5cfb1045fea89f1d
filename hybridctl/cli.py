"""The Typer app. Thin: each command parses, calls one entry function, prints a summary.

Heavy imports (torch, the workflows) live inside command bodies so ``hybridctl --help`` is instant. A
``HybridctlError`` becomes one line on stderr and exit code 1; any other exception too, with the traceback only when
``HYBRIDCTL_DEBUG=1``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from hybridctl.config import HybridctlError

app = typer.Typer(
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


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """HybridctlError (and anything unexpected) → one line on stderr, exit 1; traceback with HYBRIDCTL_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("hybridctl: interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the CLI boundary
            if os.environ.get("HYBRIDCTL_DEBUG") == "1":
                raise
            if isinstance(e, HybridctlError):
                msg = str(e)
            else:
                msg = f"internal error: {type(e).__name__}: {e} (set HYBRIDCTL_DEBUG=1 for a traceback)"
            typer.echo(f"hybridctl: error: {' '.join(msg.split())}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


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
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Build a model from a preset, a layer pattern or Megatron's ratio allocation; summarise it; with --out write an
    initialised native checkpoint (built on meta otherwise: the 8B presets cost nothing)."""
    _setup_logging(verbose)
    from hybridctl.build import build as run

    res = run(preset=preset, pattern=pattern, layers=layers, attention_ratio=attention_ratio, mlp_ratio=mlp_ratio,
              overrides=set_, seed=seed, dtype=dtype, out=out, seq_len=seq_len)
    s = dict(res.summary, out=str(res.out) if res.out else None)
    if json_:
        return _print_json(s)
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


# ---- commands whose issues have not landed yet --------------------------------------------------------------------
def _not_yet(name: str) -> None:
    raise HybridctlError(f"'{name}' is not implemented yet")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_errors
def train(ctx: typer.Context) -> None:
    """Train from a recipe (TOML): resumable sharded checkpoints; one machine or many (torchrun)."""
    _not_yet("train")


@app.command("extend-context", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_errors
def extend_context(ctx: typer.Context) -> None:
    """Continued training at a longer sequence length, with long-context evaluation."""
    _not_yet("extend-context")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_errors
def convert(ctx: typer.Context) -> None:
    """Convert between native, Hugging Face (NemotronH, Mamba2, mamba_ssm) and Megatron checkpoints."""
    _not_yet("convert")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_errors
def quantize(ctx: typer.Context) -> None:
    """Mamba-aware weight quantization."""
    _not_yet("quantize")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_errors
def generate(ctx: typer.Context) -> None:
    """Generate text from a checkpoint with a constant-size SSM state."""
    _not_yet("generate")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_errors
def bench(ctx: typer.Context) -> None:
    """Measure speed, memory and quality."""
    _not_yet("bench")


# ---- completion ----------------------------------------------------------------------------------------------------
SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    """The completion script for ``shell``, generated from the CLI through Click's public completion API."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    if cls is None or shell not in SHELLS:
        raise HybridctlError(f"shell {shell!r} is not supported; use one of {', '.join(SHELLS)}")
    command = typer.main.get_command(app)
    return cls(command, {}, "hybridctl", "_HYBRIDCTL_COMPLETE").source()


@app.command(epilog="Examples:\n\n  hybridctl completion bash > ~/.local/share/bash-completion/completions/hybridctl"
             "\n\n  hybridctl completion fish > ~/.config/fish/completions/hybridctl.fish")
@_errors
def completion(shell: Annotated[str, typer.Argument(help="bash | zsh | fish")]) -> None:
    """Print a shell completion script (committed copies live in completions/)."""
    typer.echo(completion_script(shell), nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
