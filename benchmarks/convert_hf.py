"""Benchmark: converting a >= 1 GB checkpoint native → Hugging Face (NemotronH) and back, against a plain copy of the
same bytes; wall time and peak memory of each step, each in its own child process.

Run from the repository root:  python benchmarks/convert_hf.py [--preset hybrid-370m] [--shard-size 500MB]
Writes results as JSON to $OUT/convert_hf.json when OUT is set (and to --json PATH when given); prints a table last.

Peak memory is sampled from /proc/self/status in the child every 10 ms: RssAnon (anonymous memory: what conversion
itself holds) and VmHWM (peak RSS, which also counts the pages of memory-mapped input files the kernel keeps resident
— page cache that is reclaimable, not memory the converter owns).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
peak = {"anon": 0}
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0
def sample():
    while True:
        peak["anon"] = max(peak["anon"], rss("RssAnon"))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
job = json.loads(sys.argv[1])
import torch  # imported before timing: the floor every command pays
from hybridctl.convert import convert
import shutil
t0 = time.perf_counter()
if job["kind"] == "copy":
    dst = job["out"]
    import os
    os.makedirs(dst)
    for f in sorted(os.listdir(job["src"])):
        shutil.copyfile(os.path.join(job["src"], f), os.path.join(dst, f))
elif job["kind"] == "convert":
    convert(src=job["src"], to=job["to"], out=job["out"], shard_size=job["shard_size"], progress=False)
dt = time.perf_counter() - t0
peak["anon"] = max(peak["anon"], rss("RssAnon"))
print(json.dumps({"seconds": dt, "peak_anon": peak["anon"], "peak_rss": rss("VmHWM")}))
"""


def run_child(job: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({job['kind']}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def build_source(preset_name: str, path: Path, shard_size: str) -> dict:
    import torch

    from hybridctl.checkpoint.native import save_model
    from hybridctl.config import preset
    from hybridctl.model import build_model, materialize
    from hybridctl.tokenizer import ByteTokenizer

    cfg = preset(preset_name).replace(vocab_size=50304)
    t0 = time.perf_counter()
    with torch.no_grad():
        model = materialize(build_model(cfg), "cpu", seed=0)
    save_model(model, path, tokenizer=ByteTokenizer(), max_shard_size=shard_size)
    n = sum(p.numel() for p in model.parameters())
    return {"preset": preset_name, "params": n, "pattern": cfg.pattern, "build_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="hybrid-370m")
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed afterwards)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        meta = build_source(args.preset, tmp / "native", args.shard_size)
        size = dir_bytes(tmp / "native")
        rows = []
        floor = run_child({"kind": "noop"})
        for rep in range(args.reps):
            for kind, to, src in (("copy", None, "native"), ("convert", "hf", "native"),
                                  ("convert", "native", f"hf{rep}")):
                direction = "native → hf" if to == "hf" else "hf → native"
                name = "plain copy" if kind == "copy" else f"convert {direction}"
                out = tmp / (f"copy{rep}" if kind == "copy" else (f"hf{rep}" if to == "hf" else f"back{rep}"))
                r = run_child({"kind": kind, "to": to, "src": str(tmp / src), "out": str(out),
                               "shard_size": args.shard_size})
                r.update(step=name, rep=rep, bytes_out=dir_bytes(out), gb_per_s=size / r["seconds"] / 1e9)
                rows.append(r)
        result = {"machine": f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().machine}",
                  "source_bytes": size, "shard_size": args.shard_size, "floor_anon": floor["peak_anon"],
                  "floor_rss": floor["peak_rss"], **meta, "rows": rows}
    for dest in filter(None, [args.json, os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "convert_hf.json")]):
        Path(dest).write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    print(f"\nsource: {args.preset} ({meta['params'] / 1e6:.0f}M params), {size / gib:.2f} GiB fp32, shards "
          f"{args.shard_size}; import floor: anon {floor['peak_anon'] / gib:.2f} GiB, rss {floor['peak_rss'] / gib:.2f}"
          " GiB")
    print(f"{'step':<24}{'rep':>4}{'seconds':>10}{'GB/s':>8}{'peak anon GiB':>15}{'peak RSS GiB':>14}")
    for r in rows:
        print(f"{r['step']:<24}{r['rep']:>4}{r['seconds']:>10.2f}{r['gb_per_s']:>8.2f}{r['peak_anon'] / gib:>15.2f}"
              f"{r['peak_rss'] / gib:>14.2f}")


if __name__ == "__main__":
    main()
