"""Where a fresh ``hybridctl`` process spends its wall time, outside the figures ``generate --json`` reports.

    python benchmarks/cli_phases.py -- generate CKPT --prompt-file F --max-new-tokens 256 --ignore-eos --json

Runs the command ``--runs`` times in a child interpreter (``python -X importtime``) that stamps the wall clock
when the interpreter starts running code, when ``hybridctl``'s CLI returns, and at the last ``atexit`` hook; the
parent times the whole process. Per run: interpreter start-up, the CLI itself, interpreter exit (atexit hooks,
module teardown, CUDA context and compile-worker shutdown), the command's own JSON figures (load_s, warmup_s,
TTFT, decode) when it prints them, and the slowest imports by cumulative time. JSON to $OUT/cli_phases.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHILD = """
import atexit, json, sys, time
t_code = time.time()
stamps = {"t_code": t_code}
stamp_path = sys.argv[1]
def _last():
    stamps["t_atexit"] = time.time()
    with open(stamp_path, "w") as f:
        json.dump(stamps, f)
atexit.register(_last)  # registered first, so it runs last (after torch's / Inductor's own hooks)
_register = atexit.register
def _timed_register(fn, *a, **k):  # every later hook is timed (they run in reverse order, before _last)
    name = f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or repr(fn)}"
    def run(*a2, **k2):
        t = time.time()
        try:
            return fn(*a2, **k2)
        finally:
            stamps.setdefault("atexit_hooks", []).append((name, round(time.time() - t, 3)))
    run.__wrapped__ = fn
    _register(run, *a, **k)
    return fn
atexit.register = _timed_register
sys.argv = ["hybridctl", *sys.argv[2:]]
from hybridctl.cli import main
try:
    main()
except SystemExit as e:
    stamps["exit_code"] = e.code if isinstance(e.code, int) else 1
stamps["t_cli_done"] = time.time()
sys.exit(stamps.get("exit_code", 0))
"""


def slowest_imports(stderr: str, n: int = 15) -> list[tuple[str, float]]:
    rows = []
    for ln in stderr.splitlines():
        if ln.startswith("import time:") and "|" in ln:
            parts = ln[len("import time:"):].split("|")
            try:
                rows.append((parts[2].rstrip(), int(parts[1]) / 1e6))
            except (ValueError, IndexError):
                continue
    top = sorted(rows, key=lambda r: -r[1])
    return [(name.strip(), round(s, 3)) for name, s in top[:n]]


def one_run(cmd: list[str], env: dict[str, str]) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as stamp:
        t0 = time.time()
        p = subprocess.run([sys.executable, "-X", "importtime", "-c", CHILD, stamp.name, *cmd], env=env,
                           capture_output=True, text=True, timeout=900)
        t_end = time.time()
        try:
            s = json.load(open(stamp.name))
        except (OSError, json.JSONDecodeError):
            s = {}
    row = {"rc": p.returncode, "wall_s": t_end - t0}
    if "t_code" in s:
        row.update(startup_s=s["t_code"] - t0, cli_s=s.get("t_cli_done", t_end) - s["t_code"],
                   exit_s=t_end - s.get("t_cli_done", t_end), atexit_to_end_s=t_end - s.get("t_atexit", t_end))
    try:
        out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    except json.JSONDecodeError:
        out = {}
    row.update({k: out.get(k) for k in ("load_s", "warmup_s", "time_to_first_token_s", "decode_s", "compiled")})
    row["slowest_imports"] = slowest_imports(p.stderr)
    row["slowest_atexit_hooks"] = sorted(s.get("atexit_hooks", []), key=lambda h: -h[1])[:8]
    row["warnings"] = [ln[:300] for ln in p.stderr.splitlines() if ln.startswith("WARNING")]
    if p.returncode:
        row["stderr_tail"] = p.stderr[-1500:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the hybridctl arguments, after --")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the hybridctl command after --")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    rows = []
    for i in range(args.runs):
        rows.append(one_run(cmd, env))
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()
               if k not in ("slowest_imports", "slowest_atexit_hooks")}, flush=True)
        print("  slowest imports:", rows[-1]["slowest_imports"][:8], flush=True)
        print("  slowest atexit hooks:", rows[-1]["slowest_atexit_hooks"], flush=True)
    path = args.json_out or os.path.join(os.environ.get("OUT", "."), "cli_phases.json")
    with open(path, "w") as f:
        json.dump({"command": ["hybridctl", *cmd], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
