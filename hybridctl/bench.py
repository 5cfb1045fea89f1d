"""``hybridctl bench``: speed, memory and quality of several models side by side, on the decode runtime ``generate``
runs (``hybridctl.decode``: the same plan, prefill and steps), in one process.

Models: checkpoints (any format ``load_model`` reads) and presets (random weights: built on meta, then materialized;
speed needs no trained weights). The first is the baseline: every speed row carries its ratio to the baseline's row
of the same (batch, prompt length).

Speed, per (model, batch, prompt length): ``warmup`` untimed runs (the one-off compile / packing / graph capture,
reported apart as ``warmup_s``), then ``reps`` timed ``decode.run`` calls of random prompts (``prompt_len`` ids per
row) and ``new_tokens`` greedy tokens: prefill and decode tok/s (mean ± std, each rep kept), TTFT, per-step time
percentiles, peak memory, the SSM-state and KV-cache bytes at that length, the bytes a decode step must read
(``model.decode_bytes_per_step``) and the fraction of the measured bandwidth (``probes.matvec_bandwidth``) that is.
A row whose memory estimate (weights + state + KV cache + the prefill's working set) exceeds the memory limit is
"oom" without running; a row that runs out of memory anyway says so too; the rest runs.

Quality: ``ppl`` (perplexity over a text file by position bucket, ``evaluation.perplexity_by_position``) and a task
sweep (``task_eval.sweep_task``) per model, with the model's own tokenizer (the byte tokenizer for presets).

``bench(...)`` returns the JSON object (schema: ``bench_report.SCHEMA``, the README's bench section).
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridctl.config import ATTENTION, MAMBA, HybridctlError, ModelConfig, preset as preset_config
from hybridctl.model import MEMORY_HEADROOM, memory_per_sequence, param_counts

log = logging.getLogger(__name__)
TASKS = ("phonebook", "needle", "copy")
MAX_GRID = 1 << 24  # a batch or length beyond this is a typo, not a benchmark


# ---- the grid ------------------------------------------------------------------------------------------------------


def parse_ints(text: str | Sequence[int], option: str, *, lo: int = 1, hi: int = MAX_GRID) -> list[int]:
    """"1,8,64" (or a list) → [1, 8, 64]: integers in [lo, hi], each once, order kept; one clear line otherwise."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    out: list[int] = []
    for p in parts:
        try:
            v = int(p) if not isinstance(p, int) else p
        except ValueError:
            raise HybridctlError(f"{option} {text}: {p!r} is not an integer (expected e.g. 1,8,64)") from None
        if not lo <= v <= hi:
            raise HybridctlError(f"{option} {text}: {v} is outside [{lo}, {hi}]")
        if v not in out:
            out.append(v)
    if not out:
        raise HybridctlError(f"{option}: no values given")
    return out


