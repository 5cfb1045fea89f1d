"""`hybridctl train RECIPE`: the training loop, resumable sharded checkpoints, one device or many (torchrun + FSDP2).

Run directory (``checkpoint.dir`` or ``--run-dir``)::

    recipe.toml                 the resolved recipe (every key, the complete model config)
    metrics.jsonl               one JSON object per logged step / evaluation (tokens_per_s: tokens over the training
                                steps' time since the last row, data loading in, evaluation/checkpoints out); a resume
                                drops the rows after its checkpoint's step, which are then logged again
    checkpoints/                resumable DCP checkpoints published atomically + ``latest`` (checkpoint/training.py)
    final/                      native safetensors export with the tokenizer (what `generate` loads)

``--resume auto`` takes the newest complete checkpoint and ignores anything else. DCP holds tensors only (no
optimizer ``param_groups``, which the recipe re-creates). Several nodes need the run directory on a shared
filesystem (rank 0 publishes).
The LR schedule is a pure function of the step, so the step is the scheduler's whole state.

Losses: the token-mean cross-entropy over the global batch (labels -100 excluded) — each micro-batch's summed loss is
divided by the global count of target tokens, so gradient accumulation and data parallelism give the same gradient
as one big batch.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridctl import parallel
from hybridctl.checkpoint.training import (  # noqa: F401 - part of this workflow's API (tests, benchmarks)
    CKPT_DIR, find_checkpoint, load_checkpoint, resolve_resume, save_checkpoint,
)
from hybridctl.config import HybridctlError, ModelConfig
from hybridctl.data import IGNORE_INDEX
from hybridctl.evaluation import evaluate as evaluate_batches
from hybridctl.evaluation import chunked_lm_loss_sum, lm_loss_sum, perplexity
from hybridctl.recipe import Recipe, dump_toml

log = logging.getLogger(__name__)
# Dense bf16 datasheet peaks (TFLOP/s) for MFU; override with logging.peak_tflops.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0,
               "L40S": 362.0, "A10": 125.0}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps completed (the run's total, including resumed ones)
    tokens: int
    final_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None  # task exact-match (phonebook / copy) when the data is a task
    wall_s: float
    checkpoint: Path | None  # newest complete resumable checkpoint
    export: Path | None  # native export
    resumed_from: Path | None
    losses: list[float] = field(default_factory=list)  # per step of this invocation
    # training throughput of this invocation: tokens / time of the training steps, data loading included,
    # evaluation and checkpoints excluded (metrics.jsonl's tokens_per_s is the same over each logging window)
    tokens_per_s: float | None = None
    mfu: float | None = None

    def summary(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("steps", "tokens", "final_loss", "eval_loss", "eval_accuracy", "wall_s",
                                             "tokens_per_s", "mfu")}
        d.update(run_dir=str(self.run_dir), checkpoint=str(self.checkpoint) if self.checkpoint else None,
                 export=str(self.export) if self.export else None,
                 resumed_from=str(self.resumed_from) if self.resumed_from else None)
        d["eval_ppl"] = perplexity(self.eval_loss) if self.eval_loss is not None else None
        return d


# ---- schedule ----------------------------------------------------------------------------------------------


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine / WSD / constant to min_lr."""
    o, total = recipe.optim, recipe.total_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * min(t, 1.0)))
    decay = max(1, round(o.decay_fraction * total))  # WSD: stable at lr, then linear decay over the last steps
    start = total - decay
    if step < start:
        return o.lr
    return o.lr + (o.min_lr - o.lr) * min(1.0, (step - start + 1) / decay)


# ---- model, optimizer, data -------------------------------------------------------------------------------------------


def resolve_model(recipe: Recipe) -> tuple[ModelConfig, Any]:
    """(config, Source or None): from model.init_from (any readable checkpoint) or the recipe's own config."""
    if recipe.model.init_from is None:
        return recipe.model_config(), None
    from hybridctl.checkpoint import check_specs, open_checkpoint

    src = open_checkpoint(recipe.model.init_from)
    check_specs(src.config, src.specs, str(src.path))
    if recipe.model.rope_base is not None:  # a context extension's new RoPE base (no tensor changes)
        return src.config.replace(attention={**src.config.attention.__dict__, "rope_base": recipe.model.rope_base}), src
    return src.config, src


