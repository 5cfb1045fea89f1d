"""Packed-document training on the real data path (GPU): hybrid-1.3b at seq 4096, 16K, 32K (and more with --seqs),
packed rows from the loader (seq_idx: document-aware attention, SSM resets) vs the same tokens one document per row
(seq_idx None: plain causal attention), side by side in one run; compiled.

    python benchmarks/train_packed_gpu.py                         # on the H200, from the repo root
    python benchmarks/train_packed_gpu.py --seqs 4096 --kinds flash,flex   # both document paths at 4K
    python benchmarks/train_packed_gpu.py --tiny                  # CPU smoke run: tiny preset, seq 256 / 512
    OUT=/some/dir python benchmarks/train_packed_gpu.py           # also writes $OUT/train_packed_gpu.json

Training is hybridctl's own step (hybridctl.train: build_training_model → build_optimizer → train_step) on
recipes/hybrid-1.3b.toml: fp32 master weights, bf16 autocast, fused AdamW, clipping, ``parallel.compile``. Batches are
``hybridctl.data.build_loader``'s output on the embedded corpus with the byte tokenizer (the loader's real packing:
ragged documents, a document continuing into the next row); the unpacked row drops seq_idx from the same batches, so
both rows do the same work on the same tokens and differ only in the document handling.

Micro-batch / activation checkpointing: the first candidate that ``hybridctl.model.check_training_memory`` (the
pre-flight estimate of `hybridctl train`) accepts for the device; an out-of-memory candidate is skipped and reported.
Columns: tokens/s (median step), MFU = flops_per_token(cfg, seq)["training"] × tokens/s / peak (989 TFLOP/s dense
bf16, --peak-tflops), peak memory (torch.cuda.max_memory_allocated) next to the estimate, and attention's share of
the step: the profiler's device time of attention kernels (names with flash / flex_attention / fmha / attention;
on CPU the attention ops' self time) over all kernels of one profiled step.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hybridctl import kernels  # noqa: E402
from hybridctl.config import HybridctlError  # noqa: E402
from hybridctl.data import build_loader  # noqa: E402
from hybridctl.model import check_training_memory, flops_per_token, param_counts  # noqa: E402
from hybridctl.parallel import DistInfo  # noqa: E402
from hybridctl.recipe import load_recipe  # noqa: E402
from hybridctl.tokenizer import build_tokenizer  # noqa: E402
from hybridctl.train import build_optimizer, build_training_model, device_memory, train_step  # noqa: E402

# (micro_batch, activation_checkpointing) in order of preference per sequence length (tokens per micro-batch)
CANDIDATES = [(8, False), (4, False), (8, True), (2, False), (4, True), (1, False), (2, True), (1, True)]
ATTENTION_KERNELS = ("flash", "flex_attention", "fmha", "attention")


_T0 = time.perf_counter()


def _say(msg: str) -> None:
    """A progress line (so that a call cut at its limit still shows how far each phase got)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Results:
    """Rows so far, written to $OUT/train_packed_gpu.json (temp + rename) after every step of progress."""

    def __init__(self, meta: dict) -> None:
        self.meta, self.rows = meta, []
        out = os.environ.get("OUT")
        self.path = Path(out) / "train_packed_gpu.json" if out else None

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        return row

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.meta, "rows": self.rows, "wall_s": time.perf_counter() - _T0}, indent=1))
        tmp.replace(self.path)


def _batches(seq: int, micro: int, n: int) -> list[dict[str, torch.Tensor]]:
    loader = build_loader(source="builtin", tokenizer=build_tokenizer("byte"), seq_len=seq, batch_size=micro, seed=0)
    return list(itertools.islice(loader, n))