def parse_depths(text: str | Sequence[float], option: str = "--depths") -> list[float]:
    """"0,0.5,1" or "0,50%,100%" → fractions in [0, 1]."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for p in parts:
        try:
            v = float(p[:-1]) / 100 if isinstance(p, str) and p.endswith("%") else float(p)
        except ValueError:
            raise HybridctlError(f"{option} {text}: {p!r} is not a number (expected e.g. 0,0.5,1 or 0%,50%)") from None
        if not 0.0 <= v <= 1.0:
            raise HybridctlError(f"{option} {text}: {p} is outside [0, 1] (0%..100%)")
        out.append(v)
    if not out:
        raise HybridctlError(f"{option}: no values given")
    return out


# ---- models ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One model of the comparison: ``kind`` "checkpoint" (``ref`` a path) or "preset" (``ref`` a preset name)."""

    name: str
    kind: str
    ref: str
    config: ModelConfig
    weights_bytes: int
    params: int
    dtype: str

    def summary(self, baseline: bool) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "ref": self.ref, "pattern": self.config.pattern,
                "params": self.params, "dtype": self.dtype, "weights_bytes": self.weights_bytes, "baseline": baseline}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def resolve_models(checkpoints: Sequence[str | Path], presets: Sequence[str], *, dtype: str | None,
                   device: torch.device) -> list[ModelSpec]:
    """Checkpoints first (in order), then presets; nothing is loaded (the config and tensor specs are read).
    dtype: the compute dtype (default: a checkpoint's stored one; bfloat16 for presets on CUDA, float32 on CPU)."""
    from hybridctl.checkpoint import ensure_valid, open_checkpoint, specs_nbytes
    from hybridctl.checkpoint.native import torch_dtype

    if not checkpoints and not presets:
        raise HybridctlError("nothing to bench: give a checkpoint directory and/or --preset NAME")
    want = torch_dtype(dtype) if dtype else None
    specs: list[ModelSpec] = []
    for path in checkpoints:
        if not Path(path).exists():
            raise HybridctlError(f"{path}: no such checkpoint directory")
        src = ensure_valid(open_checkpoint(path))
        d = want or src.dtype
        # floating tensors are cast to the compute dtype, integer ones (quantized weights) keep theirs
        nbytes = specs_nbytes({k: s for k, s in src.specs.items() if s[1].is_floating_point}, d) \
            + specs_nbytes({k: s for k, s in src.specs.items() if not s[1].is_floating_point})
        specs.append(ModelSpec(Path(path).name or str(path), "checkpoint", str(path), src.config, nbytes,
                               sum(math.prod(s[0]) for s in src.specs.values()), _dtype_name(d)))
    for name in presets:
        cfg = preset_config(name)
        d = want or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        n = sum(param_counts(cfg).values())
        specs.append(ModelSpec(name, "preset", name, cfg, n * d.itemsize, n,
                               _dtype_name(d)))
    seen: dict[str, int] = {}
    for s in specs:  # two checkpoints called "final": final, final#2
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"
    return specs


def load(spec: ModelSpec, device: torch.device, *, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on ``device``, tokenizer or None): a checkpoint with its stored tokenizer; a preset built
    on meta, materialized with random weights, with the byte tokenizer when its vocabulary holds it."""
    from hybridctl.checkpoint import load_model, load_tokenizer_for
    from hybridctl.model import build_model, materialize
    from hybridctl.tokenizer import ByteTokenizer

    if spec.kind == "checkpoint":
        model, src = load_model(spec.ref, device=device, dtype=getattr(torch, spec.dtype))
        return model, (load_tokenizer_for(src) if src.tokenizer_dir is not None else None)
    model = materialize(build_model(spec.config, dtype=getattr(torch, spec.dtype)), device, seed=seed).eval()
    return model, (ByteTokenizer() if spec.config.vocab_size >= ByteTokenizer.vocab_size else None)


# ---- memory ---------------------------------------------------------------------------------------------------------


def _working_bytes_per_token(cfg: ModelConfig, b: int) -> int:
    """Prefill's transient bytes per token: the fp32 residual stream and its normed copy, plus the widest layer's
    intermediates (one layer at a time: nothing is kept for backward)."""
    widths = [cfg.d_model * 2]
    if MAMBA in cfg.pattern:
        widths.append(cfg.in_proj_dim + 2 * cfg.conv_dim + 2 * cfg.d_inner)
    if ATTENTION in cfg.pattern:
        a, kv, dh = cfg.attention.n_heads, cfg.attention.n_kv_heads, cfg.head_dim
        widths.append(2 * (a + 2 * kv) * dh + a * dh)
    if "-" in cfg.pattern:
        widths.append(2 * cfg.mlp.hidden_size)
    return cfg.d_model * 8 + max(widths) * b


def memory_estimate(spec: ModelSpec, *, batch: int, prompt_len: int, new_tokens: int, state_dtype: str
                    ) -> dict[str, int]:
    """Bytes a speed row needs (training_memory-style accounting for inference): weights, the SSM + conv state and
    the KV cache (``memory_per_sequence``, cache allocated for prompt_len + new_tokens positions), the prefill's
    working set and the last position's fp32 logits. ``total`` is their sum."""
    b, sb = getattr(torch, spec.dtype).itemsize, getattr(torch, state_dtype).itemsize
    mem = memory_per_sequence(spec.config, dtype_bytes=b, state_bytes=sb)
    out = {"weights": spec.weights_bytes, "ssm_state": batch * mem["state_bytes_per_sequence"],
           "kv_cache": batch * (prompt_len + new_tokens) * mem["kv_bytes_per_token"],
           "activations": batch * prompt_len * _working_bytes_per_token(spec.config, b)
           + batch * spec.config.vocab_size * 4 * 2}
    out["total"] = sum(out.values())
    return out


