"""Checkpoint formats. A checkpoint is a config plus weights; the format is detected by content, never by names.

Every reader returns a ``Source``: the model config, the tensor plan (native names → shape, dtype), a lazy
``get(name)`` returning one tensor in native layout, the directory holding tokenizer files (if any) and format facts.
Writers and loaders stream tensor by tensor from a Source, so converting never needs the whole model in memory.

Formats: ``native`` (hybridctl: config.json + safetensors), ``hf`` (NemotronH / Mamba2ForCausalLM / mamba_ssm dirs,
checkpoint/hf.py), ``megatron`` (legacy per-rank and torch_dist, checkpoint/megatron.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridctl.config import HybridctlError, ModelConfig

log = logging.getLogger(__name__)
TensorSpec = tuple[tuple[int, ...], torch.dtype]


@dataclass
class Source:
    format: str  # native | hf-nemotron_h | hf-mamba2 | mamba_ssm | megatron-legacy | megatron-dist
    path: Path
    config: ModelConfig
    specs: dict[str, TensorSpec]  # native name → (shape, stored dtype)
    get: Callable[[str], torch.Tensor]  # native name → tensor, native layout
    tokenizer_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # True once check_specs passed for (config, specs): readers validate where they open, so load_model / plan_hf /
    # the writers need not rebuild the meta model again for the same plan.
    validated: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The dominant stored dtype (of the largest tensor)."""
        return max(self.specs.values(), key=lambda s: _numel(s[0]))[1]


def specs_nbytes(specs: dict[str, TensorSpec], dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors of a plan take, stored in their own dtype (or all in ``dtype``)."""
    return sum(_numel(s) * (dtype or d).itemsize for s, d in specs.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HybridctlError(f"{path}: not valid JSON ({e})") from None
    return obj if isinstance(obj, dict) else None


def detect_format(path: str | Path) -> str:
    """'native' | 'hf' | 'mamba_ssm' | 'megatron', by looking at the files' contents."""
    p = Path(path)
    if not p.exists():
        raise HybridctlError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise HybridctlError(f"{p}: expected a checkpoint directory")
    cfg = _read_json(p / "config.json")
    if cfg is not None:
        if cfg.get("format") == "hybridctl":
            return "native"
        if "model_type" in cfg:
            return "hf"
        if "d_model" in cfg and ("n_layer" in cfg or "ssm_cfg" in cfg):
            return "mamba_ssm"
    meta = _read_json(p / "metadata.json")
    if meta is not None and "sharded_backend" in meta:
        return "megatron"
    if (p / "latest_checkpointed_iteration.txt").is_file():
        return "megatron"
    if any(c.is_dir() and (c.name.startswith("mp_rank_") or c.name == "release" or re.fullmatch(r"iter_\d{7}", c.name))
           for c in p.iterdir()):
        return "megatron"
    raise HybridctlError(f"{p}: unknown checkpoint format (no hybridctl/Hugging Face config.json, no Megatron "
                         "tracker, metadata.json or mp_rank_* files)")


def open_checkpoint(path: str | Path, **options: Any) -> Source:
    """Open any checkpoint hybridctl reads. Options go to the format's reader (e.g. iteration=, trust_pickle=)."""
    fmt = detect_format(path)
    if fmt == "native":
        from hybridctl.checkpoint.native import open_native

        return open_native(Path(path))
    if fmt in ("hf", "mamba_ssm"):
        try:
            from hybridctl.checkpoint.hf import open_hf
        except ImportError:
            raise HybridctlError(f"{path}: Hugging Face checkpoints are not supported yet") from None
        return open_hf(Path(path), **options)
    try:
        from hybridctl.checkpoint.megatron import open_megatron
    except ImportError:
        raise HybridctlError(f"{path}: Megatron checkpoints are not supported yet") from None
    return open_megatron(Path(path), **options)


def check_specs(config: ModelConfig, specs: dict[str, TensorSpec], where: str,
                quantization: dict[str, Any] | None = None) -> None:
    """Strict comparison of a tensor plan with the model the config describes (with the module swaps of a
    config.json ``quantization`` section, qlinear.apply_quantization): names, shapes and dtype kinds, one clear
    error on any mismatch. A weight stored as an integer or bool is refused unless the (quantized) model holds an
    integer tensor there."""
    meta = _meta_model(config, quantization).state_dict()
    for k, v in meta.items():
        dt = specs[k][1] if k in specs else None
        if dt is not None and v.dtype.is_floating_point != dt.is_floating_point:
            need = ("a floating-point" if v.dtype.is_floating_point
                    else f"an integer ({str(v.dtype).removeprefix('torch.')})")
            raise HybridctlError(f"{where}: {k} is stored as {str(dt).removeprefix('torch.')}, the model needs "
                                 f"{need} tensor")
    expected = {k: tuple(v.shape) for k, v in meta.items()}
    missing = [k for k in expected if k not in specs]
    unexpected = [k for k in specs if k not in expected]
    if missing:
        raise HybridctlError(f"{where}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
    if unexpected:
        raise HybridctlError(f"{where}: unexpected tensor {unexpected[0]!r} for this config"
                             + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, shape in expected.items():
        if tuple(specs[k][0]) != shape:
            raise HybridctlError(f"{where}: {k} has shape {tuple(specs[k][0])}, the config implies {shape}")
        if not meta[k].dtype.is_floating_point and specs[k][1] != meta[k].dtype:  # quantized weights
            raise HybridctlError(f"{where}: {k} is stored as {specs[k][1]}, the quantization section implies "
                                 f"{meta[k].dtype}")


def _meta_model(config: ModelConfig, quantization: dict[str, Any] | None):
    from hybridctl.model import build_model

    model = build_model(config)
    if quantization is not None:
        from hybridctl.qlinear import apply_quantization

        apply_quantization(model, quantization, "config.json quantization")
    return model


def ensure_valid(src: Source) -> Source:
    """check_specs once per Source: a no-op when the reader (or an earlier caller) already validated it."""
    if not src.validated:
        check_specs(src.config, src.specs, str(src.path), src.info.get("quantization"))
        src.validated = True
    return src


def load_model(path: str | Path | Source, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **options: Any):
    """Load any readable checkpoint into a HybridLM: build on meta → check the plan strictly → load with assign.

    Returns (model in eval mode, source). dtype defaults to the checkpoint's stored dtype. A quantized checkpoint
    (config.json ``quantization``) gets its module swaps on meta; its integer tensors keep their stored dtype.
    """
    src = path if isinstance(path, Source) else open_checkpoint(path, **options)
    ensure_valid(src)
    quant = src.info.get("quantization")
    floats = {n: s for n, s in src.specs.items() if s[1].is_floating_point}
    dtype = dtype or (src.dtype if quant is None else max(floats.values(), key=lambda s: _numel(s[0]))[1])
    model = _meta_model(src.config, quant)
    sd = {name: src.get(name).to(device=device, dtype=dtype if name in floats or quant is None else None)
          for name in src.specs}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval(), src


def load_tokenizer_for(src: Source, override: str | None = None):
    """The tokenizer stored with a checkpoint (or the override path / 'byte'); error if there is none."""
    from hybridctl.tokenizer import build_tokenizer, load_tokenizer

    if override:
        return build_tokenizer(override)
    if src.tokenizer_dir is None:
        raise HybridctlError(f"{src.path}: the checkpoint carries no tokenizer; pass --tokenizer PATH (or 'byte')")
    return load_tokenizer(src.tokenizer_dir)
