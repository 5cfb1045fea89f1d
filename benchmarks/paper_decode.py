"""The paper's "up to 8x faster generation" claim, measured: decode tok/s of a hybrid vs a Transformer of equal size
(bf16, random weights) over batch × context, beside the byte-count prediction (``model.decode_bytes_per_step``).

A thin driver over the package's decode runtime (``hybridctl.generate.DecodeStep`` — the step ``generate`` runs,
CUDA graph on, ``torch.compile`` off unless ``--compile``: one compile per shape would not fit the call), written
because ``hybridctl bench`` was not ready when this ran. The prefill is skipped: the cache is allocated for the
context, its KV and SSM/conv state are filled with random numbers (never zeros), and the step runs at slot = context
length, so every decode step attends over the whole context exactly as after a real prefill (the decode-attention
kernel skips only slots beyond ``slot``). Per row: median step time over ``--steps`` graph replays (CUDA events);
tok/s = batch / step time. A cell whose estimated memory (weights + cache, ``memory_per_sequence``) exceeds the free
memory is marked "oom (est.)" and the largest batch that fits is found by allocating for real.

    python3 benchmarks/paper_decode.py --pair hybrid-1.3b,transformer-1.3b --out results.json   # on the GPU
    python3 benchmarks/paper_decode.py --device cpu --tiny --out /tmp/x.json                      # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridctl import kernels  # noqa: E402
from hybridctl.config import ModelConfig, preset  # noqa: E402
from hybridctl.decode import DecodeStep  # noqa: E402
from hybridctl.model import build_model, decode_bytes_per_step, materialize, memory_per_sequence  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (1024, 4096, 16384, 32768, 65536, 131072)
MARGIN = 16  # cache slots beyond the context: warm-up + capture + timed steps


def tiny_pair() -> list[tuple[str, ModelConfig]]:
    base = preset("tiny").to_dict()
    tr = {**base, "pattern": "*-*-", "attention": {**base["attention"], "n_kv_heads": 4, "position": "rope"}}
    return [("tiny-hybrid", preset("tiny")), ("tiny-transformer", ModelConfig.from_dict(tr))]


def cache_bytes(cfg: ModelConfig, batch: int, seqlen: int, state_bytes: int = 4) -> int:
    m = memory_per_sequence(cfg, dtype_bytes=2, state_bytes=state_bytes)
    return batch * (m["state_bytes_per_sequence"] + m["kv_bytes_per_token"] * seqlen)


def _fill(cache) -> None:
    g = torch.Generator(device=cache.key_valid.device).manual_seed(0)
    for st in cache.layers.values():
        for t in vars(st).values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.normal_(0.0, 0.5, generator=g)


def time_step(model, batch: int, context: int, steps: int, device: torch.device, compile: bool) -> dict[str, Any]:
    """Median decode-step time of ``batch`` rows at KV length ``context`` (after a fake prefill)."""
    cache = model.allocate_cache(batch, context + MARGIN, device=device)
    _fill(cache)
    cache.offset = context
    step = DecodeStep(model, cache, batch, device, use_graph=device.type == "cuda", compile=compile)
    step.tokens.copy_(torch.randint(0, model.cfg.vocab_size, (batch,), device=device))
    pos = torch.full((batch,), context, dtype=torch.long, device=device)
    step.set_position(context, pos)
    t0 = time.perf_counter()
    step.capture()
    capture_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        step.set_position(context, pos)  # every replay attends over the same context
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step.run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            step.run()
            times.append(time.perf_counter() - t)
    med = statistics.median(times[1:] if len(times) > 2 else times)
    out = {"step_s": med, "step_s_all": times, "decode_tok_s": batch / med, "capture_s": capture_s,
           "cuda_graph": step.graph is not None, "compiled": step.compiled,
           "cache_bytes": cache.nbytes()}
    del step, cache
    return out


def free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 64 << 20  # the CPU smoke test: a small pretend budget (no OutOfMemoryError there, the OOM killer)
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def largest_batch(model, context: int, device: torch.device) -> int:
    """The largest batch whose cache at ``context`` can really be allocated and whose decode step then runs once:
    bisection over real allocations, bracketed by the estimate (free memory / cache bytes per row) so that it takes
    a handful of tries (the first run's doubling search from 1 spent ~30 s per context on the hybrid)."""
    def fits(b: int) -> bool:
        try:
            cache = model.allocate_cache(b, context + MARGIN, device=device)
            cache.offset = context
            with torch.inference_mode():
                slot = torch.tensor([context], device=device)
                model.decode_step(torch.zeros(b, dtype=torch.long, device=device), cache, slot,
                                  torch.full((b,), context, device=device))
            del cache
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            free_bytes(device)

    est = max(1, int(free_bytes(device) / cache_bytes(model.cfg, 1, context + MARGIN)))
    lo, hi = max(1, int(est * 0.9)), int(est * 1.05) + 2  # invariant below: fits(lo), not fits(hi)
    while lo > 1 and not fits(lo):
        lo, hi = max(1, lo // 2), lo
    if lo == 1 and not fits(1):
        return 0
    while fits(hi):
        lo, hi = hi, hi * 2
        if device.type != "cuda" and hi > 4 * est:  # nothing runs out on the CPU: stop at the estimate's scale
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def sweep(name: str, cfg: ModelConfig, args, device: torch.device, deadline: float) -> dict[str, Any]:
    model = materialize(build_model(cfg, dtype=torch.bfloat16), device, seed=0).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows, fit = [], {}
    with torch.inference_mode():
        for L in args.fit_contexts:  # first: cheap, and the answer the grid's time budget must not cut
            fit[str(L)] = largest_batch(model, L, device)
            print(f"{name}: largest batch at {L}: {fit[str(L)]}", flush=True)
        for L in args.contexts:
            for B in args.batches:
                row = {"model": name, "batch": B, "context": L,
                       "bytes_per_step": decode_bytes_per_step(model, B, L),
                       "est_bytes": weights + cache_bytes(cfg, B, L + MARGIN)}
                if time.perf_counter() > deadline:
                    row["status"] = "skipped (time budget)"
                elif row["est_bytes"] - weights > 0.95 * free_bytes(device):  # the weights are resident already
                    row["status"] = "oom (est.)"
                else:
                    try:
                        row.update(time_step(model, B, L, args.steps, device, args.compile), status="ok")
                    except torch.OutOfMemoryError:
                        row["status"] = "oom"
                    free_bytes(device)
                rows.append(row)
                print(f"{name} B={B} L={L}: {row['status']} "
                      f"{row.get('decode_tok_s', float('nan')):.1f} tok/s", flush=True)
    info = {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": weights,
            "pattern": cfg.pattern, "memory_per_sequence": memory_per_sequence(cfg),
            "largest_batch": fit or getattr(args, "prior_fit", {})}
    del model
    free_bytes(device)
    return {"rows": rows, "info": info}


def ratios(rows: list[dict[str, Any]], hybrid: str, transformer: str) -> list[dict[str, Any]]:
    by = {(r["model"], r["batch"], r["context"]): r for r in rows}
    out = []
    for (m, B, L), h in by.items():
        if m != hybrid:
            continue
        t = by.get((transformer, B, L))
        row = {"batch": B, "context": L, "predicted": t["bytes_per_step"] / h["bytes_per_step"] if t else None,
               "hybrid_tok_s": h.get("decode_tok_s"), "transformer_tok_s": t.get("decode_tok_s") if t else None,
               "hybrid_status": h["status"], "transformer_status": t["status"] if t else None}
        row["measured"] = (row["hybrid_tok_s"] / row["transformer_tok_s"]
                           if row["hybrid_tok_s"] and row["transformer_tok_s"] else None)
        out.append(row)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rat = result["ratios"]
    ctxs = sorted({r["context"] for r in rat})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.get_cmap("viridis")
    batches = sorted({r["batch"] for r in rat})
    for j, B in enumerate(batches):
        c = colors(j / max(1, len(batches) - 1))
        pts = [(r["context"], r["measured"]) for r in rat if r["batch"] == B and r["measured"]]
        pred = [(r["context"], r["predicted"]) for r in rat if r["batch"] == B and r["predicted"]]
        if pts:
            axes[0].plot(*zip(*pts), "o-", color=c, label=f"B={B} measured")
        if pred:
            axes[0].plot(*zip(*pred), ":", color=c, label=f"B={B} predicted (bytes)")
    axes[0].axhline(8, color="k", lw=0.8, ls="--")
    axes[0].text(ctxs[0], 8.2, "paper: \"up to 8×\" (predicted)", fontsize=8)
    axes[0].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode speed-up hybrid / Transformer",
                title="measured (solid) vs bytes-per-step prediction (dotted)")
    axes[0].set_xticks(ctxs, [f"{c / 1024:g}K" for c in ctxs])
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8, ncol=2)
    for name, style in zip(result["models"], ("o-", "s--")):
        for L in ctxs:
            pts = [(r["batch"], r["decode_tok_s"]) for r in result["rows"]
                   if r["model"] == name and r["context"] == L and r.get("decode_tok_s")]
            if pts:
                axes[1].plot(*zip(*pts), style, label=f"{name} {L / 1024:g}K")
    axes[1].set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tok/s (all rows)",
                title="decode throughput (missing points: out of memory)")
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{' vs '.join(result['models'])}, bf16, fp32 SSM state — {result['env'].get('device', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args, device: torch.device, deadline: float) -> dict[str, Any]:
    pairs = tiny_pair() if args.tiny else [(n, preset(n)) for n in args.pair.split(",")]
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "kernels": kernels.describe() if device.type == "cuda" else "ref",
           "steps": args.steps, "compile": args.compile, "cuda_graph": device.type == "cuda",
           "weights": "random (seed 0), bf16", "state_dtype": "float32"}
    result: dict[str, Any] = {"env": env, "models": [n for n, _ in pairs], "rows": [], "info": {}}
    prior = json.loads(Path(args.reuse).read_text()) if args.reuse else {"rows": [], "info": {}}
    measured = {r["model"] for r in prior["rows"] if r.get("status") == "ok"}  # all rows skipped = not measured
    todo = [n for n, _ in pairs if n not in prior["info"] or n not in measured]
    for name, cfg in pairs:
        if name not in todo:  # measured in an earlier run (--reuse): its rows and info are taken as they are
            result["rows"] += [r for r in prior["rows"] if r["model"] == name]
            result["info"][name] = {**prior["info"][name], "from": args.reuse}
            continue
        if name in prior["info"] and not args.fit_contexts:  # keep the earlier run's largest-batch search
            args.prior_fit = prior["info"][name].get("largest_batch", {})
        now = time.perf_counter()  # each model gets an equal share of the time left
        s = sweep(name, cfg, args, device, now + (deadline - now) / (len(todo) - todo.index(name)))
        result["rows"] += s["rows"]
        result["info"][name] = s["info"]
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))  # partial, in case the call is cut
    result["ratios"] = ratios(result["rows"], pairs[0][0], pairs[1][0])
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="hybrid-1.3b,transformer-1.3b", help="hybrid,transformer presets")
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=list(BATCHES))
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=list(CONTEXTS))
    ap.add_argument("--fit-contexts", type=lambda s: [int(x) for x in s.split(",") if x], default=[32768, 131072],
                    help="contexts of the largest-batch search ('' : none; with --reuse the earlier figures stay)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--out", default="paper_decode.json")
    ap.add_argument("--plot", default=None, help="PNG path")
    ap.add_argument("--replot", default=None, help="a result JSON: write its plot (to --plot) and stop")
    ap.add_argument("--reuse", default=None, help="an earlier result JSON: its models are not measured again")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.replot:  # the plot again from a recorded result (no measuring)
        plot(json.loads(Path(args.replot).read_text()), Path(args.plot or Path(args.replot).with_suffix(".png")))
        return
    device = torch.device(args.device)
    kernels.set_backend("auto")
    t0 = time.perf_counter()
    result = run(args, device, t0 + args.budget_s)
    result["env"]["total_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(result, indent=1, default=lambda o: None if o != o else str(o)))
    if args.plot:
        plot(result, Path(args.plot))
    for r in result["ratios"]:
        m = f"{r['measured']:.2f}x" if r["measured"] else f"- ({r['hybrid_status']}/{r['transformer_status']})"
        print(f"B={r['batch']:3d} L={r['context']:6d}: measured {m}  predicted {r['predicted']:.2f}x")
    print({n: i["largest_batch"] for n, i in result["info"].items()})


if __name__ == "__main__":
    main()