def _initial_state(cfg: ModelConfig, src: Any, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A full fp32 state dict: the init_from checkpoint's weights, or a fresh initialisation from ``seed``."""
    if src is not None:
        return {name: src.get(name).to(device=device, dtype=torch.float32) for name in src.specs}
    from hybridctl.model import build_model, materialize

    return materialize(build_model(cfg), device, seed=seed).state_dict()


def build_training_model(cfg: ModelConfig, recipe: Recipe, src: Any, info: parallel.DistInfo):
    """Meta model → activation checkpointing → compile → FSDP2 (several ranks) → materialise → initialise/load.

    Returns (model, names of parameters without weight decay). The parameters are fp32 master weights."""
    from hybridctl.model import build_model, no_weight_decay

    model = build_model(cfg, device="meta", dtype=torch.float32)
    no_decay = {n for n, p in model.named_parameters() if no_weight_decay(n, p)}
    if recipe.parallel.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    if recipe.parallel.compile:
        parallel.apply_compile(model)
    if info.distributed:
        bf16 = _use_bf16(recipe, info.device)
        gather_bf16 = bf16 and recipe.parallel.fsdp_param_dtype == "bfloat16"
        parallel.apply_fsdp(model, param_dtype=torch.bfloat16 if gather_bf16 else None,
                            reshard_after_forward=recipe.parallel.reshard_after_forward)
        model.to_empty(device=info.device)
        # rank 0 builds the full initial state on CPU (the same numbers a one-process CPU run starts from) and
        # broadcasts it shard by shard
        full = _initial_state(cfg, src, recipe.seed, torch.device("cpu")) if info.is_main else None
        parallel.load_full_model_state(model, full)
    else:
        model.to_empty(device=info.device)
        if src is None:
            model.init_weights(recipe.seed)
        else:
            model.load_state_dict(_initial_state(cfg, src, recipe.seed, info.device), strict=True)
    return model.train(), no_decay


def build_optimizer(model: torch.nn.Module, no_decay: set[str], recipe: Recipe, device: torch.device):
    """AdamW (fused on CUDA); no weight decay on A_log, D, dt_bias, norms and biases."""
    o = recipe.optim
    decay = [p for n, p in model.named_parameters() if n not in no_decay]
    rest = [p for n, p in model.named_parameters() if n in no_decay]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=True if device.type == "cuda" else None)


def build_tokenizer_for(recipe: Recipe, src: Any, cfg: ModelConfig):
    from hybridctl.tokenizer import build_tokenizer, load_tokenizer

    if recipe.tokenizer.name:
        tok = build_tokenizer(recipe.tokenizer.name)
    elif src is not None and src.tokenizer_dir is not None:
        tok = load_tokenizer(src.tokenizer_dir)
    else:
        tok = build_tokenizer("byte")
    if tok.vocab_size > cfg.vocab_size:
        raise HybridctlError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}; "
                             "raise it (--set model.config.vocab_size=N)")
    return tok


def build_data(recipe: Recipe, tokenizer: Any, info: parallel.DistInfo, split: str):
    from hybridctl.data import build_loader

    d = recipe.data
    return build_loader(source=d.source, tokenizer=tokenizer, seq_len=d.seq_len, batch_size=recipe.optim.micro_batch,
                        seed=recipe.seed, split=split, rank=info.rank, world_size=info.world_size,
                        task_options=d.task_options or None, text_field=d.text_field, eval_every=d.eval_every,
                        shuffle_buffer=d.shuffle_buffer, mix=d.mix or None, short_fraction=d.short_fraction,
                        short_seq_len=d.short_seq_len, min_doc_tokens=d.min_doc_tokens)


device_memory = parallel.device_memory  # moved to the library (extend-context plans with it too)


def check_memory(cfg: ModelConfig, recipe: Recipe, info: parallel.DistInfo) -> dict:
    """Before the first step: HybridctlError when the recipe's estimated peak memory (model.training_memory) exceeds
    the device, with what would fit."""
    from hybridctl import kernels
    from hybridctl.model import check_training_memory

    capacity, name = device_memory(info.device)
    return check_training_memory(cfg, seq_len=recipe.data.seq_len, micro_batch=recipe.optim.micro_batch,
                                 activation_checkpointing=recipe.parallel.activation_checkpointing,
                                 world_size=info.world_size, compute_bytes=2 if _use_bf16(recipe, info.device) else 4,
                                 capacity_bytes=capacity, device_name=name,
                                 backend=kernels.training_backend(info.device))


