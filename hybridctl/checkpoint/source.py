"""The checkpoint types every format shares: ``Source`` (what a reader returns), tensor specs and their checks.

A ``Source`` is the model config, the tensor plan (native names → shape, stored dtype), a lazy ``get(name)`` returning
one tensor in native layout, the directory holding tokenizer files (if any) and format facts (``info``: the
config.json ``quantization`` section of a quantized checkpoint, notes, ...). Readers (native.py, hf.py,
megatron*.py) build one; writers and ``load_model`` stream tensor by tensor from one. The spec check compares a plan
with the model its config describes — built on meta with the module swaps the config declares — so a quantized
checkpoint's integer tensors are checked against the quantized modules that will hold them.

This module imports nothing from the formats (they import it): the package ``__init__`` re-exports its names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridctl.config import HybridctlError, ModelConfig

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
        """The dominant stored floating dtype (of the largest floating tensor: a quantized checkpoint's integer
        weights are not its compute dtype); the largest tensor's where none is floating."""
        floats = [s for s in self.specs.values() if s[1].is_floating_point] or list(self.specs.values())
        return max(floats, key=lambda s: _numel(s[0]))[1]

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The config.json ``quantization`` section (qlinear.apply_quantization), or None for a dense checkpoint."""
        return self.info.get("quantization")


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


def meta_model(config: ModelConfig, quantization: dict[str, Any] | None = None):
    """The model ``config`` describes, on meta (no memory), with the module swaps a ``quantization`` section
    declares applied (qlinear.apply_quantization)."""
    from hybridctl.model import build_model

    model = build_model(config)
    if quantization is not None:
        from hybridctl.qlinear import apply_quantization

        apply_quantization(model, quantization, "config.json quantization")
    return model


def check_specs(config: ModelConfig, specs: dict[str, TensorSpec], where: str,
                quantization: dict[str, Any] | None = None) -> None:
    """Strict comparison of a tensor plan with the model the config describes (with the module swaps of a
    config.json ``quantization`` section, qlinear.apply_quantization): names, shapes and dtype kinds, one clear
    error on any mismatch. A weight stored as an integer or bool is refused unless the (quantized) model holds an
    integer tensor there."""
    check_state(meta_model(config, quantization).state_dict(), specs, where)


def check_state(meta: dict[str, torch.Tensor], specs: dict[str, TensorSpec], where: str) -> None:
    """``check_specs`` against a model's (meta) state dict: the one the caller will load into."""
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


def ensure_valid(src: Source) -> Source:
    """check_specs once per Source: a no-op when the reader (or an earlier caller) already validated it."""
    if not src.validated:
        check_specs(src.config, src.specs, str(src.path), src.quantization)
        src.validated = True
    return src
