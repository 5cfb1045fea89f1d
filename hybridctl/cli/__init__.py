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
           "extend_context", "generate", "main", "quantize", "train"]


def main() -> None:
    if os.environ.get(COMPLETE_VAR):  # a completion request from a shell script: register Typer's shell classes
        from typer.completion import completion_init

        completion_init()
    app(prog_name="hybridctl")