def _use_bf16(recipe: Recipe, device: torch.device) -> bool:
    p = recipe.precision.dtype
    return p == "bfloat16" or (p == "auto" and device.type == "cuda")


def _autocast(recipe: Recipe, device: torch.device):
    if _use_bf16(recipe, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- one step, evaluation -----------------------------------------------------------------------------------------------


def train_step(model, optimizer, batches: list[dict[str, torch.Tensor]], recipe: Recipe,
               info: parallel.DistInfo) -> tuple[float, float]:
    """Forward/backward over this rank's micro-batches, clip, AdamW step. Returns (global mean loss, grad norm).

    batches: dicts of input_ids / labels int64 [B,T] and seq_idx int32 [B,T] (optional: None = one document per row).
    """
    from hybridctl.model import loss_chunk_tokens

    dev = info.device
    n_tok = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).to(dev, torch.float64)
    n_tok = parallel.all_reduce_sum(n_tok).clamp(min=1)
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    for b in batches:
        x, y = b["input_ids"].to(dev, non_blocking=True), b["labels"].to(dev, non_blocking=True)
        s = b["seq_idx"].to(dev, non_blocking=True) if b.get("seq_idx") is not None else None
        chunk = loss_chunk_tokens(y.numel(), model.cfg.vocab_size) if info.world_size == 1 else None
        with _autocast(recipe, dev):
            if chunk is None:
                ce = lm_loss_sum(model(x, seq_idx=s), y)
            else:  # long rows: the [B,T,V] logits would not fit; head + loss per chunk, recomputed in backward
                ce = chunked_lm_loss_sum(model.logits, model(x, seq_idx=s, return_hidden=True), y, chunk)
        # FSDP averages gradients over ranks: scale by world size so the result is the global token mean
        (ce * (info.world_size / n_tok.float())).backward()
        loss_sum += ce.detach().double()
    clip = recipe.optim.grad_clip if recipe.optim.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(parallel.all_reduce_sum(loss_sum) / n_tok), float(norm)


def evaluate(model, loader, recipe: Recipe, info: parallel.DistInfo) -> dict[str, float]:
    """The recipe's held-out evaluation (``hybridctl.evaluation.evaluate``): ``eval.batches`` micro-batches per rank,
    task exact-match when the data is a task."""
    return evaluate_batches(model, loader, max_batches=recipe.eval.batches, device=info.device,
                            task=bool(recipe.data.task), autocast=lambda: _autocast(recipe, info.device))


# ---- metrics and the entry function ---------------------------------------------------------------------------------


