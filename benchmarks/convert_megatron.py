"""Peak memory and time of Megatron conversions (CPU; no GPU needed).

Builds a native checkpoint (default: the hybrid-130m preset in bfloat16), then runs each conversion in a fresh child
process and reports its peak memory above the post-import baseline: peak anonymous RSS (sampled every 5 ms; the
memory the conversion really allocates) and VmHWM (peak RSS including file-backed pages of mmapped inputs, which the
kernel can drop). The claim to check: peak anonymous memory stays near one TP group's copy of the largest tensor
plus one output shard (a legacy rank file, or a native safetensors shard), not the model size.

    python benchmarks/convert_megatron.py                     # hybrid-130m, bf16
    python benchmarks/convert_megatron.py --preset hybrid-370m --shard-size 200MB

Writes JSON to $OUT/convert_megatron.json when OUT is set; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples RssAnon in a thread (Linux)."""

    def __init__(self) -> None:
        self.peak, self._stop = _status("RssAnon"), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.005)

    def __enter__(self) -> "PeakAnon":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status("RssAnon"))


def child(step: str, work: Path, shard_size: str) -> dict:
    """Run one conversion step; return its memory and time figures."""
    import torch  # noqa: F401  (imports before the baseline)

    from hybridctl.checkpoint import open_checkpoint
    from hybridctl.checkpoint.megatron import write_megatron_dist, write_megatron_legacy
    from hybridctl.checkpoint.native import write_native

    base_anon, base_hwm = _status("RssAnon"), _status("VmHWM")
    t0 = time.perf_counter()
    with PeakAnon() as peak:
        if step.startswith("native->legacy"):
            tp, pp = (int(x) for x in step.split("tp")[1].split("pp"))
            write_megatron_legacy(work / f"leg_tp{tp}pp{pp}", open_checkpoint(work / "native"), tp=tp, pp=pp)
        elif step == "native->dist":
            write_megatron_dist(work / "dist", open_checkpoint(work / "native"))
        else:
            name = step.split("->")[0]
            src = open_checkpoint(work / name)
            write_native(work / f"back_{name}", config=src.config, specs=src.specs, get=src.get,
                         max_shard_size=shard_size)
    return {"step": step, "seconds": time.perf_counter() - t0, "peak_anon_bytes": peak.peak - base_anon,
            "vmhwm_bytes": max(0, _status("VmHWM") - base_hwm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="hybrid-130m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(child(a._child[0], Path(a._child[1]), a.shard_size)))
        return
    import torch

    from hybridctl.checkpoint.megatron_args import padded_vocab
    from hybridctl.checkpoint.native import save_model, torch_dtype
    from hybridctl.config import preset
    from hybridctl.model import build_model, materialize

    cfg = preset(a.preset)
    with tempfile.TemporaryDirectory(prefix="convert_megatron_") as tmp:
        work = Path(tmp)
        model = materialize(build_model(cfg), "cpu", seed=0)
        save_model(model, work / "native", dtype=torch_dtype(a.dtype), max_shard_size=a.shard_size)
        sd = model.state_dict()
        esize = torch.empty((), dtype=torch_dtype(a.dtype)).element_size()
        largest = max(sd.items(), key=lambda kv: kv[1].numel())
        model_bytes = sum(v.numel() for v in sd.values()) * esize
        del model, sd
        steps = [f"native->legacy_tp{a.tp}pp{a.pp}", f"leg_tp{a.tp}pp{a.pp}->native", "native->dist",
                 "dist->native"]
        rows = []
        for step in steps:
            out = subprocess.run([sys.executable, __file__, "--shard-size", a.shard_size, "--_child", step, str(work)],
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
        rank_files = sorted((work / f"leg_tp{a.tp}pp{a.pp}" / "release").rglob("*.pt"))
        largest_rank = max(f.stat().st_size for f in rank_files)
        shard = max(f.stat().st_size for f in (work / "native").glob("*.safetensors"))
    padded = padded_vocab(cfg.vocab_size, a.tp)
    result = {"preset": a.preset, "dtype": a.dtype, "model_bytes": model_bytes, "largest_tensor": largest[0],
              "largest_tensor_bytes": largest[1].numel() * esize * padded // cfg.vocab_size,
              "largest_rank_file_bytes": largest_rank, "largest_native_shard_bytes": shard, "steps": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "convert_megatron.json").write_text(json.dumps(result, indent=2))
    mb = 2**20
    print(f"{a.preset} {a.dtype}: model {model_bytes / mb:.0f} MiB; largest tensor {largest[0]} "
          f"{result['largest_tensor_bytes'] / mb:.0f} MiB (padded); largest rank file {largest_rank / mb:.0f} MiB; "
          f"native shard {shard / mb:.0f} MiB")
    print(f"{'step':<26}{'seconds':>9}{'peak anon MiB':>15}{'VmHWM MiB':>11}")
    for r in rows:
        print(f"{r['step']:<26}{r['seconds']:>9.1f}{r['peak_anon_bytes'] / mb:>15.0f}{r['vmhwm_bytes'] / mb:>11.0f}")


if __name__ == "__main__":
    main()
