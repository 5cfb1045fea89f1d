"""`hybridctl build`: a model config from a preset / pattern / ratios + overrides; a summary; optionally an initialised
native checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridctl.config import (
    HybridctlError,
    ModelConfig,
    allocate_pattern,
    apply_overrides,
    canonical_dtype,
    dtype_bytes,
    parse_pattern,
    preset_dict,
)

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    config: ModelConfig
    summary: dict[str, Any]
    out: Path | None


def resolve_config(*, preset: str | None = None, pattern: str | None = None, layers: int | None = None,
                   attention_ratio: float | None = None, mlp_ratio: float | None = None,
                   overrides: list[str] | None = None) -> ModelConfig:
    """Preset (default 'tiny' when nothing else is given) → pattern or ratio allocation → --set overrides."""
    ratio_given = any(v is not None for v in (layers, attention_ratio, mlp_ratio))
    if pattern is not None and ratio_given:
        raise HybridctlError("give either --pattern or --layers/--attention-ratio/--mlp-ratio, not both")
    d = preset_dict(preset or "tiny")
    if pattern is not None:
        d["pattern"] = parse_pattern(pattern)
    elif ratio_given:
        if layers is None:
            raise HybridctlError("--attention-ratio/--mlp-ratio need --layers")
        d["pattern"] = allocate_pattern(layers, attention_ratio or 0.0, mlp_ratio or 0.0)
    apply_overrides(d, overrides or [])
    return ModelConfig.from_dict(d)


def summarize(cfg: ModelConfig, *, seq_len: int = 4096, dtype: str = "bfloat16") -> dict[str, Any]:
    """Parameters by type, FLOPs per token and decode memory, from the config alone (built on meta)."""
    from hybridctl.model import flops_per_token, memory_per_sequence, param_counts

    counts = param_counts(cfg)
    by_type = {k: counts[k] for k in ("mamba", "attention", "mlp")}
    by_type["embedding"] = counts["embedding"] + counts["lm_head"]
    by_type["final_norm"] = counts["final_norm"]
    flops = flops_per_token(cfg, seq_len)
    mem = memory_per_sequence(cfg, dtype_bytes=dtype_bytes(dtype))
    return {
        "pattern": cfg.pattern, "n_layers": cfg.n_layers, "layer_counts": cfg.layer_counts(),
        "d_model": cfg.d_model, "vocab_size": cfg.vocab_size, "tie_embeddings": cfg.tie_embeddings,
        "params_total": sum(counts.values()), "params_by_type": by_type,
        "params_non_embedding": sum(counts.values()) - counts["embedding"] - counts["lm_head"],
        "seq_len": seq_len, "flops_per_token_forward": flops["forward"], "flops_per_token_training": flops["training"],
        "weights_bytes": sum(counts.values()) * dtype_bytes(dtype), "dtype": dtype, **mem,
        "kv_bytes_at_seq_len": mem["kv_bytes_per_token"] * seq_len,
    }


def available_memory() -> int:
    """Bytes of RAM a new allocation can get now: MemAvailable (Linux), else the free physical pages."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def build_memory(cfg: ModelConfig, dtype: str, max_shard_size: str | int) -> int:
    """Peak bytes of ``build --out``: every parameter initialised in float32 on the CPU, plus one shard converted to
    ``dtype`` while it is written."""
    from hybridctl.checkpoint.io import parse_size
    from hybridctl.model import param_counts

    n = sum(param_counts(cfg).values())
    return n * 4 + min(n * dtype_bytes(dtype), parse_size(max_shard_size))


def check_build_resources(cfg: ModelConfig, dtype: str, out: Path, max_shard_size: str | int) -> None:
    """Before allocating anything: refuse a build the machine cannot hold (RAM) or store (disk at ``out``)."""
    import shutil

    def gib(b: float) -> str:
        return f"{b / 2**30:.1f} GiB"

    need, avail = build_memory(cfg, dtype, max_shard_size), available_memory()
    if need > avail:
        raise HybridctlError(f"building this model needs about {gib(need)} of RAM (its parameters initialised in "
                             f"float32), this machine has {gib(avail)} available; build a smaller model, or pass "
                             "--skip-memory-check to try anyway")
    from hybridctl.model import param_counts

    disk = sum(param_counts(cfg).values()) * dtype_bytes(dtype)
    parent = next((p for p in [out, *out.parents] if p.exists()), Path.cwd())
    free = shutil.disk_usage(parent).free
    if disk > free:
        raise HybridctlError(f"the checkpoint needs about {gib(disk)} of disk at {parent}, which has {gib(free)} free; "
                             "choose another --out, or pass --skip-memory-check to try anyway")


def build(*, preset: str | None = None, pattern: str | None = None, layers: int | None = None,
          attention_ratio: float | None = None, mlp_ratio: float | None = None, overrides: list[str] | None = None,
          seed: int = 0, dtype: str = "float32", out: str | Path | None = None, tokenizer: str | None = "byte",
          seq_len: int = 4096, max_shard_size: str = "5GB", skip_memory_check: bool = False) -> BuildResult:
    """Resolve the config and summarise it; with ``out``, write an initialised native checkpoint (with tokenizer),
    after checking that the machine has the RAM and disk for it (unless ``skip_memory_check``)."""
    cfg = resolve_config(preset=preset, pattern=pattern, layers=layers, attention_ratio=attention_ratio,
                         mlp_ratio=mlp_ratio, overrides=overrides)
    dtype = canonical_dtype(dtype)
    summary = summarize(cfg, seq_len=seq_len, dtype=dtype)
    if out is None:
        return BuildResult(cfg, summary, None)
    from hybridctl.checkpoint.native import save_model, torch_dtype
    from hybridctl.model import build_model, materialize

    tok = None
    if tokenizer:
        from hybridctl.tokenizer import build_tokenizer

        tok = build_tokenizer(tokenizer)
        if tok.vocab_size > cfg.vocab_size:
            raise HybridctlError(f"tokenizer has {tok.vocab_size} ids but vocab_size is {cfg.vocab_size}; "
                                 "raise vocab_size (--set vocab_size=N)")
    if not skip_memory_check:
        check_build_resources(cfg, dtype, Path(out), max_shard_size)
    model = materialize(build_model(cfg), "cpu", seed=seed)
    path = save_model(model, out, tokenizer=tok, dtype=torch_dtype(dtype), max_shard_size=max_shard_size)
    log.info("wrote %s", path)
    return BuildResult(cfg, summary, Path(path))
