"""Batch-1 decode kernels in isolation on one GPU: hybridctl's Triton GEMV (each config of a sweep) vs cuBLAS
(F.linear) on the decode products of hybrid-1.3b, and the split-KV decode attention vs masked SDPA (the PyTorch
twin), the way a decode step runs them: back-to-back launches captured in one CUDA graph, each on a different copy
of the weights (more bytes than the L2 holds, so nothing is served from cache). Prints µs per call and TB/s;
writes $OUT/gemv_sweep.json when OUT is set.

    python benchmarks/gemv_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybridctl import ref  # noqa: E402
from hybridctl import triton_kernels as tk  # noqa: E402

DEV = torch.device("cuda")
# (name, N, K, fused work as the decode step calls it) of hybrid-1.3b's decode products
SHAPES = [("in_proj", 10304, 2048, "norm"), ("out_proj", 2048, 4096, "residual"), ("mlp_up", 8192, 2048, "norm"),
          ("mlp_down", 2048, 8192, "gelu+residual"), ("q/k/v_proj", 2048, 2048, ""), ("o_proj", 2048, 2048, "residual"),
          ("k/v_proj", 1024, 2048, ""), ("lm_head", 50304, 2048, "norm")]


def graph_time_us(fn, calls: int, reps: int = 20) -> float:
    """µs per call of ``fn(i)`` for i in range(calls), captured in one CUDA graph; median of reps replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[reps // 2]


def copy_bw() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us = graph_time_us(lambda i: b.copy_(a), 5)
    return 2 * a.numel() / us / 1e6  # TB/s, read + write


def sweep_gemv(quick: bool) -> list[dict]:
    """Per shape: cuBLAS (F.linear; addmm where the step adds a residual), then the Triton GEMV with the fused work
    the decode step asks of it, for each config of the sweep and for the default config, and without fusion."""
    rows = []
    configs = list(itertools.product([1, 2, 4, 8], [256, 512, 1024, 2048], [2, 4, 8]))
    if quick:
        configs = list(itertools.product([2, 4, 8], [1024, 2048], [4, 8]))
    for name, n, k, fused in SHAPES:
        nbytes = n * k * 2
        copies = max(2, -(-3 * 50 * 2**20 // nbytes))  # > 3x the 50 MB L2
        ws = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        res = torch.randn(1, n, device=DEV, dtype=torch.bfloat16) if "residual" in fused else None
        nw = torch.ones(k, device=DEV, dtype=torch.bfloat16) if "norm" in fused else None
        act = "gelu" if "gelu" in fused else None
        out = torch.empty(1, n, device=DEV, dtype=torch.bfloat16)
        calls = max(copies, 8)

        def add(impl, us, **extra):
            rows.append({"shape": name, "n": n, "k": k, "fused": fused, "impl": impl, "us": us,
                         "TBps": nbytes / us / 1e6, **extra})
            return rows[-1]

        lib = add("cuBLAS", graph_time_us(lambda i: F.linear(x, ws[i % copies]) if res is None
                                          else torch.addmm(res, x, ws[i % copies].t()), calls))
        best = None
        for cfg in configs + [None]:
            if cfg is not None and (cfg[1] > max(256, k) or cfg[0] * cfg[1] > 16384):
                continue
            try:
                us = graph_time_us(lambda i: tk.gemv_launch(x, ws[i % copies], None, res, nw, 1e-5, out, config=cfg,
                                                            activation=act), calls)
            except Exception as e:  # noqa: BLE001 - a config that does not compile: skip it, say so
                print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            row = add("triton" if cfg else "triton default", us,
                      config=list(cfg or tk.gemv_config(n, k, nw is not None, act)))
            if cfg and (best is None or us < best["us"]):
                best = row
        plain = add("triton default, nothing fused", graph_time_us(
            lambda i: tk.gemv_launch(x, ws[i % copies], None, None, None, 1e-5, out), calls))
        dflt = rows[-2]
        print(f"{name:10s} N={n:6d} K={k:5d} [{fused}]: cuBLAS {lib['us']:.2f} us ({lib['TBps']:.2f} TB/s); triton "
              f"default {dflt['config']} {dflt['us']:.2f} us ({dflt['TBps']:.2f}); best {best['config']} "
              f"{best['us']:.2f} us ({best['TBps']:.2f}); nothing fused {plain['us']:.2f} us", flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    return rows


def sweep_attention() -> list[dict]:
    rows = []
    for bsz, seqlen in [(1, 1088), (1, 16448), (8, 1088), (8, 16448)]:
        q = torch.randn(bsz, 16, 128, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(bsz, seqlen, 8, 128, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for filled in (0.5, 1.0):
            mask = torch.zeros(bsz, seqlen, dtype=torch.bool, device=DEV)
            mask[:, :int(filled * seqlen)] = True
            nbytes = 2 * bsz * int(filled * seqlen) * 8 * 128 * 2
            for impl, fn in [("triton split-KV", lambda i: tk.decode_attention(q, k, v, mask)),
                             ("SDPA masked (ref)", lambda i: ref.decode_attention(q, k, v, mask))]:
                us = graph_time_us(fn, 8)
                rows.append({"shape": f"attention b{bsz} S{seqlen} filled {filled}", "impl": impl, "us": us,
                             "TBps": nbytes / us / 1e6})
                print(f"attention b{bsz} S={seqlen} filled {filled}: {impl} {us:.1f} us "
                      f"({nbytes / us / 1e6:.2f} TB/s of valid K/V)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "copy_TBps": copy_bw()}
    print(env, flush=True)
    rows = sweep_gemv(args.quick) + sweep_attention()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gemv_sweep.json"), "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
