"""Phonebook (arXiv 2406.07887 §3.3.3): does a pure Mamba-2 fall behind a hybrid and a Transformer of equal size as
the phonebook grows? Three models (recipes/paper-phonebook-{hybrid,mamba2,transformer}.toml, ≈3.6M parameters each)
train in lock-step on the SAME batches — the data module's phonebook task, one book size per step cycling through
``--sizes`` — with the package's own training step (``hybridctl.train.train_step``, the recipes' AdamW and schedule),
then are scored on held-out phonebooks of each size in ``--eval-sizes``: exact match of the whole number under
teacher forcing (= greedy decoding: every answer token the argmax given the right prefix;
``hybridctl.evaluation.evaluate(task=True)``) and the held-out loss on the answer tokens.

The number of steps is set by the time budget: after ``--calibrate`` steps the per-step time of the three fixes the
total, the same for all three (the cosine schedule then spans that total). Batches come from ``--sizes`` worker
processes (one per book size), so data generation overlaps the GPU.

    python3 benchmarks/paper_phonebook.py --budget-s 150 --out pb.json --plot pb.png      # GPU
    python3 benchmarks/paper_phonebook.py --device cpu --tiny --budget-s 30 --out /tmp/pb.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybridctl import kernels, parallel  # noqa: E402
from hybridctl.data import build_loader  # noqa: E402
from hybridctl.evaluation import evaluate  # noqa: E402
from hybridctl.model import param_counts  # noqa: E402
from hybridctl.recipe import load_recipe  # noqa: E402
from hybridctl.tokenizer import ByteTokenizer  # noqa: E402
from hybridctl.train import _autocast, _use_bf16, build_optimizer, build_training_model, lr_at, train_step  # noqa: E402

KINDS = ("hybrid", "mamba2", "transformer")
ENTRY_TOKENS = 27  # a "Xxxx Yyyyy: 555-555-5555\n" line in bytes, about (for the row length of an eval size)


def _producer(q, seed: int, seq_len: int, batch: int, n_entries: int) -> None:
    loader = build_loader(source="phonebook", tokenizer=ByteTokenizer(), seq_len=seq_len, batch_size=batch,
                          seed=seed, task_options={"n_entries": n_entries})
    for b in loader:
        q.put({k: v.numpy() for k, v in b.items()})


class Batches:
    """Step i's batch: book size sizes[i % n], from that size's worker process (deterministic order)."""

    def __init__(self, sizes: list[int], seed: int, seq_len: int, batch: int) -> None:
        ctx = mp.get_context("fork")
        self.queues = [ctx.Queue(maxsize=16) for _ in sizes]
        self.procs = [ctx.Process(target=_producer, args=(q, seed + 7919 * j, seq_len, batch, n), daemon=True)
                      for j, (q, n) in enumerate(zip(self.queues, sizes))]
        for p in self.procs:
            p.start()
        self.i = 0

    def next(self) -> dict[str, torch.Tensor]:
        b = self.queues[self.i % len(self.queues)].get(timeout=300)
        self.i += 1
        return {k: torch.from_numpy(v) for k, v in b.items()}

    def close(self) -> None:
        for p in self.procs:
            p.terminate()


def load(kind: str, args, steps: int):
    over = [f"optim.steps={steps}"] + (["model.config.d_model=64", "optim.micro_batch=8", "optim.global_batch=8",
                                        "data.seq_len=256"] if args.tiny else [])
    return load_recipe(ROOT / "recipes" / f"paper-phonebook-{kind}.toml", over)


def same_data(recipes) -> None:
    keys = [(r.data, r.optim, r.tokenizer, r.seed, r.precision) for r in recipes]
    if any(k != keys[0] for k in keys):
        raise SystemExit("the three recipes must differ in [model] only")


def eval_sizes(models, recipe, args, info) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {k: {} for k in models}
    for n in args.eval_sizes:
        seq = max(recipe.data.seq_len, 64 * -(-(n + 3) * ENTRY_TOKENS // 64))
        for kind, model in models.items():
            loader = build_loader(source="phonebook", tokenizer=ByteTokenizer(), seq_len=seq,
                                  batch_size=args.eval_batch, seed=recipe.seed, split="eval",
                                  task_options={"n_entries": n})
            with torch.no_grad():
                r = evaluate(model, iter(loader), max_batches=args.eval_batches, device=info.device, task=True,
                             autocast=lambda: _autocast(recipe, info.device))
            r["row_len"] = seq
            r["beyond_training_length"] = seq > recipe.data.seq_len
            out[kind][str(n)] = r
            print(f"eval {kind} n={n} (rows {seq}): acc {r.get('eval_accuracy', float('nan')):.3f} "
                  f"loss {r.get('eval_loss', float('nan')):.3f}", flush=True)
    return out


def train(args) -> dict[str, Any]:
    t0 = time.perf_counter()
    info = parallel.DistInfo(0, 1, torch.device(args.device))
    recipes = {k: load(k, args, args.max_steps) for k in KINDS}
    same_data(list(recipes.values()))
    r0 = recipes["hybrid"]
    torch.manual_seed(r0.seed)
    batches = Batches(args.sizes, r0.seed, r0.data.seq_len, r0.optim.micro_batch)  # fork before CUDA is touched
    models, opts = {}, {}
    for kind, rec in recipes.items():
        model, no_decay = build_training_model(rec.model_config(), rec, None, info)
        models[kind], opts[kind] = model, build_optimizer(model, no_decay, rec, info.device)
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k in KINDS}
    total, step, t_cal = args.max_steps, 0, None
    try:
        while step < total:
            if step == 2:
                t_cal = time.perf_counter()
            if step == args.calibrate and t_cal is not None:
                per = (time.perf_counter() - t_cal) / (args.calibrate - 2)
                left = args.budget_s - (time.perf_counter() - t0) - args.eval_reserve_s
                total = max(step + 1, min(args.max_steps, int(left / per)))
                recipes = {k: load(k, args, total) for k in KINDS}  # the schedule spans the steps that fit
                print(f"calibration: {per * 1e3:.1f} ms per step of the three; {total} steps", flush=True)
            b = batches.next()
            for kind in KINDS:
                rec = recipes[kind]
                for g in opts[kind].param_groups:
                    g["lr"] = lr_at(step, rec)
                loss, _ = train_step(models[kind], opts[kind], [b], rec, info)
                if step % args.log_every == 0 or step == total - 1:
                    curves[kind].append((step, loss))
            if step % args.log_every == 0:
                print(f"step {step}: " + " ".join(f"{k} {curves[k][-1][1]:.3f}" for k in KINDS), flush=True)
            step += 1
    finally:
        batches.close()
    train_s = time.perf_counter() - t0
    for m in models.values():
        m.eval()
    Path(args.out).with_suffix(".curves.json").write_text(json.dumps({"steps": total, "curves": curves}))
    ev = eval_sizes(models, recipes["hybrid"], args, info)
    rec = recipes["hybrid"]
    return {"steps": total, "tokens_per_model": total * rec.optim.micro_batch * rec.data.seq_len,
            "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s, "sizes": args.sizes,
            "params": {k: sum(param_counts(r.model_config()).values()) for k, r in recipes.items()},
            "patterns": {k: r.model_config().pattern for k, r in recipes.items()},
            "recipe": {"seq_len": rec.data.seq_len, "micro_batch": rec.optim.micro_batch, "lr": rec.optim.lr,
                       "min_lr": rec.optim.min_lr, "warmup_steps": rec.optim.warmup_steps,
                       "schedule": rec.optim.schedule, "precision": "bf16 autocast" if _use_bf16(rec, info.device)
                       else "fp32"},
            "curves": curves, "eval": ev,
            "held_out_loss_training_mix": {k: float(np.mean([ev[k][str(n)]["eval_loss"] for n in args.sizes
                                                             if str(n) in ev[k]] or [np.nan])) for k in KINDS}}


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, style in zip(KINDS, ("o-", "s-", "^-")):
        sizes = sorted(int(n) for n in res["eval"][kind])
        acc = [res["eval"][kind][str(n)].get("eval_accuracy", np.nan) for n in sizes]
        axes[0].plot(sizes, acc, style, label=f"{kind} ({res['params'][kind] / 1e6:.2f}M, {res['patterns'][kind]})")
        steps, loss = zip(*res["curves"][kind])
        axes[1].plot(steps, loss, label=kind)
    trained = max(res["sizes"])
    axes[0].axvspan(trained + 0.5, max(int(n) for n in res["eval"]["hybrid"]) + 1, color="grey", alpha=0.12,
                    label="longer than any training book")
    axes[0].set(xlabel="phonebook entries", ylabel="exact match (whole number)", ylim=(-0.03, 1.03),
                title="Phonebook accuracy vs book size (held-out books)")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log",
                title=f"same batches, {res['steps']} steps, {res['tokens_per_model'] / 1e6:.3g}M tokens each")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"hybrid vs Mamba-2 vs Transformer, equal size — {res.get('env', {}).get('device', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="ref", help="kernel backend for training (ref: no Triton JIT/autotune)")
    ap.add_argument("--tiny", action="store_true", help="d_model 64, batch 8, rows of 256 (CPU smoke test)")
    ap.add_argument("--sizes", type=ints, default=[4, 8, 12, 16], help="training book sizes (one per step, cycled)")
    ap.add_argument("--eval-sizes", type=ints, default=[2, 4, 8, 12, 16, 24, 32])
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=150.0, help="training + evaluation wall time")
    ap.add_argument("--eval-reserve-s", type=float, default=20.0)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--calibrate", type=int, default=12)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--out", default="paper_phonebook.json")
    ap.add_argument("--plot", default=None)
    return ap


def main() -> None:
    args = parser().parse_args()
    kernels.set_backend(args.backend)
    res = train(args)
    res["env"] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  "torch": torch.__version__, "backend": kernels.describe() if args.device.startswith("cuda")
                  else "ref", "args": vars(args)}
    Path(args.out).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, Path(args.plot))
    for kind in KINDS:
        accs = {n: round(v.get("eval_accuracy", float("nan")), 3) for n, v in res["eval"][kind].items()}
        print(f"{kind:12s} held-out loss {res['held_out_loss_training_mix'][kind]:.3f}  accuracy by size {accs}")


if __name__ == "__main__":
    main()
