"""Kernel dispatch: the ONLY module that imports mamba_ssm / causal_conv1d / flash_attn.

The backend is chosen once (``auto`` | ``kernel`` | ``ref``), from ``set_backend`` (the CLI's ``--backend``) or the
``HYBRIDCTL_BACKEND`` environment variable, and logged once. ``auto`` uses the kernels for CUDA tensors when they
import and the pure-PyTorch twins (ref.py) otherwise; ``kernel`` raises if they are missing. Every function has the
signature of its ref twin; CPU tensors always take the ref path (the kernels are CUDA-only).

hybridctl's own Triton kernels (``triton_kernels.py``: the batch-1 GEMV and the split-KV decode attention of the
decode step) are imported here too, and only here; ``linear`` and ``decode_attention`` use them for CUDA bf16/fp16
tensors under the kernel backend (``decode_kernels(False)`` turns them off for side-by-side benchmarks).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hybridctl import ref
from hybridctl.config import HybridctlError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "kernel", "ref")


@dataclass
class _Kernels:
    ssd_scan: Callable[..., Any] | None = None  # mamba_chunk_scan_combined
    state_update: Callable[..., Any] | None = None  # selective_state_update
    rmsnorm_gated: Callable[..., Any] | None = None  # layernorm_gated.rmsnorm_fn
    conv1d: Callable[..., Any] | None = None  # causal_conv1d_fn
    conv1d_update: Callable[..., Any] | None = None  # causal_conv1d_update
    flash_attn: Callable[..., Any] | None = None  # flash_attn_func
    triton_ops: types.ModuleType | None = None  # hybridctl.triton_kernels (batch-1 GEMV, decode attention)
    errors: tuple[str, ...] = ()


_requested: str | None = None
_loaded: _Kernels | None = None
_inline = False  # inline_ops(): every op takes its pure-PyTorch twin, for torch.compile to fuse
_decode_kernels = True  # hybridctl's own Triton decode kernels (GEMV, decode attention); off: cuBLAS / SDPA


def _import_mamba_ssm() -> types.ModuleType:
    """Import mamba_ssm, tolerating a Triton-only install without the Mamba-1 CUDA extension.

    mamba_ssm/__init__.py imports ``selective_scan_cuda`` (Mamba-1), which a pure-Python wheel lacks; Mamba-2 never
    calls it. Register an inert module under that name so the Triton kernels import; calling it raises.
    """
    try:
        return importlib.import_module("mamba_ssm")
    except ImportError as e:
        if "selective_scan_cuda" not in str(e):
            raise
    placeholder = types.ModuleType("selective_scan_cuda")

    def _missing(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("selective_scan_cuda (Mamba-1) is not installed; hybridctl only uses Mamba-2 kernels")

    placeholder.fwd = placeholder.bwd = _missing  # type: ignore[attr-defined]
    sys.modules["selective_scan_cuda"] = placeholder
    for name in [m for m in sys.modules if m.startswith("mamba_ssm")]:
        del sys.modules[name]
    return importlib.import_module("mamba_ssm")


def _load() -> _Kernels:
    global _loaded
    if _loaded is not None:
        return _loaded
    k, errors = _Kernels(), []
    if torch.cuda.is_available():
        try:
            _import_mamba_ssm()
            from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            k.ssd_scan, k.state_update, k.rmsnorm_gated = mamba_chunk_scan_combined, selective_state_update, rmsnorm_fn
        except Exception as e:  # noqa: BLE001 - any import failure means "not available", reported below
            errors.append(f"mamba_ssm: {type(e).__name__}: {e}")
        try:
            from causal_conv1d import causal_conv1d_fn, causal_conv1d_update

            k.conv1d, k.conv1d_update = causal_conv1d_fn, causal_conv1d_update
        except Exception as e:  # noqa: BLE001
            errors.append(f"causal_conv1d: {type(e).__name__}: {e}")
        try:
            from hybridctl import triton_kernels

            k.triton_ops = triton_kernels
        except Exception as e:  # noqa: BLE001
            errors.append(f"triton: {type(e).__name__}: {e}")
        try:
            from flash_attn import flash_attn_func

            k.flash_attn = flash_attn_func
        except Exception as e:  # noqa: BLE001
            errors.append(f"flash_attn: {type(e).__name__}: {e}")
    else:
        errors.append("CUDA is not available")
    k.errors = tuple(errors)
    _loaded = k
    return k


def set_backend(name: str | None) -> str:
    """Choose the backend (None: from HYBRIDCTL_BACKEND, default auto). Returns the effective one, 'kernel'/'ref'."""
    global _requested
    name = (name or os.environ.get("HYBRIDCTL_BACKEND") or "auto").lower()
    if name not in BACKENDS:
        raise HybridctlError(f"backend {name!r} is unknown; use one of {', '.join(BACKENDS)}")
    _requested = name
    eff = backend()
    if eff == "kernel":  # say which ops still take the PyTorch path: no silent partial fallback
        d = describe()
        detail = f" (SSD scan/step/gated norm: mamba_ssm; conv1d: {d['conv1d']}; attention: {d['attention']})"
    else:
        detail = " (" + "; ".join(_load().errors) + ")" if name == "auto" else ""
    log.info("hybridctl backend: %s (requested %s)%s", eff, name, detail)
    return eff


def backend() -> str:
    """The effective backend: 'kernel' when the Mamba-2 kernels are in use for CUDA tensors, else 'ref'."""
    if _requested is None:
        return set_backend(None)
    if _requested == "ref":
        return "ref"
    k = _load()
    if k.ssd_scan is None:
        if _requested == "kernel":
            raise HybridctlError("backend 'kernel' requested but the Mamba-2 kernels are unavailable: "
                                 + "; ".join(k.errors) + " (install with: pip install 'hybridctl[kernels]')")
        return "ref"
    return "kernel"


def describe() -> dict[str, Any]:
    """What is in use, for summaries and `bench`."""
    eff = backend()
    k = _load() if eff == "kernel" else _Kernels()
    return {"backend": eff, "requested": _requested, "ssd": "mamba_ssm" if eff == "kernel" else "ref",
            "conv1d": "causal_conv1d" if k.conv1d else "torch conv1d (causal_conv1d not installed)" if eff == "kernel"
            else "ref", "attention": "flash_attn" if k.flash_attn else "sdpa",
            "decode": "hybridctl triton (batch-1 GEMV, split-KV attention)" if k.triton_ops and _decode_kernels
            else "cuBLAS / sdpa"}


@contextlib.contextmanager
def inline_ops():
    """Within this block every dispatcher takes its pure-PyTorch twin (ref.py), whatever the backend: for code traced
    by ``torch.compile``, whose generated kernels then fuse each op with its neighbours (the compiled decode step).
    Matrix products stay library calls (cuBLAS, or the batch-1 GEMV of ``linear``) and decode attention stays
    ``decode_attention``: Inductor's own matrix-vector reductions were slower for a decode step
    (benchmarks/generate_gpu.md). Dynamo guards on the flag, so a function compiled inside the block must also
    be called inside it."""
    global _inline
    before, _inline = _inline, True
    try:
        yield
    finally:
        _inline = before


@contextlib.contextmanager
def decode_kernels(enabled: bool):
    """Within this block hybridctl's own decode kernels (``linear`` at one row, ``decode_attention``) are on or off;
    off, those ops take cuBLAS / SDPA: for side-by-side benchmarks. Dynamo guards on the flag as on ``_inline``."""
    global _decode_kernels
    before, _decode_kernels = _decode_kernels, enabled
    try:
        yield
    finally:
        _decode_kernels = before


def _decode_ops_for(t: torch.Tensor) -> types.ModuleType | None:
    """hybridctl.triton_kernels for CUDA bf16/fp16 tensors under the kernel backend (also inside ``inline_ops``: the
    ops are opaque custom ops that torch.compile calls as they are), else None."""
    if not _decode_kernels or not t.is_cuda or t.dtype not in (torch.bfloat16, torch.float16) \
            or backend() != "kernel":
        return None
    return _load().triton_ops


def _kernels_for(t: torch.Tensor) -> _Kernels | None:
    if _inline or not t.is_cuda or backend() != "kernel":
        return None
    return _load()


# ---- dispatchers (same signatures as ref.py) ------------------------------------------------------------------------


def ssd_scan(x, dt, A, B, C, chunk_size, *, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
             initial_state=None, seq_idx=None):
    k = _kernels_for(x)
    if k is None:
        return ref.ssd_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                            dt_limit=dt_limit, initial_state=initial_state, seq_idx=seq_idx)
    y, final = k.ssd_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                          dt_limit=dt_limit, initial_states=initial_state,
                          seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
                          return_final_states=True)
    return y, final


def ssm_step(state, x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    k = _kernels_for(x)
    if k is None:
        return ref.ssm_step(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    # selective_state_update has no dt clamp: process dt here, then broadcast the per-head scalars over P and N
    # (stride-0 views, as mamba_ssm's own Mamba2.step does).
    p, n = x.shape[-1], B.shape[-1]
    dt = ref.process_dt(dt, dt_bias, dt_softplus, dt_limit)
    dt_e = dt[..., None].expand(-1, -1, p)
    A_e = A.float()[:, None, None].expand(-1, p, n)
    D_e = None if D is None else D[:, None].expand(-1, p)
    zero_bias = torch.zeros((), device=x.device, dtype=dt.dtype).expand(x.shape[1], p)  # the kernel needs one
    return k.state_update(state, x, dt_e, A_e, B, C, D=D_e, dt_bias=zero_bias, dt_softplus=False)


def causal_conv1d(x, weight, bias=None, *, initial_state=None, seq_idx=None, activation="silu"):
    k = _kernels_for(x)
    if k is None or k.conv1d is None or initial_state is not None:
        return ref.causal_conv1d(x, weight, bias, initial_state=initial_state, seq_idx=seq_idx,
                                 activation=activation)
    out = k.conv1d(x.transpose(1, 2), weight, bias,
                   seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(), activation=activation)
    return out.transpose(1, 2)


def conv_step(conv_state, x, weight, bias=None, *, activation="silu"):
    k = _kernels_for(x)
    if k is None or k.conv1d_update is None:
        return ref.conv_step(conv_state, x, weight, bias, activation=activation)
    return k.conv1d_update(x, conv_state, weight, bias, activation)


def rmsnorm(x, weight, eps):
    return ref.rmsnorm(x, weight, eps)


def mlp_activation(x, name):
    return ref.mlp_activation(x, name)


def rmsnorm_gated(x, z, weight, eps, group_size):
    k = _kernels_for(x)
    if k is None:
        return ref.rmsnorm_gated(x, z, weight, eps, group_size)
    return k.rmsnorm_gated(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)


def attention(q, k, v, *, offset=0, seq_idx=None, key_valid=None):
    kk = _kernels_for(q)
    plain = seq_idx is None and key_valid is None and offset == 0 and q.shape[1] == k.shape[1]
    if kk is not None and kk.flash_attn is not None and plain and q.dtype in (torch.float16, torch.bfloat16):
        return kk.flash_attn(q, k, v, causal=True)
    return ref.attention(q, k, v, offset=offset, seq_idx=seq_idx, key_valid=key_valid)


def decode_attention(q, k, v, key_mask):
    ops = _decode_ops_for(q)
    dh = q.shape[-1]
    if ops is None or k.dtype != q.dtype or v.dtype != q.dtype or dh < 16 or dh & (dh - 1) \
            or q.shape[1] % k.shape[2] or k.stride(-1) != 1 or v.stride(-1) != 1:
        return ref.decode_attention(q, k, v, key_mask)
    return ops.decode_attention(q, k, v, key_mask)


def linear(x, weight, bias=None, *, residual=None, norm_weight=None, norm_eps=1e-5, activation=None):
    ops = _decode_ops_for(x)
    if ops is None or x.numel() != x.shape[-1] or weight.dtype != x.dtype or weight.stride(-1) != 1 \
            or (norm_weight is not None and activation is not None):
        return ref.linear(x, weight, bias, residual=residual, norm_weight=norm_weight, norm_eps=norm_eps,
                          activation=activation)
    y = ops.gemv(x.reshape(1, -1), weight, bias, None if residual is None else residual.reshape(1, -1), norm_weight,
                 float(norm_eps), activation)
    return y.view(*x.shape[:-1], weight.shape[0])
