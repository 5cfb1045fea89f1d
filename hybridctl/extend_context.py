"""`hybridctl extend-context CKPT --seq-len N --out DIR`: continued pretraining to a longer context, planned,
resumable and evaluated before and after.

``plan_extension`` derives a complete training recipe from the checkpoint and the options, and checks everything
before a byte is written (target above the trained length, memory, data, mix). The recipe:

- ``model.init_from`` = CKPT (weights and config), ``model.rope_base`` for rotary attention (below);
- ``data``: the corpus at the target length with documents of at least the trained length (``min_doc_tokens``), so a
  row holds one long document's long-range dependencies instead of fragments cut apart; ``short_fraction`` of the
  rows packed with sequences of the trained length (each its own document) so short-context skill is rehearsed; the
  synthetic long-range tasks (``needle``, ``phonebook``, ``copy`` filling the target length) mixed by ``--mix``;
- ``optim``: continued-pretraining schedule: peak LR a third of the pretraining peak (recorded in the export as
  ``peak_lr``; 3e-4 when unknown), short linear warm-up (5% of the steps, at most 100), cosine decay to a tenth;
- ``optim.micro_batch`` / ``parallel.activation_checkpointing``: the largest micro-batch that fits the device
  without checkpointing, else with it (``model.training_memory``); none → the pre-flight's message saying what would.

``run_extension`` writes the run directory: ``plan.json``, ``recipe.toml`` (the resolved recipe: ``hybridctl train
DIR/recipe.toml`` reruns/resumes it), the training run (``checkpoints/``, ``metrics.jsonl``, ``final/`` whose
config records ``max_seq_len``), ``eval_before.json`` / ``eval_after.json``, ``report.json`` and ``plots/``.
Training goes through the ``train_fn`` the caller passes (the CLI passes `hybridctl.train.main_entry`: workflows do
not import each other).

RoPE: NTK-aware base scaling (bloc97 2023; YaRN, Peng et al. 2023, §3.1): ``base' = base · s^(d / (d - 2))``,
``s = new / old`` length, ``d`` the rotated dimensions per head. NoPE attention (the paper's hybrids) is unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hybridctl.config import HybridctlError, ModelConfig
from hybridctl.recipe import MIX_COMPONENTS, Recipe, check_mix, resolve_recipe

log = logging.getLogger(__name__)

DEFAULT_MIX = {"corpus": 0.6, "needle": 0.3, "phonebook": 0.1}
NEEDLE_MIN_FRACTION = 16  # needle examples: log-uniform lengths from seq_len / 16 (at least 128) to seq_len
DEFAULT_SHORT_FRACTION = 0.2
DEFAULT_STEPS = 100
DEFAULT_LR = 3e-4  # when the checkpoint records no pretraining peak
LR_FACTOR = 1 / 3  # peak LR of the extension relative to the pretraining peak
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FILES = ("plan.json", "eval_before.json", "eval_after.json", "report.json")


# ---- small parsers -----------------------------------------------------------------------------------------------


def parse_mix(text: str | None) -> dict[str, float]:
    """``"corpus=0.9,phonebook=0.05,needle=0.05"`` → {name: weight}; the weights must sum to 1."""
    if text is None:
        return dict(DEFAULT_MIX)
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            w = float(value)
        except ValueError:
            raise HybridctlError(f"--mix {text!r}: {part!r} is not name=weight") from None
        if name not in MIX_COMPONENTS:
            raise HybridctlError(f"--mix: unknown component {name!r}; valid: {', '.join(MIX_COMPONENTS)}")
        out[name] = out.get(name, 0.0) + w
    if not out:
        raise HybridctlError("--mix: empty; e.g. --mix corpus=0.9,phonebook=0.05,needle=0.05")
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise HybridctlError(f"--mix {text!r}: the weights must sum to 1, got {sum(out.values()):g}")
    check_mix(out, 0.0, 0, 1)
    return out


def parse_lengths(text: str | None, seq_len: int, base: int) -> list[int]:
    """``"256,512,1024"`` → sorted lengths, each in [1, seq_len]; default: base, the powers of two between, seq_len."""
    if text is None:
        out, x = {base, seq_len}, base * 2
        while x < seq_len:
            out.add(x)
            x *= 2
        return sorted(out)
    try:
        vals = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise HybridctlError(f"--eval-lengths {text!r}: expected comma-separated integers") from None
    if not vals or vals[0] < 1 or vals[-1] > seq_len:
        raise HybridctlError(f"--eval-lengths {text!r}: each must lie in [1, --seq-len {seq_len}]")
    return vals


def ntk_rope_base(base: float, old_len: int, new_len: int, rotary_dims: int) -> float:
    """NTK-aware RoPE base for a ``new_len / old_len`` longer context: base · s^(d / (d - 2))."""
    s = new_len / old_len
    return base * s ** (rotary_dims / (rotary_dims - 2)) if rotary_dims > 2 else base * s


# ---- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class ExtendPlan:
    checkpoint: Path
    run_dir: Path
    base_seq_len: int
    seq_len: int
    recipe: Recipe
    config: ModelConfig
    eval_lengths: list[int]
    eval_examples: int
    device: str
    capacity_bytes: int
    world_size: int
    memory: dict[str, Any]
    inference: dict[str, Any]
    rope: dict[str, Any] | None
    n_params: int
    eval_docs: list[list[int]] = field(default_factory=list, repr=False)  # held-out long documents (token ids)

    def summary(self) -> dict[str, Any]:
        r = self.recipe
        return {"checkpoint": str(self.checkpoint), "run_dir": str(self.run_dir), "base_seq_len": self.base_seq_len,
                "seq_len": self.seq_len, "parameters": self.n_params, "steps": r.total_steps,
                "tokens": r.total_steps * r.optim.global_batch * r.data.seq_len,
                "global_batch": r.optim.global_batch, "micro_batch": r.optim.micro_batch,
                "activation_checkpointing": r.parallel.activation_checkpointing, "world_size": self.world_size,
                "lr": {"peak": r.optim.lr, "min": r.optim.min_lr, "warmup_steps": r.optim.warmup_steps,
                       "schedule": r.optim.schedule},
                "data": {"source": r.data.source, "mix": r.data.mix, "task_options": r.data.task_options,
                         "short_fraction": r.data.short_fraction,
                         "short_seq_len": r.data.short_seq_len, "min_doc_tokens": r.data.min_doc_tokens},
                "memory": self.memory, "inference": self.inference, "rope": self.rope,
                "device": self.device, "capacity_bytes": self.capacity_bytes, "fits": self.memory["fits"],
                "eval_lengths": self.eval_lengths, "eval_examples": self.eval_examples}


def _base_info(checkpoint: str | Path, base_seq_len: int | None):
    from hybridctl.checkpoint import check_specs, open_checkpoint

    src = open_checkpoint(checkpoint)
    check_specs(src.config, src.specs, str(src.path))
    base = base_seq_len or src.config.max_seq_len
    if base is None:
        raise HybridctlError(f"{checkpoint}: its config records no trained context length (max_seq_len); pass "
                             "--base-seq-len N")
    peak = src.info.get("peak_lr") if isinstance(src.info, dict) else None
    return src, base, peak


def _memory(cfg: ModelConfig, recipe: Recipe, world: int, compute_bytes: int, capacity: int,
            backend: str) -> dict[str, Any]:
    """Training memory per device at the recipe's micro-batch, with and without activation checkpointing, for the
    backend that will run (``kernels.training_backend``)."""
    from hybridctl.model import MEMORY_HEADROOM, training_memory

    kw = dict(seq_len=recipe.data.seq_len, micro_batch=recipe.optim.micro_batch, world_size=world,
              compute_bytes=compute_bytes, backend=backend)
    plain = training_memory(cfg, activation_checkpointing=False, **kw)
    ckpt = training_memory(cfg, activation_checkpointing=True, **kw)
    chosen = ckpt if recipe.parallel.activation_checkpointing else plain
    return {"params": plain["params"], "grads": plain["grads"], "optimizer": plain["optimizer"],
            "activations": plain["activations"], "activations_checkpointed": ckpt["activations"],
            "total": plain["total"], "total_checkpointed": ckpt["total"], "limit": MEMORY_HEADROOM * capacity,
            "fits": chosen["total"] <= MEMORY_HEADROOM * capacity, "backend": backend}


def _inference(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
    """Decode memory of one sequence at ``seq_len`` (bf16 KV, fp32 SSM state) against a Transformer of the same
    width and depth (every Mamba layer an attention layer with the same heads)."""
    from hybridctl.model import memory_per_sequence, param_counts

    mine = memory_per_sequence(cfg, dtype_bytes=2)
    tcfg = cfg.replace(pattern=cfg.pattern.replace("M", "*"))
    theirs = memory_per_sequence(tcfg, dtype_bytes=2)
    return {"ssm_state_bytes": mine["state_bytes_per_sequence"], "kv_cache_bytes": mine["kv_bytes_per_token"] * seq_len,
            "total_bytes": mine["state_bytes_per_sequence"] + mine["kv_bytes_per_token"] * seq_len,
            "transformer_pattern": tcfg.pattern, "transformer_parameters": sum(param_counts(tcfg).values()),
            "transformer_kv_bytes": theirs["kv_bytes_per_token"] * seq_len}


def _fit_batch(cfg: ModelConfig, recipe: Recipe, world: int, compute_bytes: int, capacity: int,
               fixed_mb: bool, fixed_ac: bool, device_name: str, backend: str) -> None:
    """Set optim.micro_batch / parallel.activation_checkpointing to the largest micro-batch that fits (without
    checkpointing first) unless the user set them; raise with what would fit when nothing does."""
    from hybridctl.model import MEMORY_HEADROOM, check_training_memory, training_memory

    o, p = recipe.optim, recipe.parallel
    per_rank = o.global_batch // world
    mbs = [o.micro_batch] if fixed_mb else [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
    acs = [p.activation_checkpointing] if fixed_ac else [False, True]
    for ac in acs:
        for mb in mbs:
            est = training_memory(cfg, seq_len=recipe.data.seq_len, micro_batch=mb, activation_checkpointing=ac,
                                  world_size=world, compute_bytes=compute_bytes, backend=backend)["total"]
            if est <= MEMORY_HEADROOM * capacity:
                o.micro_batch, p.activation_checkpointing = mb, ac
                return
    o.micro_batch, p.activation_checkpointing = mbs[-1], acs[-1]
    check_training_memory(cfg, seq_len=recipe.data.seq_len, micro_batch=o.micro_batch,
                          activation_checkpointing=p.activation_checkpointing, world_size=world,
                          compute_bytes=compute_bytes, capacity_bytes=capacity, device_name=device_name,
                          backend=backend)


def _rope(cfg: ModelConfig, base_len: int, seq_len: int, rope_base: float | None) -> dict[str, Any] | None:
    rotary = "*" in cfg.pattern and cfg.attention.position == "rope"
    if not rotary:
        if rope_base is not None:
            raise HybridctlError("--rope-base: this model's attention has no rotary embeddings (NoPE); drop it")
        return None
    dims = int(cfg.attention.rotary_fraction * cfg.head_dim)
    new = rope_base if rope_base is not None else ntk_rope_base(cfg.attention.rope_base, base_len, seq_len, dims)
    return {"old": cfg.attention.rope_base, "new": new, "rotary_dims": dims,
            "rule": "given" if rope_base is not None else "ntk: base * (new/old)^(d/(d-2))"}


def _raw_recipe(*, checkpoint: Path, run_dir: Path, seq_len: int, base: int, steps: int | None,
                tokens: int | None, data: str, mix: dict, short_fraction: float, lr: float,
                rope: dict | None) -> dict[str, Any]:
    n = tokens if tokens is not None else None
    optim: dict[str, Any] = {"tokens": n} if n is not None else {"steps": steps or DEFAULT_STEPS}
    total = steps or DEFAULT_STEPS
    if n is not None:
        total = math.ceil(n / (8 * seq_len))  # refined by resolve_recipe; only the warm-up length reads it
    optim.update(lr=lr, min_lr=lr / 10, warmup_steps=max(1, min(100, total // 20)), schedule="cosine",
                 micro_batch=1, global_batch=8)  # micro_batch: chosen by _fit_batch
    task_options = default_task_options(mix, seq_len)
    return {"name": f"extend-{seq_len}", "seed": 0,
            "model": {"init_from": str(checkpoint), **({"rope_base": rope["new"]} if rope else {})},
            "data": {"source": data, "seq_len": seq_len, "mix": mix, "short_fraction": short_fraction,
                     "short_seq_len": base if short_fraction > 0 else 0, "min_doc_tokens": base + 1,
                     "task_options": task_options},
            "optim": optim, "checkpoint": {"dir": str(run_dir), "interval": max(1, total // 4), "keep_last": 2},
            "eval": {"interval": 0, "batches": 2}, "logging": {"interval": max(1, min(10, total // 10))}}


def default_task_options(mix: dict[str, float], seq_len: int) -> dict[str, dict[str, Any]]:
    """The mixed-in tasks' options: needle examples of log-uniform length from seq_len / 16 (at least 128) to
    seq_len (several per row: more answers per token, all lengths seen); phonebook in the evaluation's standard
    layout (book, solved shots, query) where the phonebook task offers it (``layout``)."""
    from hybridctl.tasks import task_option_names

    out: dict[str, dict[str, Any]] = {}
    if mix.get("needle"):
        out["needle"] = {"min_context_len": min(seq_len, max(128, seq_len // NEEDLE_MIN_FRACTION))}
    if mix.get("phonebook") and "layout" in task_option_names("phonebook"):
        out["phonebook"] = {"layout": "standard"}
    return out


def plan_extension(*, checkpoint: str | Path, seq_len: int, out: str | Path, tokens: int | None = None,
                   steps: int | None = None, data: str = "builtin", mix: str | None = None,
                   short_fraction: float | None = None, lr: float | None = None, overrides: list[str] | None = None,
                   eval_lengths: str | None = None, eval_examples: int = 4, rope_base: float | None = None,
                   base_seq_len: int | None = None, device: str | None = None,
                   backend: str | None = None) -> ExtendPlan:
    """Everything checked, nothing written: the recipe, memory and inference figures (for the kernel backend that
    ``backend`` resolves to on the device), the eval documents."""
    from hybridctl import kernels, parallel
    from hybridctl.checkpoint.io import check_out_path
    from hybridctl.model import param_counts

    if tokens is not None and steps is not None:
        raise HybridctlError("give --tokens or --steps, not both")
    src, base, peak = _base_info(checkpoint, base_seq_len)
    if seq_len <= base:
        raise HybridctlError(f"--seq-len {seq_len}: must be above the checkpoint's trained context length {base}")
    if eval_examples < 1:
        raise HybridctlError(f"--eval-examples: must be >= 1, got {eval_examples}")
    frac = DEFAULT_SHORT_FRACTION if short_fraction is None else short_fraction
    run_dir = Path(out)
    check_out_path(run_dir, [checkpoint], option="--out")
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "plan.json").is_file():
        raise HybridctlError(f"--out {run_dir}: exists and is not an extend-context run directory")
    cfg = src.config
    rope = _rope(cfg, base, seq_len, rope_base)
    raw = _raw_recipe(checkpoint=Path(checkpoint), run_dir=run_dir, seq_len=seq_len, base=base, steps=steps,
                      tokens=tokens, data=data, mix=parse_mix(mix), short_fraction=frac,
                      lr=lr if lr is not None else (peak * LR_FACTOR if peak else DEFAULT_LR), rope=rope)
    recipe = resolve_recipe(raw, overrides, where="extend-context")
    keys = [o.split("=", 1)[0].strip() for o in overrides or []]
    dev = parallel.resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    capacity, name = parallel.device_memory(dev)
    compute = 2 if recipe.precision.dtype == "bfloat16" or (recipe.precision.dtype == "auto" and dev.type == "cuda") \
        else 4
    recipe.grad_accum(world)
    kernels.set_backend(backend)
    eff = kernels.training_backend(dev)
    _fit_batch(cfg, recipe, world, compute, capacity, "optim.micro_batch" in keys,
               "parallel.activation_checkpointing" in keys, name, eff)
    lengths = parse_lengths(eval_lengths, seq_len, base)
    tok = _tokenizer(recipe, src)
    docs = held_out_documents(recipe.data.source, tok, max(lengths) + 1)
    memory = _memory(cfg, recipe, world, compute, capacity, eff)
    return ExtendPlan(Path(checkpoint), run_dir, base, seq_len, recipe, cfg, lengths, eval_examples, str(dev),
                      capacity, world, memory, _inference(cfg, seq_len), rope, sum(param_counts(cfg).values()), docs)


def _tokenizer(recipe: Recipe, src: Any):
    from hybridctl.tokenizer import build_tokenizer, load_tokenizer

    if recipe.tokenizer.name:
        return build_tokenizer(recipe.tokenizer.name)
    return load_tokenizer(src.tokenizer_dir) if src.tokenizer_dir is not None else build_tokenizer("byte")


def held_out_documents(source: str | list, tokenizer: Any, min_tokens: int, *, max_docs: int = 8,
                       scan: int = 5000) -> list[list[int]]:
    """Up to ``max_docs`` held-out (eval split) documents of at least ``min_tokens`` tokens, each cut to that length
    (for perplexity by position); the corpus must be readable and hold one."""
    from hybridctl.corpora import iter_documents

    docs = []
    try:
        for i, doc in enumerate(iter_documents(source, split="eval")):
            if i >= scan or len(docs) >= max_docs:
                break
            ids = list(doc) if not isinstance(doc, str) else tokenizer.encode(doc)
            if len(ids) >= min_tokens:
                docs.append([int(t) for t in ids[:min_tokens]])
    except OSError as e:
        raise HybridctlError(f"--data {source}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise HybridctlError(f"--data {source}: not UTF-8 text (byte {e.start})") from None
    if not docs:
        raise HybridctlError(f"--data {source}: no held-out document of >= {min_tokens} tokens for the perplexity "
                             "evaluation (long documents are what context extension trains on)")
    return docs


# ---- evaluation --------------------------------------------------------------------------------------------------


def perplexity_rows(model, docs: list[list[int]], *, window: int, base: int, device: Any = None) -> dict[str, Any]:
    """Perplexity by position over held-out long documents (one window each, from its start; buckets at the
    powers of two, the trained length and the window), plus the pooled loss below and beyond the trained length."""
    from hybridctl.evaluation import perplexity, perplexity_by_position, position_buckets

    edges = sorted({*position_buckets(window), *([base] if base < window else [])})
    total: dict[tuple[int, int], list[float]] = {}
    for ids in docs:
        for r in perplexity_by_position(model, ids[:window + 1], window=window, edges=edges, device=device):
            acc = total.setdefault((r["lo"], r["hi"]), [0.0, 0.0])
            acc[0], acc[1] = acc[0] + r["loss"] * r["tokens"], acc[1] + r["tokens"]
    rows = [{"lo": lo, "hi": hi, "tokens": int(n), "loss": s / n, "ppl": perplexity(s / n)}
            for (lo, hi), (s, n) in sorted(total.items())]

    def pooled(keep: Callable[[dict], bool]) -> float | None:
        sel = [r for r in rows if keep(r)]
        n = sum(r["tokens"] for r in sel)
        return perplexity(sum(r["loss"] * r["tokens"] for r in sel) / n) if n else None

    return {"window": window, "documents": len(docs), "buckets": rows,
            "ppl_within_base": pooled(lambda r: r["hi"] <= base), "ppl_beyond_base": pooled(lambda r: r["lo"] >= base)}


def evaluate_checkpoint(path: str | Path, *, tokenizer: Any, lengths: list[int], base: int, docs: list[list[int]],
                        n: int, device: Any = None, seed: int = 1234) -> dict[str, Any]:
    """The long-context report of one checkpoint: perplexity by position (window = the longest eval length),
    phonebook accuracy (paper's standard layout, random depth) per length, needle accuracy over depth × length.
    Scored by greedy decoding on the decode runtime (``task_eval.sweep_task``'s default, the ``generate`` path);
    fp32 weights on the CPU, bf16 on CUDA."""
    import time

    import torch

    from hybridctl.checkpoint import load_model
    from hybridctl.task_eval import sweep_task

    dev = torch.device(device or "cpu")
    t0 = time.perf_counter()
    model, _ = load_model(path, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    out: dict[str, Any] = {"checkpoint": str(path)}
    out["perplexity"] = perplexity_rows(model, docs, window=max(lengths), base=base)
    log.info("eval %s: perplexity within / beyond %d: %.3f / %.3f", path, base, out["perplexity"]["ppl_within_base"],
             out["perplexity"]["ppl_beyond_base"] or float("nan"))
    book, hay = task_lengths("phonebook", tokenizer, lengths), task_lengths("needle", tokenizer, lengths)
    out["phonebook"] = sweep_task(model, tokenizer, "phonebook", book, None, n=n, seed=seed,
                                  layouts=("standard",)) if book else []
    out["needle"] = sweep_task(model, tokenizer, "needle", hay, NEEDLE_DEPTHS, n=n, seed=seed) if hay else []
    out["wall_s"] = time.perf_counter() - t0
    return out


def task_lengths(task: str, tokenizer: Any, lengths: list[int]) -> list[int]:
    """The lengths at which ``task``'s smallest prompt fits (phonebook's book with its shots needs ~270 bytes)."""
    from hybridctl.tasks import eval_examples

    ok = []
    for x in lengths:
        try:
            eval_examples(task, tokenizer, x, n=1)
            ok.append(x)
        except HybridctlError:
            pass
    return ok


def _pooled(rows: list[dict], length: int) -> float | None:
    sel = [r for r in rows if r["length"] == length]
    n = sum(r["examples"] for r in sel)
    return sum(r["correct"] for r in sel) / n if n else None


def compare(before: dict[str, Any], after: dict[str, Any], lengths: list[int]) -> dict[str, Any]:
    """Before/after headline numbers: perplexity within / beyond the trained length, task accuracy per length."""
    out: dict[str, Any] = {}
    for k in ("ppl_within_base", "ppl_beyond_base"):
        out[k] = {"before": before["perplexity"][k], "after": after["perplexity"][k]}
    # short-context loss: nats per token at positions below the trained length (causal: = the loss of a window of
    # the trained length); "change" is after / before - 1 (the bound: it must not rise by more than 2%)
    b, a = (math.log(x) for x in (out["ppl_within_base"]["before"], out["ppl_within_base"]["after"]))
    out["short_context_loss"] = {"before": b, "after": a, "change": a / b - 1}
    for task in ("phonebook", "needle"):
        out[task] = {str(x): {"before": _pooled(before[task], x), "after": _pooled(after[task], x)}
                     for x in lengths if any(r["length"] == x for r in after[task])}
    return out


def write_plots(run_dir: Path, before: dict[str, Any], after: dict[str, Any]) -> list[Path]:
    """plots/: accuracy vs length per task and the needle heatmap (bench's plots), perplexity by position."""
    from hybridctl import plots

    rows = [dict(r, model=name) for name, ev in (("before", before), ("after", after))
            for task in ("phonebook", "needle") for r in ev[task]]
    out = plots.write_plots(run_dir / "plots", tasks=rows) if rows else []
    ppl = [{"model": name, "window": ev["perplexity"]["window"], "position": max(1, (r["lo"] + r["hi"]) // 2),
            "ppl": r["ppl"]} for name, ev in (("before", before), ("after", after))
           for r in ev["perplexity"]["buckets"]]
    out.append(plots._lines(ppl, run_dir / "plots" / "perplexity_by_position.png", x="position", series="window",
                            y="ppl", ylabel="perplexity", xlabel="position in the context (bucket middle)",
                            title="Perplexity by position, before vs after", err=False))
    return out


# ---- the run -----------------------------------------------------------------------------------------------------


@dataclass
class ExtendResult:
    run_dir: Path
    report: dict[str, Any]
    plots: list[Path]
    train: Any  # the train_fn's result

    def summary(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "report": str(self.run_dir / "report.json"),
                "plots": [str(p) for p in self.plots], **self.report["compare"],
                "train": self.report["train"]}


def write_json(path: Path, obj: Any) -> None:
    """JSON, atomically (a temp file renamed)."""
    import json

    from hybridctl.checkpoint.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _cached(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    import json

    if path.is_file():
        return json.loads(path.read_text())
    out = make()
    write_json(path, out)
    return out


class _PeakMemory:
    """CUDA peak allocated bytes over the block (training), None elsewhere."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.peak: int | None = None

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))


def run_extension(plan: ExtendPlan, *, train_fn: Callable[..., Any], resume: str | None = "auto",
                  device: str | None = None, backend: str | None = None) -> ExtendResult | None:
    """Write the run directory, evaluate the base (once: cached), train through ``train_fn(recipe=, run_dir=,
    resume=, device=, backend=)`` (every rank under torchrun), evaluate the export, write the report and plots
    (rank 0; other ranks return None)."""
    import shutil

    from hybridctl.checkpoint.training import find_checkpoint

    main = int(os.environ.get("RANK", "0")) == 0
    run_dir, created = plan.run_dir, not plan.run_dir.exists()
    tok = _tokenizer(plan.recipe, _base_info(plan.checkpoint, plan.base_seq_len)[0])
    ev = dict(tokenizer=tok, lengths=plan.eval_lengths, base=plan.base_seq_len, docs=plan.eval_docs,
              n=plan.eval_examples, device=plan.device)
    try:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "plan.json", plan.summary())
            before = _cached(run_dir / "eval_before.json", lambda: evaluate_checkpoint(plan.checkpoint, **ev))
        peak = _PeakMemory(plan.device)
        with peak:
            res = train_fn(recipe=plan.recipe, run_dir=run_dir, resume=resume, device=device, backend=backend)
    except BaseException:
        if main and created and run_dir.is_dir() and find_checkpoint(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if not main:
        return None
    after = evaluate_checkpoint(res.export, **ev)
    write_json(run_dir / "eval_after.json", after)
    train = dict(res.summary(), peak_memory_bytes=peak.peak) if hasattr(res, "summary") else None
    report = {"plan": plan.summary(), "train": train,
              "before": before, "after": after, "compare": compare(before, after, plan.eval_lengths)}
    write_json(run_dir / "report.json", report)
    return ExtendResult(run_dir, report, write_plots(run_dir, before, after), res)


__all__ = ["plan_extension", "run_extension", "ExtendPlan", "ExtendResult", "parse_mix", "ntk_rope_base",
           "evaluate_checkpoint", "DEFAULT_MIX"]