def _attention_share(step, dev: torch.device) -> float | None:
    """Attention kernels' device time (CPU: attention ops' self time) over all of one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(dev)
    total = attn = 0.0
    for ev in prof.key_averages():
        t = ev.self_device_time_total if dev.type == "cuda" else ev.self_cpu_time_total
        if dev.type == "cuda" and ev.device_type.name != "CUDA":
            continue
        total += t
        if any(s in ev.key.lower() for s in ATTENTION_KERNELS):
            attn += t
    return attn / total if total else None


def _recipe(args, seq: int, micro: int, ac: bool):
    name = "tiny" if args.tiny else args.model
    sets = [f"data.seq_len={seq}", f"optim.micro_batch={micro}", f"optim.global_batch={micro}",
            f"parallel.activation_checkpointing={str(ac).lower()}", f"parallel.compile={str(args.compile).lower()}",
            f"precision.dtype={'float32' if args.tiny else 'bfloat16'}"]
    return load_recipe(ROOT / "recipes" / f"{name}.toml", sets)


def _label(args, seq: int, packed: bool, kind: str | None) -> str:
    return f"{'tiny' if args.tiny else args.model} T={seq} " + (f"packed ({kind or 'auto'})" if packed else "unpacked")


def _run_row(args, res: Results, row: dict, model, opt, recipe, batches, dev: torch.device) -> None:
    """Warm-up and timed steps of one row, filling ``row`` (already in ``res``) as it goes."""
    info = DistInfo(0, 1, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with kernels.force_document_attention(row["attention_kind"]):
        row["warmup_step_s"], row["step_s_all"] = [], []
        _say(f"{row['row']}: warm-up (compilation) starts")
        for i in range(args.warmup):
            t = time.perf_counter()
            loss, _ = train_step(model, opt, [batches[i % 2]], recipe, info)
            _sync(dev)
            row["warmup_step_s"].append(time.perf_counter() - t)
            _say(f"{row['row']}: warm-up step {i + 1}/{args.warmup} {row['warmup_step_s'][-1]:.2f} s, loss {loss:.3f}")
            res.write()
        row["warmup_s"] = sum(row["warmup_step_s"])
        for i in range(args.steps):
            t = time.perf_counter()
            train_step(model, opt, [batches[i % 2]], recipe, info)
            _sync(dev)
            row["step_s_all"].append(time.perf_counter() - t)
            _say(f"{row['row']}: step {i + 1}/{args.steps} {row['step_s_all'][-1]:.3f} s")
        s = statistics.median(row["step_s_all"])
        tps = row["micro_batch"] * row["seq_len"] / s
        row.update(step_s=s, tokens_per_s=tps, mfu=row["flops_per_token"] * tps / args.peak,
                   max_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
        res.write()
        _say(f"{row['row']}: {tps:,.0f} tokens/s, MFU {row['mfu']:.1%}; profiling one step")
        row["attention_share"] = _attention_share(
            lambda: train_step(model, opt, [batches[0]], recipe, info), dev)
    row["status"] = "done"
    res.write()


def bench_seq(args, res: Results, seq: int, variants: list[tuple[bool, str | None]], dev: torch.device) -> None:
    """The rows of one sequence length on ONE model (built once: the rows reuse its compiled blocks): the first
    (micro-batch, checkpointing) that the estimate admits and that runs; an out-of-memory candidate is skipped."""
    capacity, dev_name = device_memory(dev)
    skipped: list[str] = []
    todo = list(variants)
    for micro, ac in CANDIDATES:
        if not todo:
            return
        recipe = _recipe(args, seq, micro, ac)
        cfg = recipe.model_config()
        tag = f"mb{micro}{'+ac' if ac else ''}"
        try:
            est = check_training_memory(cfg, seq_len=seq, micro_batch=micro, activation_checkpointing=ac,
                                        world_size=1, compute_bytes=4 if args.tiny else 2,
                                        capacity_bytes=capacity, device_name=dev_name)
        except HybridctlError:
            skipped.append(f"{tag}: estimate too large")
            continue
        model = opt = None
        try:
            _say(f"T={seq} {tag}: building the model")
            model, no_decay = build_training_model(cfg, recipe, None, DistInfo(0, 1, dev))
            opt = build_optimizer(model, no_decay, recipe, dev)
            batches = _batches(seq, micro, 2)
            docs = sum(int(b["seq_idx"][:, -1].sum()) + micro for b in batches) / 2  # documents per batch
            _say(f"T={seq} {tag}: built ({docs / micro:.1f} documents per row)")
            while todo:
                packed, kind = todo[0]
                row = res.add(dict(row=_label(args, seq, packed, kind), seq_len=seq, packed=packed,
                                   attention_kind=kind, micro_batch=micro, activation_checkpointing=ac,
                                   compile=args.compile, documents_per_row=docs / micro,
                                   flops_per_token=flops_per_token(cfg, seq)["training"],
                                   params=sum(param_counts(cfg).values()), estimate_gib=est["total"] / 2**30,
                                   skipped=skipped, status="running"))
                rb = batches if packed else [{**b, "seq_idx": None} for b in batches]  # same tokens, 1 doc/row
                try:
                    _run_row(args, res, row, model, opt, recipe, rb, dev)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 - one failed row is reported, the others still run
                    row.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
                    res.write()
                    _say(f"{row['row']}: ERROR {row['error']}")
                todo.pop(0)
        except torch.cuda.OutOfMemoryError:
            skipped.append(f"{tag}: OOM")
            if res.rows and res.rows[-1].get("status") == "running":
                res.rows.pop()
            _say(f"T={seq} {tag}: out of memory, next candidate")
        finally:
            del model, opt
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    for packed, kind in todo:
        res.add(dict(row=_label(args, seq, packed, kind), seq_len=seq, packed=packed, status="error",
                     error="no configuration fits", skipped=skipped))


def bench_mamba_ssm(args, cfg, seq: int, micro: int, dev: torch.device) -> dict:
    """mamba_ssm's MambaLMHeadModel, a pure Mamba-2 of the recipe's width (48 layers, N 128, P 64, G 8, tied), trained
    like ours: fp32 master weights, bf16 autocast, fused AdamW, unfused path (causal_conv1d absent: use_mem_eff_path
    False), the loader's tokens without seq_idx; tokens/s of the median step."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    mc = MambaConfig(d_model=cfg.d_model, n_layer=48, d_intermediate=0, vocab_size=cfg.vocab_size,
                     ssm_cfg={"layer": "Mamba2", "d_state": 128, "headdim": 64, "ngroups": 8,
                              "use_mem_eff_path": False},
                     rms_norm=True, residual_in_fp32=True, fused_add_norm=False, pad_vocab_size_multiple=16)
    model = MambaLMHeadModel(mc, device=dev, dtype=torch.float32).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches = _batches(seq, micro, 2)

    def step(b):
        ids, labels = b["input_ids"].to(dev), b["labels"].to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _say(f"mamba_ssm T={seq} mb{micro}: built ({params / 1e9:.2f}B parameters); warm-up starts")
    for i in range(args.warmup):
        t = time.perf_counter()
        step(batches[i % 2])
        _sync(dev)
        _say(f"mamba_ssm: warm-up step {i + 1}/{args.warmup} {time.perf_counter() - t:.2f} s")
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        step(batches[i % 2])
        _sync(dev)
        times.append(time.perf_counter() - t)
        _say(f"mamba_ssm: step {i + 1}/{args.steps} {times[-1]:.3f} s")
    s = statistics.median(times)
    out = dict(row=f"mamba_ssm MambaLMHeadModel T={seq}", seq_len=seq, micro_batch=micro, params=params, step_s=s,
               tokens_per_s=micro * seq / s, step_s_all=times, status="done",
               max_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _table(rows: list[dict]) -> str:
    head = f"{'row':<34}{'mb':>3}{'ac':>3}{'docs/row':>9}{'step s':>8}{'tok/s':>10}{'MFU':>7}{'mem GiB':>8}" \
           f"{'est GiB':>8}{'attn':>6}"
    lines = [head]
    for r in rows:
        if "error" in r or "step_s" not in r:
            lines.append(f"{r['row']:<34} {r.get('error', r.get('status'))} ({'; '.join(r.get('skipped', []))})")
            continue
        if "mamba_ssm" in r["row"]:  # the peer row
            lines.append(f"{r['row']:<34}{r['micro_batch']:>3}{'n':>3}{'-':>9}{r['step_s']:>8.3f}"
                         f"{r['tokens_per_s']:>10,.0f}{'-':>7}{r['max_memory_gib']:>8.1f}")
            continue
        mem = f"{r['max_memory_gib']:>8.1f}" if r["max_memory_gib"] is not None else f"{'-':>8}"
        share = f"{r['attention_share']:>6.1%}" if r.get("attention_share") is not None else f"{'-':>6}"
        lines.append(f"{r['row']:<34}{r['micro_batch']:>3}{'y' if r['activation_checkpointing'] else 'n':>3}"
                     f"{r['documents_per_row']:>9.1f}{r['step_s']:>8.3f}{r['tokens_per_s']:>10,.0f}{r['mfu']:>7.1%}"
                     f"{mem}{r['estimate_gib']:>8.1f}{share}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="hybrid-1.3b", help="recipe under recipes/")
    ap.add_argument("--seqs", default="4096,16384,32768", help="comma-separated sequence lengths, in priority order")
    ap.add_argument("--kinds", default="auto", help="document paths for the packed rows: auto,flash,flex,segments")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile each block (default: on, off with --tiny)")
    ap.add_argument("--no-unpacked", action="store_true", help="only the packed rows (unpacked measured elsewhere)")
    ap.add_argument("--long-unpacked", action="store_true", help="also the unpacked rows after the first seq")
    ap.add_argument("--mamba-ssm", default="", metavar="MB",
                    help="also train mamba_ssm's MambaLMHeadModel at the first seq with this micro-batch (GPU), "
                         "right after that seq's rows")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny recipe at seq 256 and 512, fp32")
    args = ap.parse_args()
    args.compile = (not args.tiny) if args.compile is None else args.compile
    args.peak = args.peak_tflops * 1e12
    if args.tiny:
        dev, seqs = torch.device("cpu"), [256, 512] if args.seqs == ap.get_default("seqs") else \
            [int(s) for s in args.seqs.split(",")]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        kernels.set_backend("auto")
    else:
        if not torch.cuda.is_available():
            sys.exit("train_packed_gpu.py needs a CUDA GPU (or --tiny for the CPU smoke run)")
        dev, seqs = torch.device("cuda"), [int(s) for s in args.seqs.split(",")]
        kernels.set_backend("kernel")  # raises with the reason if mamba_ssm's kernels are missing
        torch.backends.cuda.matmul.allow_tf32 = True
    # Training shapes are fixed per row: compile each block kind once per shape (no "automatic dynamic" second
    # compile), and leave room in Dynamo's cache for 3 block kinds x packed/unpacked x the sequence lengths.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    kinds = [None if k == "auto" else k for k in args.kinds.split(",")]
    res = Results({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   "torch": torch.__version__, "backend": kernels.describe(), "peak_tflops": args.peak_tflops,
                   "command": " ".join(sys.argv)})
    _say(f"device {res.meta['device']}, torch {torch.__version__}, document attention "
         f"{res.meta['backend']['attention_documents']}")
    for n, seq in enumerate(seqs):
        variants = [(True, k) for k in kinds] + [(False, None)] * (not args.no_unpacked and
                                                                    (n == 0 or args.long_unpacked))
        bench_seq(args, res, seq, variants, dev)
        for r in res.rows[-len(variants):]:
            print(json.dumps({k: v for k, v in r.items() if k not in ("step_s_all", "warmup_step_s")}), flush=True)
        if n == 0 and args.mamba_ssm and dev.type == "cuda":
            try:
                row = bench_mamba_ssm(args, _recipe(args, seq, 1, False).model_config(), seq, int(args.mamba_ssm), dev)
            except Exception as e:  # noqa: BLE001 - the peer row is reported, not fatal
                row = dict(row="mamba_ssm MambaLMHeadModel", status="error", error=f"{type(e).__name__}: {e}"[:300],
                           skipped=[])
            ours = next((r for r in res.rows if r.get("seq_len") == seq and r.get("packed") and "mfu" in r), None)
            if ours and "tokens_per_s" in row:
                row["ratio_ours_over_mamba_ssm"] = ours["tokens_per_s"] / row["tokens_per_s"]
            res.add(row)
            print(json.dumps({k: v for k, v in row.items() if k != "step_s_all"}), flush=True)
    res.write()
    print(f"device: {res.meta['device']}   torch {torch.__version__}   backend: {kernels.describe()}")
    print(_table(res.rows))
    if any("error" in r for r in res.rows if "mamba_ssm" not in r["row"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
