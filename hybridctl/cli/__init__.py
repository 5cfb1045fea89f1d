"""The Typer app. Thin: each command parses, calls one entry function, prints a summary.

``common`` holds the app and what the commands share; each verb is one module here (``build_cmd``, ``train_cmd``, ...)
that registers its command on the app when imported, in the order ``--help`` lists them. Heavy imports (torch, the
workflows) live inside command bodies so ``hybridctl --help`` is instant. A ``HybridctlError`` becomes one line on
stderr and exit code 1; any other exception too, with the traceback only when ``HYBRIDCTL_DEBUG=1``.
"""

from __future__ import annotations

import os

from hybridctl.cli.common import app
from hybridctl.cli.build_cmd import build
from hybridctl.cli.train_cmd import train
from hybridctl.cli.extend_context_cmd import extend_context
from hybridctl.cli.convert_cmd import convert
from hybridctl.cli.generate_cmd import generate
from hybridctl.cli.quantize_cmd import quantize
from hybridctl.cli.bench_cmd import bench
from hybridctl.cli.completion_cmd import COMPLETE_VAR, SHELLS, completion, completion_script

__all__ = ["COMPLETE_VAR", "SHELLS", "app", "bench", "build", "completion", "completion_script", "convert",
           "default_openmp_waiting", "extend_context", "generate", "main", "quantize", "train"]


def default_openmp_waiting() -> None:
    """Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a policy.

    libgomp's default spin-wait makes every parallel region (each op above the grain size, each oneDNN linear) wait
    for a scheduler slice whenever another process shares the cores: measured on the 2-core VM
    (benchmarks/bench_cpu.md), a 4x65536 add 0.2 ms -> 16 ms at 2 threads, a tiny-model decode step 5 ms -> 250 ms,
    hybrid-130m's 115-150 ms -> 465 ms; with passive waiting the 2-thread figures are those of 1 thread or better.
    libgomp reads the variable when it is loaded, so this runs before anything imports torch."""
    if not any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main() -> None:
    default_openmp_waiting()
    if os.environ.get(COMPLETE_VAR):  # a completion request from a shell script: register Typer's shell classes
        from typer.completion import completion_init

        completion_init()
    app(prog_name="hybridctl")
