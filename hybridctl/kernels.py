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
import torch.nn.functional as F

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
    flash_attn_varlen: Callable[..., Any] | None = None  # flash_attn_varlen_func (packed documents, cu_seqlens)
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
            from flash_attn import flash_attn_func, flash_attn_varlen_func

            k.flash_attn, k.flash_attn_varlen = flash_attn_func, flash_attn_varlen_func
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


def training_backend(device: torch.device | str) -> str:
    """The backend a training step on ``device`` runs its Mamba layers with ('kernel' only for CUDA under the kernel
    backend; everything else takes ref.py), for the memory plan (``model.training_memory(backend=)``)."""
    return backend() if torch.device(device).type == "cuda" else "ref"


def describe() -> dict[str, Any]:
    """What is in use, for summaries and `bench`."""
    eff = backend()
    k = _load() if eff == "kernel" else _Kernels()
    return {"backend": eff, "requested": _requested, "ssd": "mamba_ssm" if eff == "kernel" else "ref",
            "conv1d": "causal_conv1d" if k.conv1d else "torch conv1d (causal_conv1d not installed)" if eff == "kernel"
            else "ref", "attention": "flash_attn" if k.flash_attn else "sdpa",
            "attention_documents": "dense mask (reference)" if _requested == "ref" else
            ("flash_attn varlen" if k.flash_attn_varlen else "FlexAttention") + " on CUDA, per-document SDPA on CPU",
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


def triton_ops() -> types.ModuleType | None:
    """hybridctl.triton_kernels wherever it imports (whatever the backend), else None: the quantized linears' CUDA
    route (qlinear.triton_forward) and its interpreter tests."""
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


def attention(q, k, v, *, offset=0, seq_idx=None, key_valid=None, layout=None):
    """ref.attention's signature plus ``layout`` (a DocumentLayout from ``document_layout``: packed documents of a
    training row, offset 0, no cache). With a layout the O(T)-memory document path runs (flash-attn varlen,
    FlexAttention or per-document SDPA, as the layout says); without one, plain causal goes to flash-attn when it
    can and everything else to the reference (the cache/prefill paths)."""
    if layout is not None:
        return _document_attention(q, k, v, layout)
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


# ---- document-aware attention for packed rows (O(T) memory) ----------------------------------------------------------
#
# A packed row holds several documents (seq_idx [B,T], non-decreasing per row); attention must stay inside each one.
# ``document_layout`` turns seq_idx into what the chosen path needs, once per batch (HybridLM.hidden_states calls it
# before the layers and hands the same object to every attention layer, so the block mask / cu_seqlens are built
# once and cached on it):
#   "flash"    CUDA, fp16/bf16, kernel backend, flash-attn present: flash_attn_varlen_func over the flattened B·T
#              tokens with cu_seqlens (a document that continues into the next row restarts there: rows are cut).
#   "flex"     CUDA otherwise: FlexAttention (compiled) with a document-causal BlockMask built from block-level
#              document ranges — O((T/128)²) booleans, never the T×S mask.
#   "segments" CPU (FlexAttention has no CPU backward): SDPA is_causal per document, the documents of equal
#              (start, end) across rows batched into one call; one host sync per batch (in document_layout).
#   "dense"    the ``ref`` backend: the reference's [B,1,T,T] mask (the oracle).
# All give ref.attention(q, k, v, seq_idx=seq_idx) (tests/test_attention_docs.py).

FLEX_BLOCK = 128  # FlexAttention's default sparse block size


@dataclass(eq=False)
class DocumentLayout:
    """Packed-document structure of one batch, for ``attention(..., layout=)``. seq_idx [B,T] int.

    kind: "flash" | "flex" | "segments" | "dense" (see above). cu_seqlens [n_docs+1] int32 over the flattened B·T
    tokens (flash); block_mask (flex); groups: ((start, end, rows [n] long), ...) per distinct document span (segments).
    """

    seq_idx: torch.Tensor
    kind: str
    cu_seqlens: torch.Tensor | None = None
    block_mask: Any = None
    groups: tuple[tuple[int, int, torch.Tensor], ...] = ()

    @property
    def seqlen(self) -> int:
        return self.seq_idx.shape[1]


_doc_kind: str | None = None  # force_document_attention(): one path for every layout built in the block


@contextlib.contextmanager
def force_document_attention(kind: str | None):
    """Within this block ``document_layout`` builds layouts of ``kind`` (flash | flex | segments | dense; None: the
    automatic choice), for side-by-side benchmarks."""
    global _doc_kind
    before, _doc_kind = _doc_kind, kind
    try:
        yield
    finally:
        _doc_kind = before


def _document_kind(device: torch.device, dtype: torch.dtype) -> str:
    if _doc_kind is not None:
        return _doc_kind
    env = os.environ.get("HYBRIDCTL_DOC_ATTENTION")  # flash | flex | segments | dense: force one path (benchmarks;
    if env:  # "segments" skips FlexAttention's per-shape compile on CUDA)
        return env
    eff = backend()  # also resolves _requested
    if _requested == "ref":
        return "dense"
    if device.type != "cuda":
        return "segments"
    k = _load() if eff == "kernel" else _Kernels()
    if k.flash_attn_varlen is not None and dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return "flex"


def document_layout(seq_idx: torch.Tensor | None, *, dtype: torch.dtype = torch.float32,
                    kind: str | None = None) -> DocumentLayout | None:
    """The DocumentLayout of packed rows seq_idx [B,T] for attention computed in ``dtype`` (None → None: one
    document per row, plain causal). ``kind`` forces a path (tests, benchmarks); default: picked as described above."""
    if seq_idx is None:
        return None
    kind = kind or _document_kind(seq_idx.device, dtype)
    lay = DocumentLayout(seq_idx=seq_idx, kind=kind)
    if kind == "flash":
        lay.cu_seqlens = _cu_seqlens(seq_idx)
    elif kind == "flex":
        lay.block_mask = document_block_mask(seq_idx)
    elif kind == "segments":
        lay.groups = _segment_groups(seq_idx)
    elif kind != "dense":
        raise HybridctlError(f"document attention {kind!r} is unknown; use flash, flex, segments or dense")
    return lay


def _starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """[B,T] bool: True where a document starts (each row's first token and every change of seq_idx)."""
    first = torch.ones_like(seq_idx[:, :1], dtype=torch.bool)
    return torch.cat([first, seq_idx[:, 1:] != seq_idx[:, :-1]], dim=1)


def _cu_seqlens(seq_idx: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths [n_docs+1] int32 over the flattened B·T tokens (flash-attn's varlen layout)."""
    starts = torch.nonzero(_starts(seq_idx).flatten()).flatten()
    end = torch.tensor([seq_idx.numel()], device=seq_idx.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def _segment_groups(seq_idx: torch.Tensor) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """((start, end, rows), ...): each distinct document span [start, end) and the rows that hold it."""
    bsz, seqlen = seq_idx.shape
    cu = _cu_seqlens(seq_idx).tolist()  # the one host sync
    spans: dict[tuple[int, int], list[int]] = {}
    for a, b in zip(cu[:-1], cu[1:]):
        row = a // seqlen
        spans.setdefault((a - row * seqlen, b - row * seqlen), []).append(row)
    return tuple((s, e, torch.tensor(rows, dtype=torch.long)) for (s, e), rows in spans.items())


@torch.compiler.disable  # data-dependent Python loop: runs eagerly inside compiled blocks (one graph break)
def _segments_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups) -> torch.Tensor:
    bsz, seqlen = q.shape[:2]
    gqa = q.shape[2] != k.shape[2]

    def sdpa(qs, ks, vs):  # [n,L,heads,dh] → [n,L,A,dh]
        o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                           is_causal=True, enable_gqa=gqa)
        return o.transpose(1, 2)

    if len(groups) == 1 and len(groups[0][2]) == bsz:  # every row is one document
        return sdpa(q, k, v)
    out = q.new_empty(q.shape)
    with _no_cudnn_sdpa(q):
        for s, e, rows in groups:
            if len(rows) == bsz:
                out[:, s:e] = sdpa(q[:, s:e], k[:, s:e], v[:, s:e])
            else:
                rows = rows.to(q.device)
                out[rows, s:e] = sdpa(q[rows, s:e], k[rows, s:e], v[rows, s:e])
    return out


def _no_cudnn_sdpa(q: torch.Tensor):
    """SDPA without its cuDNN backend on CUDA: every new document length would cost cuDNN a fresh graph build (the
    H200 run of benchmarks/extend_context.md stalled after 40 steps of ragged documents); flash / memory-efficient
    kernels take any length at no set-up cost. A no-op on the CPU."""
    if q.device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def document_block_mask(seq_idx: torch.Tensor, block: int = FLEX_BLOCK):
    """FlexAttention BlockMask for document-causal attention over seq_idx [B,T], from block-level document ranges.

    Rows are non-decreasing, so for query block i and key block j < i: some pair attends iff the key block's last
    document is the query block's first; every pair does ("full", no mask_mod call) iff the key block's first
    document is the query block's last (and both blocks are whole). The diagonal is always partial."""
    from torch.nn.attention.flex_attention import BlockMask

    bsz, seqlen = seq_idx.shape
    nb = -(-seqlen // block)
    idx = torch.arange(nb, device=seq_idx.device)
    first = seq_idx[:, idx * block]  # [B,nb] document of each block's first / last token
    last = seq_idx[:, torch.clamp((idx + 1) * block, max=seqlen) - 1]
    below = idx[None, :] < idx[:, None]  # [nb(q), nb(kv)]: j < i
    touch = (below[None] & (last[:, None, :] == first[:, :, None])) | torch.eye(nb, dtype=torch.bool,
                                                                                device=seq_idx.device)[None]
    whole = torch.ones(nb, dtype=torch.bool, device=seq_idx.device)
    if seqlen % block:
        whole[-1] = False
    full = below[None] & (first[:, None, :] == last[:, :, None]) & whole[None, :, None] & whole[None, None, :]
    partial = touch & ~full
    sid = seq_idx

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = q_idx.clamp(max=seqlen - 1), kv_idx.clamp(max=seqlen - 1)
        return (q_idx >= kv_idx) & (sid[b, qc] == sid[b, kc])

    def ordered(m):  # [B,nb,nb] bool → (counts [B,1,nb], indices [B,1,nb,nb]) int32, FlexAttention's layout
        m = m.to(torch.int32)[:, None]
        return m.sum(-1).to(torch.int32), torch.argsort(m, dim=-1, descending=True, stable=True).to(torch.int32)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seqlen, seqlen))


_flex_compiled: Callable[..., Any] | None = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention, compiled (its only fast and memory-efficient form); [B,heads,T,dh]. Inside a compiled block
    it is traced into the block's graph; eagerly it goes through one ``torch.compile``d wrapper made on first use
    (never while tracing: setting the global there would fail the block's guard and compile it twice)."""
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout) -> torch.Tensor:
    """q [B,T,A,dh], k/v [B,T,KV,dh] → [B,T,A,dh], attention inside each document of ``layout``."""
    bsz, seqlen, n_heads, dh = q.shape
    if k.shape[1] != seqlen or layout.seqlen != seqlen:
        raise ValueError(f"document attention needs queries and keys of the layout's length {layout.seqlen}, "
                         f"got {seqlen} and {k.shape[1]}")
    kind = layout.kind
    if kind == "flash" and q.dtype not in (torch.float16, torch.bfloat16):
        kind, layout.block_mask = "flex", layout.block_mask or document_block_mask(layout.seq_idx)
    if kind == "flash":
        cu = layout.cu_seqlens
        out = _load().flash_attn_varlen(q.reshape(bsz * seqlen, n_heads, dh), k.flatten(0, 1), v.flatten(0, 1),
                                        cu, cu, seqlen, seqlen, causal=True)  # max_seqlen: the row (a bound)
        return out.view(bsz, seqlen, n_heads, dh)
    if kind == "flex":
        out = _flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout.block_mask)
        return out.transpose(1, 2)
    if kind == "segments":
        return _segments_attention(q, k, v, layout.groups)
    return ref.attention(q, k, v, seq_idx=layout.seq_idx)