def memory_capacity(device: torch.device, limit_gib: float | None) -> tuple[int, str]:
    """(bytes a row may use, where that figure comes from): ``limit_gib`` when given; else MEMORY_HEADROOM × the
    CUDA device's total, or × the host's MemAvailable (read before any model is loaded)."""
    if limit_gib is not None:
        return int(limit_gib * 2**30), "--memory-limit"
    if device.type == "cuda":
        return int(MEMORY_HEADROOM * torch.cuda.mem_get_info(device)[1]), "cuda total × headroom"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        return int(MEMORY_HEADROOM * info["MemAvailable"]), "MemAvailable × headroom"
    except (OSError, KeyError, ValueError):
        import os

        return int(MEMORY_HEADROOM * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM × headroom"


class PeakMemory:
    """Peak memory over a block: CUDA ``max_memory_allocated`` (all the allocator held, weights included); on the
    CPU the growth of the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs) over the RSS at
    the start, plus the weights (resident before). ``source`` names which."""

    def __init__(self, device: torch.device, weights_bytes: int) -> None:
        self.device, self.weights = device, weights_bytes
        self.source = "cuda.max_memory_allocated" if device.type == "cuda" else "cpu: weights + VmHWM growth"

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> PeakMemory:
        self.peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
                self.start = self._status("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.start is not None:
            hwm = self._status("VmHWM")
            self.peak = None if hwm is None else self.weights + max(hwm - self.start, 0)


# ---- speed ----------------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "reps": values}


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def measure_speed(model: torch.nn.Module, *, batch: int, prompt_len: int, new_tokens: int, reps: int, warmup: int,
                  state_dtype: str, vocab: int, seed: int, weights_bytes: int) -> dict[str, Any]:
    """Time ``decode.run`` — generate's runtime, with generate's default plan for this batch — over random prompts:
    ``warmup`` untimed calls, then ``reps`` timed ones. Returns the measured fields of a speed row."""
    from hybridctl import decode

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()
    plan = decode.plan_decode(model, batch=batch, state_dtype=getattr(torch, state_dtype))
    t0 = time.perf_counter()
    compile_s = 0.0
    for _ in range(warmup):
        compile_s += decode.run(model, ids, plan, max_new_tokens=new_tokens, seed=seed, vocab=vocab).compile_s
    warmup_s = time.perf_counter() - t0
    traces = []
    with PeakMemory(dev, weights_bytes) as peak:
        for _ in range(reps):
            traces.append(decode.run(model, ids, plan, max_new_tokens=new_tokens, seed=seed, vocab=vocab))
    steps = [s for t in traces for s in t.step_s]
    q = torch.quantile(torch.tensor(steps, dtype=torch.float64), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
                       ).tolist() if steps else [None] * 3
    return {
        "prefill_tokens_per_s": _stats([batch * prompt_len / t.prefill_s for t in traces]),
        "decode_tokens_per_s": _stats([batch * t.decode_steps / t.decode_s if t.decode_s else 0.0 for t in traces]),
        "ttft_s": _stats([t.prefill_s for t in traces]),
        "step_time_s": {"p50": q[0], "p90": q[1], "p99": q[2], "resolution_steps": traces[0].plan.sync_every},
        "warmup_s": warmup_s,  # the untimed calls' wall time (compiling, packing, graph capture, first-use costs)
        "compile_s": compile_s, "per_call_warmup_s": statistics.fmean(t.warmup_s for t in traces),
        "decode_steps": traces[0].decode_steps, "peak_memory_bytes": peak.peak, "peak_memory_source": peak.source,
        "plan": traces[-1].plan.as_dict(),
    }


def _row_head(spec: ModelSpec, batch: int, prompt_len: int, new_tokens: int, state_dtype: str) -> dict[str, Any]:
    est = memory_estimate(spec, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, state_dtype=state_dtype)
    return {"model": spec.name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "status": "planned", "error": None, "memory_estimate_bytes": est["total"], "memory_estimate": est,
            "ssm_state_bytes": est["ssm_state"], "kv_cache_bytes": est["kv_cache"]}


EMPTY_SPEED = dict.fromkeys(("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "step_time_s", "warmup_s",
                             "compile_s", "per_call_warmup_s", "decode_steps", "peak_memory_bytes",
                             "peak_memory_source", "decode_bytes_per_step", "roofline_fraction", "plan"))


def speed_rows(spec: ModelSpec, model: torch.nn.Module | None, *, batches: Sequence[int],
               prompt_lens: Sequence[int], new_tokens: int, reps: int, warmup: int, state_dtype: str, vocab: int,
               seed: int, capacity: int, bandwidth: float | None) -> list[dict[str, Any]]:
    """The speed rows of one model over batch × prompt length (``model`` None: planned only, the dry run)."""
    from hybridctl.model import decode_bytes_per_step

    import sys

    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(batches) * len(prompt_lens), desc=f"bench {spec.name}", unit="row", file=sys.stderr,
               disable=model is None or not sys.stderr.isatty(), leave=False)
    for batch in batches:
        for L in prompt_lens:
            bar.update(1)
            row = {**_row_head(spec, batch, L, new_tokens, state_dtype), **EMPTY_SPEED}
            rows.append(row)
            if row["memory_estimate_bytes"] > capacity:
                row.update(status="oom", error=f"out of memory: needs ≈{row['memory_estimate_bytes'] / 2**30:.2f}"
                           f" GiB, {capacity / 2**30:.2f} GiB available (estimate; not run)")
                log.warning("bench: %s batch %d × %d: %s", spec.name, batch, L, row["error"])
                continue
            if model is None:
                continue
            try:
                row.update(measure_speed(model, batch=batch, prompt_len=L, new_tokens=new_tokens, reps=reps,
                                         warmup=warmup, state_dtype=state_dtype, vocab=vocab, seed=seed,
                                         weights_bytes=spec.weights_bytes), status="ok")
            except Exception as e:  # noqa: BLE001 - only running out of memory is a row's result; the rest raises
                if not _is_oom(e):
                    raise
                row.update(status="oom", error=f"out of memory while running (estimate ≈"
                           f"{row['memory_estimate_bytes'] / 2**30:.2f} GiB): {' '.join(str(e).split())[:160]}")
                log.warning("bench: %s batch %d × %d: %s", spec.name, batch, L, row["error"])
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            sb = getattr(torch, state_dtype).itemsize
            row["decode_bytes_per_step"] = decode_bytes_per_step(model, batch, L + new_tokens // 2, state_bytes=sb)
            if bandwidth:  # bytes per step × steps per second / bytes per second the machine streams
                steps_per_s = row["decode_tokens_per_s"]["mean"] / batch
                row["roofline_fraction"] = row["decode_bytes_per_step"] * steps_per_s / bandwidth
    bar.close()
    return rows


def add_ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    """Each row's decode / prefill tok/s over the baseline model's at the same (batch, prompt length); None where
    either did not run."""
    base = {(r["batch"], r["prompt_len"]): r for r in rows if r["model"] == baseline and r["status"] == "ok"}
    for r in rows:
        b = base.get((r["batch"], r["prompt_len"]))
        ok = b is not None and r["status"] == "ok"
        r["ratio_to_baseline"] = {
            k: (r[f"{k}_tokens_per_s"]["mean"] / b[f"{k}_tokens_per_s"]["mean"]
                if ok and b[f"{k}_tokens_per_s"]["mean"] else None) for k in ("decode", "prefill")}


# ---- quality --------------------------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise HybridctlError(f"--ppl {path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HybridctlError(f"--ppl {path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise HybridctlError(f"--ppl {path}: {e.strerror or e}") from None


def perplexity_row(spec: ModelSpec, model, tok, text: str, path: str, window: int) -> dict[str, Any]:
    """Perplexity of ``text`` in disjoint windows (capped at the stream's length), by position bucket."""
    from hybridctl.evaluation import perplexity, perplexity_by_position

    ids = tok.encode(text)
    if len(ids) < 3:
        raise HybridctlError(f"--ppl {path}: {len(ids)} tokens is too short to score")
    window = min(window, len(ids) - 1)
    buckets = perplexity_by_position(model, ids, window=window)
    n = sum(b["tokens"] for b in buckets)
    loss = sum(b["loss"] * b["tokens"] for b in buckets if b["tokens"]) / n
    return {"model": spec.name, "file": str(path), "tokens": len(ids), "window": window, "predicted": n,
            "loss": loss, "ppl": perplexity(loss), "buckets": buckets}


def quality(spec: ModelSpec, model, tok, *, ppl: tuple[str, str] | None, task: str | None, lengths: Sequence[int],
            depths: Sequence[float] | None, samples: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(perplexity rows, task rows) of one model."""
    from hybridctl.task_eval import sweep_task

    if tok is None:
        raise HybridctlError(f"{spec.name}: quality needs the model's tokenizer and this "
                             f"{spec.kind} carries none (vocabulary {spec.config.vocab_size})")
    ppl_rows = [perplexity_row(spec, model, tok, ppl[1], ppl[0], max(lengths))] if ppl else []
    task_rows = []
    if task:
        task_rows = [{"model": spec.name, **r} for r in sweep_task(model, tok, task, lengths, depths, n=samples,
                                                                    seed=seed)]
    return ppl_rows, task_rows


# ---- the entry function ---------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, *, state_dtype: str, bandwidth: float | None, bandwidth_source: str,
                capacity: int, capacity_source: str) -> dict[str, Any]:
    """What the figures depend on: device, versions, backend, threads, the bandwidth and memory they are set against."""
    from hybridctl import kernels

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "triton": _version("triton"),
            "python": platform.python_version(), "platform": platform.platform(),
            "backend": kernels.backend() if device.type == "cuda" else "ref", "threads": torch.get_num_threads(),
            "state_dtype": state_dtype, "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": bandwidth_source,
            "memory_capacity_bytes": capacity, "memory_capacity_source": capacity_source}


def _bandwidth(device: torch.device, dtype: str, given_gbps: float | None, dry_run: bool) -> tuple[float | None, str]:
    from hybridctl.probes import matvec_bandwidth

    if given_gbps is not None:
        return given_gbps * 1e9, "--bandwidth"
    if dry_run:
        return None, "not probed (dry run)"
    mb = 1024 if device.type == "cuda" else 256
    return matvec_bandwidth(device, getattr(torch, dtype), mbytes=mb, repeats=5), f"probes.matvec_bandwidth {mb} MiB"


def bench(*, checkpoints: Sequence[str | Path] = (), presets: Sequence[str] = (), batch: Sequence[int] = (1, 4),
          prompt_len: Sequence[int] = (128, 512), new_tokens: int = 32, reps: int = 3, warmup: int = 1,
          device: str | None = None, dtype: str | None = None, state_dtype: str = "float32",
          backend: str | None = None, speed: bool = True, ppl: str | Path | None = None, task: str | None = None,
          lengths: Sequence[int] = (1024, 2048, 4096), depths: Sequence[float] | None = None, samples: int = 4,
          plot: str | Path | None = None, dry_run: bool = False, memory_limit_gib: float | None = None,
          bandwidth_gbps: float | None = None, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Run the comparison; returns the result object (``bench_report.SCHEMA``). See the module docstring.
    ``threads``: torch's intra-op CPU threads for the run (default: as they are), restored afterwards."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(checkpoints=checkpoints, presets=presets, batch=batch, prompt_len=prompt_len,
                      new_tokens=new_tokens, reps=reps, warmup=warmup, device=device, dtype=dtype,
                      state_dtype=state_dtype, backend=backend, speed=speed, ppl=ppl, task=task, lengths=lengths,
                      depths=depths, samples=samples, plot=plot, dry_run=dry_run, memory_limit_gib=memory_limit_gib,
                      bandwidth_gbps=bandwidth_gbps, seed=seed)
    finally:
        torch.set_num_threads(saved)


def _check_request(*, task: str | None, depths: Sequence[float] | None, speed: bool, ppl: Any, plot: Any,
                   dry_run: bool) -> list[float] | None:
    """Refuse what cannot run before any work; returns the depths to sweep (the task's defaults when None)."""
    from hybridctl.task_eval import NEEDLE_DEPTHS, PHONEBOOK_DEPTHS

    if task is not None and task not in TASKS:
        raise HybridctlError(f"--task {task}: unknown task; valid: {', '.join(TASKS)}")
    if task == "copy" and depths is not None:
        raise HybridctlError("--depths: the copy task has no depth")
    if not speed and ppl is None and task is None:
        raise HybridctlError("nothing to measure: --no-speed without --ppl or --task")
    if plot is not None and not dry_run:
        from hybridctl.plots import require_matplotlib

        require_matplotlib()  # missing: say so now, not after the whole run
    if depths is None and task in ("needle", "phonebook"):
        return list(NEEDLE_DEPTHS if task == "needle" else PHONEBOOK_DEPTHS)
    return None if depths is None else list(depths)


def _bench(*, checkpoints, presets, batch, prompt_len, new_tokens, reps, warmup, device, dtype, state_dtype, backend,
           speed, ppl, task, lengths, depths, samples, plot, dry_run, memory_limit_gib, bandwidth_gbps,
           seed) -> dict[str, Any]:
    from hybridctl import decode
    from hybridctl.checkpoint.native import torch_dtype
    from hybridctl.parallel import resolve_device

    depths = _check_request(task=task, depths=depths, speed=speed, ppl=ppl, plot=plot, dry_run=dry_run)
    text = (str(ppl), read_text(ppl)) if ppl is not None else None
    state_dtype = _dtype_name(torch_dtype(state_dtype))
    caches = decode.prepare(backend) if not dry_run else {}
    dev = resolve_device(device)
    specs = resolve_models(checkpoints, presets, dtype=dtype, device=dev)
    capacity, cap_source = memory_capacity(dev, memory_limit_gib)
    bw, bw_source = _bandwidth(dev, specs[0].dtype, bandwidth_gbps, dry_run or not speed)
    out: dict[str, Any] = {
        "dry_run": dry_run,
        "environment": environment(dev, state_dtype=state_dtype, bandwidth=bw, bandwidth_source=bw_source,
                                   capacity=capacity, capacity_source=cap_source) | ({"caches": caches} if caches else {}),
        "grid": {"batch": list(batch), "prompt_len": list(prompt_len), "new_tokens": new_tokens, "reps": reps,
                 "warmup": warmup, "speed": speed, "task": task, "lengths": list(lengths) if task or text else None,
                 "depths": list(depths) if depths is not None else None, "samples": samples, "seed": seed},
        "models": [s.summary(i == 0) for i, s in enumerate(specs)],
        "speed": [], "quality": {"ppl": [], "tasks": []}, "plots": []}
    for spec in specs:
        model = tok = None
        if not dry_run:
            log.info("bench: loading %s (%s)", spec.name, spec.kind)
            model, tok = load(spec, dev, seed=seed)
        if speed:
            vocab = min(spec.config.vocab_size, tok.vocab_size) if tok is not None else spec.config.vocab_size
            out["speed"] += speed_rows(spec, model, batches=batch, prompt_lens=prompt_len, new_tokens=new_tokens,
                                       reps=reps, warmup=warmup, state_dtype=state_dtype, vocab=vocab, seed=seed,
                                       capacity=capacity, bandwidth=bw)
        if model is not None and (text or task):
            p, t = quality(spec, model, tok, ppl=text, task=task, lengths=lengths, depths=depths, samples=samples,
                           seed=seed)
            out["quality"]["ppl"] += p
            out["quality"]["tasks"] += t
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if speed:
        add_ratios(out["speed"], specs[0].name)
    if plot is not None and not dry_run:
        from hybridctl.plots import write_plots

        out["plots"] = [str(p) for p in write_plots(plot, speed=out["speed"], tasks=out["quality"]["tasks"])]
        if not out["plots"]:
            log.warning("bench: --plot %s: nothing to plot (speed plots need two prompt lengths or batch sizes, "
                        "accuracy plots a --task)", plot)
    out["environment"]["decode_plan"] = next((r["plan"] for r in out["speed"] if r.get("plan")), None)
    return out
