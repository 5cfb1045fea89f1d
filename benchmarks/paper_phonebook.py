"""Phonebook (arXiv 2406.07887 §3.3.3; Jelassi et al. 2024, "Repeat After Me"): does a pure Mamba-2 fall behind a
hybrid and a Transformer of equal size as the phonebook grows? Three models (recipes/paper-phonebook-{hybrid,mamba2,
transformer}.toml, ≈3.6M parameters each) train on the SAME batches, in the paper's own prompt layout — the data
module's phonebook task with ``layout`` "both" (the standard and the reversed prompt of ``tasks.phonebook_examples``,
which is what ``hybridctl bench --task phonebook`` scores), books of ``min_entries``..``n_entries`` entries mixed in
every batch, loss on the answers only — with the package's training step (``hybridctl.train.train_step``).

Each model trains in its own process (the three step in parallel on one GPU: tiny models are launch-bound); the
batches come from one pool of producer processes and every trainer receives every batch, in the same order. After
``--calibrate`` steps the trainers agree on one step count from the slowest one's step time and the time budget (the
cosine schedule then spans it). Then each model is exported (``run_dir/final``, native, with the tokenizer: a
checkpoint ``hybridctl bench`` reads) and scored under teacher forcing on held-out books of each size in
``--eval-sizes`` (exact match of every answer of the book = greedy decoding), per layout, with its held-out loss
on the answer tokens. ``benchmarks/paper_gpu.sh`` then runs ``hybridctl bench --task phonebook`` on the three.

    python3 benchmarks/paper_phonebook.py --budget-s 80 --out-dir /tmp/pb                         # GPU
    python3 benchmarks/paper_phonebook.py --device cpu --tiny --budget-s 40 --out-dir /tmp/pb     # smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybridctl import kernels, parallel  # noqa: E402
from hybridctl.config import HybridctlError  # noqa: E402
from hybridctl.data import build_loader  # noqa: E402
from hybridctl.evaluation import evaluate  # noqa: E402
from hybridctl.model import param_counts  # noqa: E402
from hybridctl.recipe import load_recipe  # noqa: E402
from hybridctl.tokenizer import ByteTokenizer  # noqa: E402
from hybridctl.train import _autocast, build_optimizer, build_training_model, export_final, lr_at, train_step  # noqa: E402,E501

KINDS = ("hybrid", "mamba2", "transformer")
LAYOUTS = ("standard", "reversed")


def load(kind: str, args, steps: int):
    over = [f"optim.steps={steps}"] + (["model.config.d_model=64", "optim.micro_batch=4", "optim.global_batch=4",
                                        "data.seq_len=640", "data.task_options.n_entries=12",
                                        "optim.warmup_steps=5"] if args.tiny else [])
    return load_recipe(ROOT / "recipes" / f"paper-phonebook-{kind}.toml", over + list(args.set))


def same_data(recipes) -> None:
    keys = [(r.data, r.optim, r.tokenizer, r.seed, r.precision) for r in recipes]
    if any(k != keys[0] for k in keys):
        raise SystemExit("the three recipes must differ in [model] only")


def parse_curriculum(text: str) -> list[tuple[int, int]]:
    """"2:300,4:500" -> [(2, 300), (4, 500)]: books of at most 2 entries before step 300, 4 before 500, then the
    recipe's own n_entries."""
    stages = [tuple(int(v) for v in part.split(":")) for part in text.split(",") if part.strip()]
    if any(len(st) != 2 or st[0] < 1 for st in stages) or [u for _, u in stages] != sorted({u for _, u in stages}):
        raise SystemExit(f"--curriculum: want ENTRIES:UNTIL_STEP,... with increasing steps, got {text!r}")
    return stages


def _producer(queues, j: int, recipe, curriculum: list[tuple[int, int]], n_producers: int) -> None:
    """Producer j: its own seeded stream of the recipe's batches, each put to every trainer's queue. Its k-th batch
    is trained at step k * n_producers + j (trainers take producer step % P), so a curriculum stage is known here."""
    d = recipe.data
    opts = dict(d.task_options or {})
    stages = [*curriculum, (opts.get("n_entries"), None)]

    def stream(n_entries):
        o = {**opts, "n_entries": n_entries, "min_entries": min(opts.get("min_entries") or 1, n_entries)} \
            if n_entries is not None else opts
        return iter(build_loader(source=d.source, tokenizer=ByteTokenizer(), seq_len=d.seq_len,
                                 batch_size=recipe.optim.micro_batch, seed=recipe.seed + 7919 * j, task_options=o))

    streams, k = {}, 0
    while True:
        step = k * n_producers + j
        stage = next(i for i, (_, until) in enumerate(stages) if until is None or step < until)
        if stage not in streams:
            streams = {stage: stream(stages[stage][0])}  # earlier stages are done with
        arrays = {name: v.numpy() for name, v in next(streams[stage]).items()}
        for q in queues:
            q.put(arrays)
        k += 1


