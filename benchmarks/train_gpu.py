"""GPU training benchmark (H100): training tokens/s + MFU of hybrid-370m and hybrid-1.3b at seq 4096 in bf16, and
forward+backward time of our Mamba-2 layer vs mamba_ssm's own ``Mamba2`` module at the same size, in one run.

    python benchmarks/train_gpu.py                 # from the repo root; ≈4–6 minutes on an H100
    python benchmarks/train_gpu.py --quick         # smaller/faster smoke run (fewer steps, no 1.3B)
    OUT=/some/dir python benchmarks/train_gpu.py   # also writes $OUT/train_gpu.json

Training uses hybridctl's own loop pieces (hybridctl.train: build_training_model, build_optimizer, train_step) on the
recipes/hybrid-*.toml recipes: fp32 master weights, bf16 autocast, fused AdamW, clipping — what `hybridctl train`
runs, with synthetic uniform-random tokens so data loading is not measured: one document per row (no seq_idx:
attention takes SDPA's causal flash path), plus a "packed" row for hybrid-370m with 4 documents per row (seq_idx, as
the data loader always provides: SSM state resets and a masked attention path). Micro-batch / activation checkpointing: the first configuration of a list that
fits in memory (out-of-memory configurations are skipped and reported).

MFU = hybridctl.model.flops_per_token(cfg, 4096)["training"] × tokens/s / peak (989.4 TFLOP/s dense bf16 for
H100/H200 SXM; --peak-tflops to override); the "6N" column is the common 6·params estimate for comparison.

The layer comparison times forward+backward of (a) our Mamba2Mixer, (b) our full blocks.Block("M") (pre-norm RMSNorm +
mixer + residual), and (c) mamba_ssm.modules.mamba2.Mamba2(use_mem_eff_path=False) — causal_conv1d is absent there, so
the peer uses torch's conv1d and we our own fallback — all with bf16 parameters at the same width and sequence length,
after warm-up (Triton autotuning), median of CUDA-event timings. The "ratio" is peer time / our time (≥ 1 = we are
at least as fast; the target is ≥ 0.95).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hybridctl import kernels  # noqa: E402
from hybridctl.config import ModelConfig  # noqa: E402
from hybridctl.model import flops_per_token, param_counts  # noqa: E402
from hybridctl.parallel import DistInfo  # noqa: E402
from hybridctl.recipe import load_recipe  # noqa: E402
from hybridctl.train import build_optimizer, build_training_model, train_step  # noqa: E402

SEQ = 4096
DEVICE = "cuda"
# (micro_batch, activation_checkpointing) tried in order until one fits
CANDIDATES = {"hybrid-370m": [(8, False), (4, False), (8, True), (2, False), (4, True)],
              "hybrid-1.3b": [(4, False), (2, False), (8, True), (4, True), (1, False), (2, True)]}


def _timed(fn, reps: int) -> list[float]:
    """CUDA-event milliseconds of ``fn()`` per repetition."""
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def _batch(cfg: ModelConfig, micro: int, gen: torch.Generator, packed: bool) -> dict[str, torch.Tensor]:
    """Random tokens; packed: 4 documents per row (seq_idx, as the data loader gives: SSM resets and a masked
    attention path), else one document per row (seq_idx None: SDPA's causal flash path)."""
    ids = torch.randint(0, cfg.vocab_size, (micro, SEQ + 1), generator=gen)
    seq_idx = (torch.arange(SEQ) * 4 // SEQ).to(torch.int32).expand(micro, -1).contiguous() if packed else None
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "seq_idx": seq_idx}


def bench_training(name: str, steps: int, warmup: int, peak: float, packed: bool = False,
                   compile_: bool = False) -> dict:
    """Tokens/s and MFU of the real train_step for one recipe; the first micro-batch/AC setting that fits."""
    dev = torch.device(DEVICE)
    info = DistInfo(0, 1, dev)
    tried = []
    for micro, ac in CANDIDATES[name]:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.toml",
                             [f"optim.micro_batch={micro}", f"optim.global_batch={micro}", "precision.dtype=bfloat16",
                              f"parallel.activation_checkpointing={str(ac).lower()}",
                              f"parallel.compile={str(compile_).lower()}"])
        cfg = recipe.model_config()
        model = opt = None
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model, no_decay = build_training_model(cfg, recipe, None, info)
            opt = build_optimizer(model, no_decay, recipe, dev)
            gen = torch.Generator().manual_seed(0)
            batches = [_batch(cfg, micro, gen, packed) for _ in range(2)]
            t0 = time.perf_counter()
            for i in range(warmup):
                train_step(model, opt, [batches[i % 2]], recipe, info)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            times = _timed(lambda: train_step(model, opt, [batches[0]], recipe, info), steps)
        except torch.cuda.OutOfMemoryError:
            tried.append(f"mb{micro}{'+ac' if ac else ''}: OOM")
            model = opt = None
            gc.collect()
            torch.cuda.empty_cache()
            continue
        ms = statistics.median(times)
        tps = micro * SEQ / (ms / 1e3)
        n_params = sum(param_counts(cfg).values())
        flops = flops_per_token(cfg, SEQ)["training"]
        res = dict(model=name + (" packed" if packed else "") + (" compiled" if compile_ else ""), params=n_params, seq_len=SEQ, micro_batch=micro,
                   activation_checkpointing=ac,
                   step_ms=ms, step_ms_all=times, tokens_per_s=tps, mfu=flops * tps / peak,
                   mfu_6n=6 * n_params * tps / peak, flops_per_token_training=flops,
                   max_memory_gib=torch.cuda.max_memory_allocated() / 2**30, warmup_s=warm_s, skipped=tried)
        del model, opt
        torch.cuda.empty_cache()
        return res
    return dict(model=name + (" packed" if packed else ""), error="no configuration fits", skipped=tried)


