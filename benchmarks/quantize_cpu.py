"""CPU batch-1 decode tokens/s of ``hybridctl quantize``'s result (issue #15's CPU target: int8 ≥ 2× and int4 ≥ 2.5×
the fp32 fast path, 2 cores, hybrid-130m). One process: the fp32 model (random init: speed does not depend on the
values) and the same weights quantized int8 / int4 g128 (round-to-nearest, ``--policy``), each decoded once untimed
(the fast path's compile, the C kernels' build), then ``--repeats`` rounds in which every variant decodes once, in
turn (interleaved: a load change on the shared machine hits every variant alike); the figure is each variant's
median. The load average (1 / 5 / 15 min) is recorded before, after, and at every round: a figure taken while the
1-minute load exceeds the thread count is marked ``loaded``. Stops starting new rounds after ``--budget-s``.

    PYTHONPATH=. python benchmarks/quantize_cpu.py [--preset hybrid-130m] [--tokens 48] [--repeats 5]
        [--policy default] [--threads 2] [--budget-s 100] [--out results.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

from hybridctl import cpu_qkernels
from hybridctl.config import preset
from hybridctl.generate import generate
from hybridctl.model import build_model, materialize
from hybridctl.quantize import make_plan, quantized_model

T0 = time.time()


def log(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def variants(cfg, policy: str, methods: list[str]) -> dict:
    """name → (model, weight bytes): fp32 and the quantized copies of the same weights."""
    model = materialize(build_model(cfg), "cpu").eval()
    specs = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    out = {}
    for method in methods:
        if method == "fp32":
            out[method] = (model, sum(v.numel() * v.element_size() for v in model.state_dict().values()))
            continue
        plan, modules = make_plan(cfg, specs, method=method, group_size=128, policy=policy, include_head=False)
        out[method] = (quantized_model(model, modules, method, 128), sum(r.bytes_after for r in plan))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="hybrid-130m")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policy", default="default")
    ap.add_argument("--methods", default="fp32,int8,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=100.0, help="start no new round after this many seconds")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {"preset": a.preset, "policy": a.policy, "tokens": a.tokens, "threads": a.threads,
           "torch": torch.__version__, "c_kernels": cpu_qkernels.available(), "load_before": load(), "rounds": []}
    log("load before", res["load_before"])
    cfg = preset(a.preset)
    models = variants(cfg, a.policy, a.methods.split(","))
    prompt = [list(range(1, 33))]
    kw = dict(max_new_tokens=a.tokens, use_eos=False)
    for name, (m, _) in models.items():  # untimed: compile / kernel build / first-touch
        r = generate(m, prompt, **kw)
        log(f"warm-up {name}: {r.decode_tokens_per_s:.2f} tok/s (warm-up {r.warmup_s:.1f}s)")
    runs: dict = {k: [] for k in models}
    for rep in range(a.repeats):
        if rep and time.time() - T0 > a.budget_s:
            log(f"budget: stopping after {rep} rounds")
            break
        rnd = {"load": load()}
        for name, (m, _) in models.items():
            r = generate(m, prompt, **kw)
            runs[name].append(r.decode_tokens_per_s)
            rnd[name] = round(r.decode_tokens_per_s, 2)
        res["rounds"].append(rnd)
        log(json.dumps(rnd))
    res["load_after"] = load()
    base = statistics.median(runs["fp32"]) if runs.get("fp32") else None
    res["rows"] = [{"model": k, "weight_bytes": models[k][1], "decode_tok_s": round(statistics.median(v), 2),
                    "runs": [round(x, 2) for x in v],
                    "vs_fp32": round(statistics.median(v) / base, 3) if base else None} for k, v in runs.items()]
    res["loaded"] = max([res["load_before"][0], res["load_after"][0]] + [r["load"][0] for r in res["rounds"]]) \
        > a.threads
    res["wall_s"] = round(time.time() - T0, 1)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    sys.exit(main())
