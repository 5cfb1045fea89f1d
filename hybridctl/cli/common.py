"""The Typer app and what every command shares: options declared once, the one-line error boundary
(``HybridctlError`` -> one line on stderr, exit 1; a traceback only with ``HYBRIDCTL_DEBUG=1``), logging setup, number
checks and table formatting. The commands live one module per verb next to this one and register themselves on ``app``.
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


def setup_logging(verbose: bool) -> None:
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


def errors(fn: Callable[..., Any]) -> Callable[..., Any]:
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


def print_json(obj: Any, *, device: str, dtype: str) -> None:
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


def check_numbers(**checks: tuple[Any, float | None, float | None]) -> None:
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


def fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