def bench_layer(d_model: int, batch: int, reps: int) -> dict:
    """fwd+bwd ms: our Mamba2Mixer, our Block('M'), mamba_ssm's Mamba2 (use_mem_eff_path=False), bf16 params."""
    from hybridctl.blocks import Block

    # kernels.set_backend("kernel") (in main) imported mamba_ssm already, registering the Triton-only wheel's missing
    # Mamba-1 extension, so the module imports
    from mamba_ssm.modules.mamba2 import Mamba2

    dev, dt = torch.device(DEVICE), torch.bfloat16
    cfg = ModelConfig.from_dict(dict(vocab_size=256, d_model=d_model, pattern="M",
                                     mamba=dict(d_state=128, headdim=64, ngroups=8, expand=2, d_conv=4,
                                                chunk_size=128)))
    ours = Block(cfg, "M", device=dev, dtype=dt)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
        ours.mixer.reset_parameters()
        ours.norm.reset_parameters()
    peer = Mamba2(d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=8, chunk_size=128, rmsnorm=True,
                  norm_before_gate=False, use_mem_eff_path=False, device=dev, dtype=dt)
    # the same weights in both (same names: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj)
    peer.load_state_dict(ours.mixer.state_dict(), strict=True)
    x = torch.randn(batch, SEQ, d_model, device=dev, dtype=dt)
    with torch.no_grad():
        ref_y, our_y = peer(x), ours.mixer(x)
    rel = ((our_y.float() - ref_y.float()).norm() / ref_y.float().norm()).item()

    def fwd_bwd(module):
        xi = x.detach().requires_grad_(True)
        module(xi).float().square().mean().backward()

    out = {"d_model": d_model, "batch": batch, "seq_len": SEQ, "rel_err_vs_peer": rel}
    for label, mod in (("ours_mixer", ours.mixer), ("ours_block", ours), ("mamba_ssm_Mamba2", peer)):
        for _ in range(3):
            fwd_bwd(mod)  # warm-up: Triton autotuning
        torch.cuda.synchronize()
        out[f"{label}_ms"] = statistics.median(_timed(lambda m=mod: fwd_bwd(m), reps))
    out["ratio_mixer"] = out["mamba_ssm_Mamba2_ms"] / out["ours_mixer_ms"]
    out["ratio_block"] = out["mamba_ssm_Mamba2_ms"] / out["ours_block_ms"]
    del ours, peer
    torch.cuda.empty_cache()
    return out