def _peak_flops(recipe: Recipe, device: torch.device) -> float | None:
    if recipe.logging.peak_tflops:
        return recipe.logging.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows of metrics.jsonl logged after ``step`` (a resumed run repeats those steps), atomically.

    Unparseable lines (a crash mid-write) are dropped too. Rank 0 only."""
    if not path.is_file():
        return
    from hybridctl.checkpoint.io import atomic_write_text

    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        elif line.strip():
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
        log.info("metrics.jsonl: dropped %d rows after step %d (logged before the resumed checkpoint's crash)",
                 dropped, step)


class _Metrics:
    """metrics.jsonl on rank 0 (append: a resumed run continues the file, cut back to its checkpoint's step)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.f = open(path, "a") if enabled else None

    def write(self, **row: Any) -> None:
        if self.f is not None:
            self.f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _prepare_run_dir(run_dir: Path, recipe: Recipe, info: parallel.DistInfo) -> None:
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        from hybridctl.checkpoint.io import atomic_write_text

        atomic_write_text(run_dir / "recipe.toml", f"# resolved recipe of run {recipe.name!r}\n"
                          + dump_toml(recipe.to_dict()))
    parallel.barrier()


def train(*, recipe: Recipe, run_dir: str | Path | None = None, resume: str | None = "auto", device: str | None = None,
          backend: str | None = None, max_steps: int | None = None, progress: bool | None = None) -> TrainResult:
    """Train as the recipe says; resumable. Under torchrun every rank calls this (FSDP2 over all of them).

    max_steps: stop this invocation after that optimizer step (the LR schedule still spans the recipe's steps);
    a checkpoint is written at the stop so ``--resume auto`` continues exactly.
    """
    from hybridctl import kernels

    t0 = time.perf_counter()
    info = parallel.init_distributed(device)
    recipe.grad_accum(info.world_size)  # fail now, not after building the model, if the batch does not divide
    kernels.set_backend(backend)
    cfg, src = resolve_model(recipe)
    check_memory(cfg, recipe, info)  # before anything is written
    run_dir = Path(run_dir or recipe.checkpoint.dir)
    if recipe.model.init_from is not None:
        from hybridctl.checkpoint.io import check_out_path

        check_out_path(run_dir, [recipe.model.init_from], option="--run-dir")
    created = info.is_main and not run_dir.exists()
    try:
        return _train_in(recipe, cfg, src, run_dir, info, resume, max_steps, progress, t0)
    except BaseException:
        # a failed run removes the directory it created (never one that existed before), unless it already holds a
        # complete checkpoint to resume from
        if created and run_dir.is_dir() and find_checkpoint(run_dir) is None:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train_in(recipe: Recipe, cfg: ModelConfig, src: Any, run_dir: Path, info: parallel.DistInfo,
              resume: str | None, max_steps: int | None, progress: bool | None, t0: float) -> TrainResult:
    _prepare_run_dir(run_dir, recipe, info)
    tok = build_tokenizer_for(recipe, src, cfg)
    torch.manual_seed(recipe.seed)
    model, no_decay = build_training_model(cfg, recipe, src, info)
    optimizer = build_optimizer(model, no_decay, recipe, info.device)
    loader = build_data(recipe, tok, info, "train")
    ckpt = resolve_resume(resume, run_dir)
    step, tokens = 0, 0
    if ckpt is not None:
        st = load_checkpoint(ckpt, model, optimizer, info)
        step, tokens = int(st["step"]), int(st["tokens"])
        loader.load_state_dict(st["data"])
        if info.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)
        log.info("resumed from %s at step %d", ckpt, step)
    res = TrainResult(run_dir, step, tokens, None, None, None, 0.0, ckpt, None, ckpt)
    _loop(model, optimizer, loader, tok, recipe, info, run_dir, res, max_steps, progress)
    if recipe.checkpoint.export:
        res.export = export_final(model, cfg, tok, recipe, run_dir, info, res.steps)
    res.wall_s = time.perf_counter() - t0
    return res


def _loop(model, optimizer, loader, tok, recipe: Recipe, info: parallel.DistInfo, run_dir: Path, res: TrainResult,
          max_steps: int | None, progress: bool | None) -> None:
    """Steps from res.steps to the end (or max_steps): log, evaluate, checkpoint; updates ``res`` in place."""
    from tqdm import tqdm

    from hybridctl.model import flops_per_token

    total = recipe.total_steps if max_steps is None else min(recipe.total_steps, max_steps)
    accum, o, seq = recipe.grad_accum(info.world_size), recipe.optim, recipe.data.seq_len
    step_tokens = o.global_batch * seq
    flops = flops_per_token(model.cfg, seq)["training"]
    peak = _peak_flops(recipe, info.device)
    show = info.is_main and (recipe.logging.progress if progress is None else progress) and sys.stderr.isatty()
    bar = tqdm(total=total, initial=min(res.steps, total), disable=not show, file=sys.stderr, desc="train",
               unit="step", dynamic_ncols=True)
    metrics = _Metrics(run_dir / "metrics.jsonl", info.is_main)
    evals = _EvalBatches(recipe, tok, info)
    # throughput (metrics and res.tokens_per_s alike): tokens over the time of the training steps, data loading
    # included; evaluation and checkpoints excluded
    window_time, window_tok, step_time, first = 0.0, 0, 0.0, res.steps
    try:
        while res.steps < total:
            lr = lr_at(res.steps, recipe)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t_step = time.perf_counter()
            batches = [next(loader) for _ in range(accum)]
            loss, gnorm = train_step(model, optimizer, batches, recipe, info)  # returns floats: synchronised
            dt = time.perf_counter() - t_step
            step_time, window_time = step_time + dt, window_time + dt
            res.steps, res.tokens = res.steps + 1, res.tokens + step_tokens
            res.losses.append(loss)
            res.final_loss = loss
            window_tok += step_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if res.steps % recipe.logging.interval == 0 or res.steps == total:
                tps = window_tok / window_time if window_time > 0 else None
                mfu = flops * tps / (peak * info.world_size) if peak and tps else None
                mem = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else None
                metrics.write(step=res.steps, loss=loss, lr=lr, grad_norm=gnorm, tokens=res.tokens, tokens_per_s=tps,
                              mfu=mfu, max_memory_gib=mem, time=time.time())
                window_time, window_tok = 0.0, 0
            _periodic(model, optimizer, loader, evals, recipe, info, run_dir, res, total, metrics)
    finally:
        bar.close()
        metrics.close()
    if step_time > 0:  # the whole invocation's training throughput (data loading in, evaluation/checkpoints out)
        res.tokens_per_s = (res.steps - first) * step_tokens / step_time
        res.mfu = flops * res.tokens_per_s / (peak * info.world_size) if peak else None
    res.checkpoint = find_checkpoint(run_dir)