def eval_books(model, recipe, args, device) -> dict[str, dict[str, Any]]:
    """Teacher-forced exact match and answer loss on held-out books, per layout and book size."""
    out: dict[str, dict[str, Any]] = {}
    for layout in LAYOUTS:
        out[layout] = {}
        for n in args.eval_sizes:
            try:
                loader = build_loader(source="phonebook", tokenizer=ByteTokenizer(), seq_len=recipe.data.seq_len,
                                      batch_size=args.eval_batch, seed=recipe.seed, split="eval",
                                      task_options={"layout": layout, "n_entries": n})
            except HybridctlError:
                continue  # that many entries do not fit a training row in this layout
            try:  # a book's length varies with its names: a size can fit the first example and not a later one
                with torch.no_grad():
                    out[layout][str(n)] = evaluate(model, iter(loader), max_batches=args.eval_batches,
                                                   device=device, task=True,
                                                   autocast=lambda: _autocast(recipe, device))
            except HybridctlError as e:
                print(f"eval {layout} {n} entries skipped: {e}", flush=True)
    return out


def trainer(c: int, kind: str, queues, barrier, per_step, args, t0: float, results) -> None:
    kernels.set_backend(args.backend)
    if args.device == "cpu":
        torch.set_num_threads(1)
    info = parallel.DistInfo(0, 1, torch.device(args.device))
    rec = load(kind, args, args.max_steps)
    torch.manual_seed(rec.seed)
    model, no_decay = build_training_model(rec.model_config(), rec, None, info)
    opt = build_optimizer(model, no_decay, rec, info.device)
    curve, total, step, t_cal, P = [], args.max_steps, 0, None, len(queues)
    while step < total:
        if step == 2:
            t_cal = time.perf_counter()
        if step == args.calibrate:
            per_step[c] = (time.perf_counter() - t_cal) / (args.calibrate - 2)
            barrier.wait()  # every trainer has its step time: all take the same step count
            left = args.budget_s - (time.perf_counter() - t0) - args.eval_reserve_s
            # 15% margin: the three processes contend harder in steady state than over the calibration steps
            # (session 10: 280 ms calibrated, 365 ms measured for Mamba-2, and the run overshot its budget)
            total = max(step + 1, min(args.max_steps, int(left / (1.15 * max(per_step)))))
            rec = load(kind, args, total)  # the schedule spans the steps that fit
            if c == 0:
                print(f"calibration: {[round(p * 1e3, 1) for p in per_step]} ms per step; {total} steps", flush=True)
        b = {k: torch.from_numpy(v) for k, v in queues[step % P][c].get(timeout=300).items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, rec)
        loss, _ = train_step(model, opt, [b], rec, info)
        if step % args.log_every == 0 or step == total - 1:
            curve.append((step, loss))
            print(f"{kind} step {step} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        step += 1
        if step > args.calibrate and time.perf_counter() - t0 > args.budget_s - args.eval_reserve_s:
            print(f"{kind}: training budget spent at step {step} of {total}; stopping here", flush=True)
            total = step  # a hard stop, so that export and evaluation still happen inside the budget
    train_s = time.perf_counter() - t0
    model.eval()
    run_dir = Path(args.out_dir) / kind
    final = export_final(model, rec.model_config(), ByteTokenizer(), rec, run_dir, info, total)
    ev = eval_books(model, rec, args, info.device)
    for layout, by_n in ev.items():
        print(f"eval {kind} {layout}: " + " ".join(f"{n}:{r.get('eval_accuracy', float('nan')):.2f}"
                                                   for n, r in by_n.items()), flush=True)
    results.put({"kind": kind, "steps": total, "train_s": train_s, "curve": curve, "eval": ev, "final": str(final),
                 "params": sum(param_counts(rec.model_config()).values()), "pattern": rec.model_config().pattern,
                 "eval_s": time.perf_counter() - t0 - train_s})


def run(args) -> dict[str, Any]:
    t0 = time.perf_counter()
    recipes = {k: load(k, args, args.max_steps) for k in KINDS}
    same_data(list(recipes.values()))
    rec = recipes["hybrid"]
    ctx = mp.get_context("fork")  # nothing here has touched CUDA: the children initialise it themselves
    queues = [[ctx.Queue(maxsize=8) for _ in KINDS] for _ in range(args.producers)]
    curriculum = parse_curriculum(args.curriculum)
    producers = [ctx.Process(target=_producer, args=(queues[j], j, rec, curriculum, args.producers), daemon=True)
                 for j in range(args.producers)]
    barrier, per_step, results = ctx.Barrier(len(KINDS)), ctx.Array("d", len(KINDS)), ctx.Queue()
    trainers = [ctx.Process(target=trainer, args=(c, k, [q for q in queues], barrier, per_step, args, t0, results))
                for c, k in enumerate(KINDS)]
    for p in producers + trainers:
        p.start()
    try:
        got, deadline = {}, time.perf_counter() + args.budget_s + 600
        while len(got) < len(KINDS):
            try:
                r = results.get(timeout=5)
            except queue.Empty:
                dead = [k for k, p in zip(KINDS, trainers) if not p.is_alive() and k not in got]
                if dead and results.empty() or time.perf_counter() > deadline:
                    raise SystemExit(f"trainer(s) {dead or 'timed out'} ended without a result (see the log above)")
                continue
            got[r["kind"]] = r
    finally:
        for p in producers:
            p.terminate()
        for p in trainers:
            p.join(timeout=30)
    d = rec.data
    held = {k: float(np.mean([r["eval_loss"] for lay in got[k]["eval"].values() for r in lay.values()]))
            for k in KINDS}
    return {"steps": got["hybrid"]["steps"], "tokens_per_model": got["hybrid"]["steps"] * rec.optim.micro_batch
            * d.seq_len, "wall_s": time.perf_counter() - t0,
            "recipe": {"seq_len": d.seq_len, "micro_batch": rec.optim.micro_batch, "task_options": d.task_options,
                       "lr": rec.optim.lr, "min_lr": rec.optim.min_lr, "warmup_steps": rec.optim.warmup_steps,
                       "schedule": rec.optim.schedule, "curriculum": parse_curriculum(args.curriculum)},
            "models": {k: {x: got[k][x] for x in ("params", "pattern", "train_s", "eval_s", "final", "steps")}
                       for k in KINDS},
            "curves": {k: got[k]["curve"] for k in KINDS}, "eval": {k: got[k]["eval"] for k in KINDS},
            "held_out_answer_loss": held}


def plot(res: dict[str, Any], path: Path) -> None:
    """Training loss (answer tokens) per model, and held-out exact match vs book size per model and layout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, color in zip(KINDS, ("tab:blue", "tab:orange", "tab:green")):
        steps, losses = zip(*res["curves"][kind]) if res["curves"][kind] else ((), ())
        a.plot(steps, losses, color=color, label=kind)
        for layout, style in zip(LAYOUTS, ("-", "--")):
            by = res["eval"][kind].get(layout, {})
            ns = sorted(by, key=int)
            b.plot([int(n) for n in ns], [by[n].get("eval_accuracy", float("nan")) for n in ns], style, marker="o",
                   color=color, label=f"{kind} ({layout})")
    a.set(xlabel="step", ylabel="training loss on the answers (nats)", title="training")
    b.set(xlabel="phonebook entries", ylabel="exact match (held-out books)", ylim=(-0.03, 1.03),
          title=f"{res['steps']} steps, {res['tokens_per_model'] / 1e6:.0f}M tokens per model")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="ref", help="kernel backend for training (ref: no Triton JIT/autotune)")
    ap.add_argument("--tiny", action="store_true", help="d_model 64, batch 4, rows of 640 (CPU smoke test)")
    ap.add_argument("--set", action="append", default=[], help="a recipe override for all three (repeatable)")
    ap.add_argument("--eval-sizes", type=ints, default=[1, 2, 4, 8, 12, 16, 24, 32])
    ap.add_argument("--eval-batches", type=int, default=2)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=90.0, help="wall time of training + export + evaluation")
    ap.add_argument("--eval-reserve-s", type=float, default=15.0)
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--curriculum", default="", help="growing books: ENTRIES:UNTIL_STEP,... (e.g. 2:300,4:500): "
                    "books of at most ENTRIES entries before step UNTIL_STEP, then the recipe's n_entries")
    ap.add_argument("--calibrate", type=int, default=12)
    ap.add_argument("--producers", type=int, default=10, help="data processes (each batch goes to all trainers)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--out-dir", default="paper_phonebook")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier run's paper_phonebook.json")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    res["env"] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  "torch": torch.__version__, "backend": args.backend, "args": vars(args)}
    (out / "paper_phonebook.json").write_text(json.dumps(res, indent=1))
    try:
        plot(res, out / "paper_phonebook.png")
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON has everything)")
    for kind in KINDS:
        accs = {lay: {n: round(v.get("eval_accuracy", float("nan")), 2) for n, v in by.items()}
                for lay, by in res["eval"][kind].items()}
        print(f"{kind:12s} held-out answer loss {res['held_out_answer_loss'][kind]:.3f}  accuracy {accs}")


if __name__ == "__main__":
    main()