def _table(train_rows: list[dict], layer_rows: list[dict], device: str) -> str:
    lines = [f"device: {device}   torch {torch.__version__}   backend: {kernels.describe()}",
             "", f"{'model':<20}{'params':>8}{'mb':>4}{'ac':>4}{'step ms':>9}{'tok/s':>10}{'MFU':>7}{'6N-MFU':>8}"
             f"{'mem GiB':>9}"]
    for r in train_rows:
        if "error" in r:
            lines.append(f"{r['model']:<20} {r['error']} ({'; '.join(r['skipped'])})")
            continue
        ac = "y" if r["activation_checkpointing"] else "n"
        lines.append(f"{r['model']:<20}{r['params'] / 1e9:>7.2f}B{r['micro_batch']:>4}{ac:>4}{r['step_ms']:>9.1f}"
                     f"{r['tokens_per_s']:>10,.0f}{r['mfu']:>7.1%}{r['mfu_6n']:>8.1%}{r['max_memory_gib']:>9.1f}")
    lines += ["", f"{'Mamba-2 layer fwd+bwd':<24}{'ours mixer':>11}{'ours block':>11}{'mamba_ssm':>11}"
                  f"{'r.mix':>7}{'r.blk':>7}{'rel err':>9}   (r = mamba_ssm ms / ours ms; target >= 0.95)"]
    for r in layer_rows:
        if "error" in r:
            lines.append(f"d_model {r['d_model']}: {r['error']}")
            continue
        label = "d_model %d B%dxT%d" % (r["d_model"], r["batch"], SEQ)
        lines.append(f"{label:<24}{r['ours_mixer_ms']:>9.2f}ms{r['ours_block_ms']:>9.2f}ms"
                     f"{r['mamba_ssm_Mamba2_ms']:>9.2f}ms{r['ratio_mixer']:>7.2f}{r['ratio_block']:>7.2f}"
                     f"{r['rel_err_vs_peer']:>9.1e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton autotuning)")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per layer")
    ap.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak of the GPU")
    ap.add_argument("--quick", action="store_true", help="hybrid-370m only, fewer steps")
    ap.add_argument("--models", default="hybrid-370m,hybrid-1.3b", help="comma-separated recipes to train")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (parallel.compile=true)")
    ap.add_argument("--no-layer", action="store_true", help="skip the Mamba-2 layer comparison")
    ap.add_argument("--no-packed", action="store_true", help="skip the packed-documents row")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("train_gpu.py needs a CUDA GPU")
    kernels.set_backend("kernel")  # raises with the reason if mamba_ssm's kernels are missing
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name()
    models = ["hybrid-370m"] if args.quick else args.models.split(",")
    steps = 3 if args.quick else args.steps
    t0 = time.perf_counter()
    layer_rows = []
    for d_model, batch in () if args.no_layer else ((2048, 2), (4096, 2)):
        try:
            layer_rows.append(bench_layer(d_model, batch, args.reps))
        except Exception as e:  # noqa: BLE001 - report and keep going: the training numbers still matter
            layer_rows.append({"d_model": d_model, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(layer_rows[-1]), flush=True)
    train_rows = []
    runs = [(name, False) for name in models] + ([] if args.no_packed else [("hybrid-370m", True)])  # + packed row
    for name, packed in runs:
        train_rows.append(bench_training(name, steps, args.warmup, args.peak_tflops * 1e12, packed, args.compile))
        print(json.dumps({k: v for k, v in train_rows[-1].items() if k != "step_ms_all"}), flush=True)
    result = {"device": device, "torch": torch.__version__, "backend": kernels.describe(), "seq_len": SEQ,
              "peak_tflops": args.peak_tflops, "training": train_rows, "mamba2_layer": layer_rows,
              "wall_s": time.perf_counter() - t0}
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "train_gpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    print(_table(train_rows, layer_rows, device))
    if any(not math.isfinite(r.get("tokens_per_s", 0.0)) for r in train_rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
