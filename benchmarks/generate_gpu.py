"""GPU decode speed of hybrid-1.3b (bf16): hybridctl (CUDA graph + Mamba kernels) vs transformers' NemotronH on the
same weights vs mamba_ssm's MambaLMHeadModel decode(cg=True) on a pure Mamba-2 of the same size.

    python benchmarks/generate_gpu.py            # ~3-5 min on one H100; JSON to $OUT/generate_gpu.json if OUT is set
    python benchmarks/generate_gpu.py --quick    # batch 1 only, prompt 1K

Rows: (batch, prompt length) in (1,1K) (8,1K) (64,1K) (1,16K) (8,16K) for hybridctl with its default GPU decode
(torch.compile'd layer graphs with hybridctl's Triton GEMV / decode-attention kernels, replayed from a CUDA graph),
the same with cuBLAS + SDPA in place of those kernels (``cuBLAS+SDPA``, the default before them; at (1,1K) and
(1,16K)) and without the compile (the graph over the kernel backend's ops), plus (1,1K) with neither and with a bf16
SSM state; transformers and mamba_ssm at (1,1K) (8,1K)
(64,1K) (1,16K). The batch-1 comparison runs first. (64,16K) is left out: its prefill alone would need ~30 GB of
activations in one call. ``profile`` rows: one decode step at batch 1 taken apart — its graph replayed alone
(CUDA events, no sampling), and its kernels listed by torch.profiler (count per step, time by kernel).

Decode tokens/s counts every row of the batch; roofline = bytes a decode step must read (weights, SSM/conv state
read+write, KV cache at the mean length) ÷ the device-to-device copy bandwidth measured here. Every peer is guarded:
a failure prints and the rest runs. Results are written after every row, so a timeout still leaves the rows that
finished. A wall-clock budget (--budget-s, default 330) skips what is left.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def shim_transformers_for_mamba_ssm() -> None:
    """mamba_ssm.utils.generation imports GreedySearchDecoderOnlyOutput/SampleDecoderOnlyOutput, which transformers 5
    removed; `import mamba_ssm` (and with it hybridctl's kernel backend) would fail. Alias them before any import."""
    try:
        import transformers.generation as tg
    except Exception:  # noqa: BLE001 - no transformers: nothing to shim
        return
    for name in ("GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput"):
        if not hasattr(tg, name) and hasattr(tg, "GenerateDecoderOnlyOutput"):
            setattr(tg, name, tg.GenerateDecoderOnlyOutput)


shim_transformers_for_mamba_ssm()

from generate_common import (bytes_per_step, copy_bandwidth, guarded, hf_decode_rate, table,  # noqa: E402
                             to_nemotron_h, write_json)

from hybridctl import kernels  # noqa: E402
from hybridctl.config import preset  # noqa: E402
from hybridctl.generate import generate  # noqa: E402
from hybridctl.model import build_model, materialize  # noqa: E402

DEV = torch.device("cuda")
GRID = [(1, 1024), (8, 1024), (64, 1024), (1, 16384), (8, 16384)]
COLS = ["impl", "batch", "prompt", "decode_tok_s", "ms_per_step", "roofline_frac", "ttft_s", "prefill_tok_s",
        "warmup_s", "note"]


class Bench:
    def __init__(self, args) -> None:
        self.args, self.rows, self.errors, self.env = args, [], {}, {}
        self.t0 = time.perf_counter()

    def out_of_time(self, label: str) -> bool:
        if time.perf_counter() - self.t0 > self.args.budget_s:
            print(f"[{label}] skipped: time budget of {self.args.budget_s} s spent", flush=True)
            self.errors[label] = "skipped (time budget)"
            return True
        return False

    def add(self, row: dict) -> None:
        if row.get("decode_tok_s"):
            row["ms_per_step"] = 1e3 * row["batch"] / row["decode_tok_s"]
            if row.get("roofline_tok_s"):
                row["roofline_frac"] = row["decode_tok_s"] / row["roofline_tok_s"]
        self.rows.append(row)
        print({k: row.get(k) for k in COLS}, flush=True)
        write_json("generate_gpu.json", {"env": self.env, "rows": self.rows, "errors": self.errors})


def prompts(bsz: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (bsz, length), generator=g)


def ours_task(model, bsz: int, L: int, new_tokens: int, kw: dict, bw: float) -> dict:
    """hybridctl's generate(); kw are its options, plus ``decode_kernels=False``: cuBLAS products and SDPA attention
    in place of hybridctl's Triton decode kernels (the default before they existed)."""
    ids = prompts(bsz, L, model.cfg.vocab_size).tolist()
    kw = dict(kw)
    own = kw.pop("decode_kernels", True)
    with kernels.decode_kernels(own):
        w = generate(model, ids, max_new_tokens=new_tokens, **kw)  # warm-up at these shapes (compile, autotune)
        r = generate(model, ids, max_new_tokens=new_tokens, **kw)
    sbytes = 2 if kw.get("state_dtype") == "bfloat16" else 4
    roof = bsz * bw / bytes_per_step(model, bsz, L + new_tokens // 2, state_bytes=sbytes)
    mode = ("compiled " if r.extra.get("compiled") else "") + ("graph" if r.cuda_graph else "eager") + (
        "" if own else " cuBLAS+SDPA")
    return {"impl": "hybridctl", "batch": bsz, "prompt": L, "decode_tok_s": r.decode_tokens_per_s,
            "ttft_s": r.time_to_first_token_s, "prefill_tok_s": r.prefill_tokens_per_s, "warmup_s": w.warmup_s,
            "roofline_tok_s": roof, "note": f"{mode} state={r.state_dtype}" + (
                f" compile_error={r.extra['compile_error']}" if r.extra.get("compile_error") else ""),
            "tokens": r.tokens}


def profile_task(model, bsz: int, L: int, bw: float, compile: bool, decode_kernels: bool = True) -> dict:
    with kernels.decode_kernels(decode_kernels):
        row = _profile(model, bsz, L, bw, compile)
    if not decode_kernels:
        row["note"] = "cuBLAS+SDPA " + row["note"]
    return row


def _profile(model, bsz: int, L: int, bw: float, compile: bool) -> dict:
    """One decode step taken apart: the captured graph replayed alone (median of 200, CUDA events; no sampling, no
    host work), then the same step run uncaptured under torch.profiler: kernels per step, kernel time per step (its
    sum against the replay shows the launch gaps the graph still has), the slowest kernels."""
    from hybridctl.decode import DecodeStep

    with torch.inference_mode():
        cache = model.allocate_cache(bsz, L + 256)  # each replay advances the slot: 208 steps below
        for st in cache.layers.values():  # never time on zeros
            for t in vars(st).values():
                t.normal_(0, 0.1)
        step = DecodeStep(model, cache, bsz, DEV, use_graph=True, compile=compile)
        step.capture()
        step.set_position(L, torch.full((bsz,), L, device=DEV))
        step.tokens.random_(0, model.cfg.vocab_size)
        times = []
        for _ in range(200):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step.run()
            b.record()
            times.append((a, b))
        torch.cuda.synchronize()
        ms = sorted(a.elapsed_time(b) for a, b in times)[100]
        step.graph = None  # the same step, launched kernel by kernel, for the profiler
        for _ in range(3):
            step.run()
        torch.cuda.synchronize()
        n = 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step.run()
            torch.cuda.synchronize()
    kern: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kern.setdefault(e.name, []).append(e.device_time)  # µs
    per_step_us = sum(sum(v) for v in kern.values()) / n
    top = sorted(kern.items(), key=lambda kv: -sum(kv[1]))[:14]
    roof_ms = 1e3 * bytes_per_step(model, bsz, L + 32) / bw
    return {"impl": "profile", "batch": bsz, "prompt": L, "decode_tok_s": 1e3 * bsz / ms,
            "roofline_tok_s": 1e3 * bsz / roof_ms,
            "note": f"{'compiled ' if step.compiled else ''}graph replay alone {ms:.3f} ms; "
                    f"{sum(len(v) for v in kern.values()) / n:.0f} kernels/step, kernel time {per_step_us / 1e3:.3f} "
                    f"ms/step; roofline {roof_ms:.3f} ms",
            "top_kernels": [(name[:90], len(v) // n, round(sum(v) / n, 1)) for name, v in top]}


def hf_task(hf, model, bsz: int, L: int, new_tokens: int, bw: float) -> dict:
    r = hf_decode_rate(hf, prompts(bsz, L, model.cfg.vocab_size).to(DEV), new_tokens)
    roof = bsz * bw / bytes_per_step(model, bsz, L + new_tokens // 2)
    return {"impl": "transformers NemotronH", "batch": bsz, "prompt": L, "decode_tok_s": r["decode_tokens_per_s"],
            "ttft_s": r["ttft_s"], "roofline_tok_s": roof, "note": "generate(), same weights"}


def mamba_ssm_model(cfg):
    """A pure Mamba-2 of hybrid-1.3b's width and depth (48 × d_model 2048, N 128, P 64, G 8; tied embeddings)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    def build(fused: bool):
        mc = MambaConfig(d_model=cfg.d_model, n_layer=48, d_intermediate=0, vocab_size=cfg.vocab_size,
                         ssm_cfg={"layer": "Mamba2", "d_state": 128, "headdim": 64, "ngroups": 8},
                         rms_norm=True, residual_in_fp32=True, fused_add_norm=fused, pad_vocab_size_multiple=16)
        return MambaLMHeadModel(mc, device=DEV, dtype=torch.bfloat16).eval()

    try:
        return build(True)
    except ImportError as e:  # the Triton RMSNorm is missing from this install: mamba_ssm's unfused path
        print(f"[mamba_ssm] fused_add_norm unavailable ({e}); using the unfused norm", flush=True)
        return build(False)


def mamba_decode_rate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """decode(cg=True) tokens/s with the prefill cancelled: (B·(N−1)) / (t(N) − t(1)); the graph is captured by a
    first call at the longest length, so the timed calls reuse it."""
    from mamba_ssm.utils.generation import decode

    L = ids.shape[1]

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        decode(ids, model, L + n, top_k=1, cg=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    t = time.perf_counter()
    timed(new_tokens)
    warm = time.perf_counter() - t
    t1 = min(timed(1) for _ in range(2))
    tn = min(timed(new_tokens) for _ in range(2))
    rate = ids.shape[0] * (new_tokens - 1) / (tn - t1) if tn - t1 > 0.05 * tn else None
    return {"decode_tokens_per_s": rate, "ttft_s": t1, "warmup_s": warm}


def mamba_task(m, cfg, bsz: int, L: int, new_tokens: int, bw: float) -> dict:
    r = mamba_decode_rate(m, prompts(bsz, L, cfg.vocab_size).to(DEV), new_tokens)
    n_params = sum(p.numel() for p in m.parameters())
    # pure Mamba-2: weights (tied embedding: the head reads it) + SSM state read and written; no KV cache
    nbytes = n_params * 2 + bsz * 48 * (2 * (cfg.d_inner // 64) * 64 * 128 * 4)
    return {"impl": "mamba_ssm Mamba-2 (cg)", "batch": bsz, "prompt": L, "decode_tok_s": r["decode_tokens_per_s"],
            "ttft_s": r["ttft_s"], "warmup_s": r["warmup_s"], "roofline_tok_s": bsz * bw / nbytes,
            "note": f"pure Mamba-2 {n_params / 1e9:.2f}B"}


def tasks(args) -> list[tuple[str, int, int, dict]]:
    """(peer, batch, prompt, options) in priority order: the batch-1 comparison first (a run may be cut short)."""
    first = [("ours", 1, 1024, {}), ("ours", 1, 1024, {"decode_kernels": False}), ("ours", 1, 1024, {"compile": False}),
             ("mamba", 1, 1024, {}), ("hf", 1, 1024, {}), ("profile", 1, 1024, {"compile": True}),
             ("profile", 1, 1024, {"compile": True, "decode_kernels": False}), ("ours", 1, 16384, {}),
             ("ours", 1, 16384, {"decode_kernels": False})]
    if args.tasks:  # "peer:batch:prompt,..." e.g. ours:1:1024,mamba:1:1024 (default options)
        return [(t.split(":")[0], int(t.split(":")[1]), int(t.split(":")[2]), {}) for t in args.tasks.split(",")]
    if args.quick:
        return first
    rest = [("ours", b, L, {}) for b, L in GRID if (b, L) not in ((1, 1024), (1, 16384))]
    rest += [("mamba", b, L, {}) for b, L in [(8, 1024), (64, 1024), (1, 16384)]]
    rest += [("hf", b, L, {}) for b, L in [(8, 1024), (1, 16384)]]
    rest += [("ours", b, L, {"decode_kernels": False}) for b, L in [(8, 1024), (64, 1024)]]
    rest += [("ours", b, L, {"compile": False}) for b, L in [(8, 1024), (64, 1024), (1, 16384)]]
    rest += [("ours", 1, 1024, {"state_dtype": "bfloat16"}), ("ours", 1, 1024, {"cuda_graph": False,
                                                                                "compile": False})]
    rest += [("profile", 1, 1024, {"compile": False}), ("hf", 64, 1024, {})]
    return first + rest


def run_tasks(b: Bench, model, cfg, bw: float) -> None:
    """The first call (JIT), the peers' set-up, then every task in priority order, each guarded."""
    args = b.args
    t = time.perf_counter()
    first = guarded("hybridctl first call", lambda: generate(model, [[1] * 64], max_new_tokens=8), b.errors)
    b.env["first_call_s"] = time.perf_counter() - t  # Triton JIT / autotune of the prefill and decode kernels
    b.env["first_call_cuda_graph"] = None if first is None else first.cuda_graph
    wanted = {peer for peer, *_ in tasks(args)}
    hf = guarded("transformers load", lambda: to_nemotron_h(model), b.errors) if "hf" in wanted else None
    mamba = guarded("mamba_ssm load", lambda: mamba_ssm_model(cfg), b.errors) if "mamba" in wanted else None
    if mamba is not None:
        b.env["mamba_ssm_params"] = sum(p.numel() for p in mamba.parameters())
    run = {"ours": lambda bsz, L, kw: ours_task(model, bsz, L, args.new_tokens, kw, bw),
           "hf": None if hf is None else lambda bsz, L, kw: hf_task(hf, model, bsz, L, args.hf_new_tokens, bw),
           "mamba": None if mamba is None else lambda bsz, L, kw: mamba_task(mamba, cfg, bsz, L, args.new_tokens, bw),
           "profile": lambda bsz, L, kw: profile_task(model, bsz, L, bw, **kw)}
    for peer, bsz, L, kw in tasks(args):
        label = f"{peer} b{bsz} L{L} {kw or ''}".strip()
        if run[peer] is None or b.out_of_time(label):
            continue
        row = guarded(label, lambda: run[peer](bsz, L, kw), b.errors)
        if row is not None:
            b.add(row)
        torch.cuda.empty_cache()
    agree(b)


def agree(b: Bench) -> None:
    """Greedy agreement of the compiled and uncompiled decode (bf16 on random weights has near-ties: report it)."""
    by = {}
    for r in b.rows:
        if r["impl"] == "hybridctl" and r.get("tokens") and "state=float32" in r["note"] and "graph" in r["note"] \
                and "cuBLAS" not in r["note"]:
            by.setdefault((r["batch"], r["prompt"]), {})["compiled" in r["note"]] = r["tokens"]
    for (bsz, L), d in by.items():
        if len(d) == 2:
            pairs = [(x, y) for ra, rb in zip(d[True], d[False]) for x, y in zip(ra, rb)]
            first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra))
                     for ra, rb in zip(d[True], d[False])]
            b.env[f"greedy_agreement_b{bsz}_L{L}"] = {"same_tokens": sum(x == y for x, y in pairs) / len(pairs),
                                                      "first_difference_min": min(first)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="hybrid-1.3b")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-new-tokens", type=int, default=24)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", default="", help="only these rows, 'peer:batch:prompt,...' (peer: ours|mamba|hf)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("generate_gpu.py needs CUDA")
    b = Bench(args)
    kernels.set_backend("auto")
    cfg = preset(args.preset)
    model = materialize(build_model(cfg, dtype=torch.bfloat16), DEV, seed=0).eval()
    bw = copy_bandwidth(DEV)
    b.env.update(device=torch.cuda.get_device_name(), torch=torch.__version__, kernels=kernels.describe(),
                 kernel_errors=list(kernels._load().errors), copy_bandwidth_GBps=bw / 1e9, preset=args.preset,
                 params=sum(p.numel() for p in model.parameters()), new_tokens=args.new_tokens,
                 bytes_per_step_b1_1k=bytes_per_step(model, 1, 1024 + args.new_tokens // 2))
    for mod in ("transformers", "mamba_ssm", "triton"):
        try:
            b.env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            b.env[mod] = f"unavailable ({type(e).__name__})"
    print(b.env, flush=True)
    run_tasks(b, model, cfg, bw)
    b.env["total_s"] = time.perf_counter() - b.t0
    write_json("generate_gpu.json", {"env": b.env, "rows": b.rows, "errors": b.errors})
    if b.errors:
        print("errors:", b.errors)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; first call (JIT) {b.env.get('first_call_s', float('nan')):.1f} s; "
          f"backend {b.env['kernels']}")
    print(table(b.rows, COLS))
    for r in b.rows:
        if r["impl"] == "profile":
            print(f"profile b{r['batch']} L{r['prompt']}: {r['note']}")
            for name, count, us in r["top_kernels"]:
                print(f"   {us:8.1f} us  x{count:<3d} {name}")
    print({k: v for k, v in b.env.items() if k.startswith("greedy_agreement")})


if __name__ == "__main__":
    main()
