"""Run a file of Triton kernel cases through Triton's CPU interpreter, in a subprocess: the interpreter must be on
(TRITON_INTERPRET=1) before the kernels are defined, so the cases cannot run in the test process itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_in_interpreter(cases: Path) -> None:
    """pytest over ``cases`` with the interpreter on and no GPU visible; fails with the run's output tail."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(cases)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=cases.parents[1])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