class _EvalBatches:
    """The evaluation micro-batches, read and tokenised once per run (the eval stream restarts from its beginning at
    every evaluation, so each one sees the same batches) and replayed: ``iter(evals)``."""

    def __init__(self, recipe: Recipe, tok: Any, info: parallel.DistInfo) -> None:
        self.recipe, self.tok, self.info = recipe, tok, info
        self.batches: list[dict[str, torch.Tensor]] | None = None

    def __iter__(self):
        if self.batches is None:
            loader = build_data(self.recipe, self.tok, self.info, "eval")
            self.batches = list(itertools.islice(loader, self.recipe.eval.batches))
        return iter(self.batches)


def _periodic(model, optimizer, loader, evals: _EvalBatches, recipe: Recipe, info: parallel.DistInfo, run_dir: Path,
              res: TrainResult, total: int, metrics: _Metrics) -> None:
    """Evaluate and checkpoint when due (every interval and at the last step)."""
    last = res.steps == total
    if recipe.eval.batches and (last or (recipe.eval.interval and res.steps % recipe.eval.interval == 0)):
        ev = evaluate(model, iter(evals), recipe, info)
        res.eval_loss, res.eval_accuracy = ev.get("eval_loss"), ev.get("eval_accuracy")
        metrics.write(step=res.steps, **ev)
    if last or (recipe.checkpoint.interval and res.steps % recipe.checkpoint.interval == 0):
        # tokens: the running total (the global batch may change between resumed invocations, so it is not
        # step × global batch × seq_len)
        state = {"step": res.steps, "tokens": res.tokens, "data": loader.state_dict()}
        res.checkpoint = save_checkpoint(run_dir, res.steps, model, optimizer, state, recipe.checkpoint.keep_last,
                                         info)


def export_final(model, cfg: ModelConfig, tok: Any, recipe: Recipe, run_dir: Path, info: parallel.DistInfo,
                 steps: int) -> Path:
    """Native safetensors checkpoint with the tokenizer at ``run_dir/final`` (gathered to rank 0 under FSDP)."""
    from hybridctl.checkpoint.native import torch_dtype, write_native

    full = parallel.full_model_state(model)
    out = run_dir / "final"
    if info.is_main:
        specs = {k: (tuple(v.shape), v.dtype) for k, v in full.items()}
        trained = cfg.replace(max_seq_len=max(cfg.max_seq_len or 0, recipe.data.seq_len))  # the trained context
        write_native(out, config=trained, specs=specs, get=full.__getitem__,
                     dtype=torch_dtype(recipe.checkpoint.export_dtype), tokenizer=tok, overwrite=True,
                     extra={"trained_steps": steps, "recipe": recipe.name, "peak_lr": recipe.optim.lr})
    parallel.barrier()
    return out


def main_entry(**kwargs: Any) -> TrainResult:
    """``train`` that always leaves the process group (for the CLI under torchrun)."""
    try:
        return train(**kwargs)
    finally:
        parallel.destroy_distributed()


__all__ = ["train", "TrainResult", "lr_at", "lm_loss_sum", "find_checkpoint", "save_checkpoint", "load_checkpoint"]
