"""The CPU fast path of the decode step: a twin of the model whose linears are prepacked for oneDNN (blocked weights
for several rows), with an Inductor-compiled matrix-vector product for the large weights at batch 1; decode.py runs
its CPU steps (plan modes ``cpu-fast`` / ``cpu-fast-matvec``) on ``cpu_fast_twin(model)``. Module swaps only: the
twin's ``nn.Linear`` modules (and a tied model's head) become ``_PackedLinear``; the contract a linear replacement
keeps is in decode.py's docstring. Also the Dynamo recompile-limit helper both compiled decode paths (this one and
decode.py's compiled layer step) need."""

from __future__ import annotations

import copy
import itertools
import logging
import weakref
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger("hybridctl.generate")  # its messages are generate's
Tensor = torch.Tensor


def _one_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, at most 300 characters, for summaries and one-line warnings."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# ---- CPU fast path: linear weights prepacked for oneDNN ---------------------------------------------------------

FAST_CPU_MAX_BYTES = 4 << 30  # the twin holds a second copy of the linear weights: small models only


def _onednn_linear_ops() -> bool:
    """oneDNN's inner product on dense fp32 tensors, the weight optionally reordered once (what Inductor's freezing
    pass emits): ``mkldnn._reorder_linear_weight`` + ``mkldnn._linear_pointwise``; older builds lack them."""
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


MATVEC_MIN_BYTES = 4 << 20  # weights from this size take the compiled matrix-vector product at batch 1
_matvec_fn: Callable[[Tensor, Tensor], Tensor] | None = None
_matvec_error: str | None = None


def raise_recompile_limit(n: int) -> None:
    """Dynamo keeps at most recompile_limit graphs per compiled function, then silently runs it uncompiled: make room
    for ``n`` (the process-wide limit only ever grows)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(cfg, name, max(getattr(cfg, name), n))


def matvec_error() -> str | None:
    """Why ``compiled_matvec`` failed in this process (``Type: first line``), or None."""
    return _matvec_error


def _matvec(w: Tensor, x: Tensor) -> Tensor:
    """w [N,K], x [K] → [N]: one fused multiply-reduce pass over w when compiled."""
    return (w * x).sum(-1)


def compiled_matvec(shapes: Sequence[tuple[int, int]]) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``_matvec`` compiled by Inductor for each weight shape [N,K] in ``shapes`` (compiled here, once per shape
    and process: generate's warm-up), or None where compiling fails (no C++ compiler, an Inductor bug: logged once,
    then oneDNN does every product). On the 2-core EPYC, weights not in cache, it streams a batch-1 product 5–25%
    faster than oneDNN's M = 1 kernel: a vectorised row reduction split over the OpenMP threads. Static shapes:
    Inductor decides the threading from the sizes it compiles for (a dynamic-shape kernel compiled at a small size
    runs on one thread). Its per-call overhead (Dynamo's guards, ≈ 10 µs) keeps small weights on oneDNN
    (MATVEC_MIN_BYTES)."""
    global _matvec_fn, _matvec_error
    if _matvec_error is not None:
        return None
    try:
        if _matvec_fn is None:
            raise_recompile_limit(64)  # one graph per weight shape (× grad mode) must fit
            _matvec_fn = torch.compile(_matvec, dynamic=False)
        with torch.inference_mode():
            for n, k in sorted(set(shapes)):
                w, x = torch.randn(n, k), torch.randn(k)
                torch.testing.assert_close(_matvec_fn(w, x), w @ x, atol=1e-3, rtol=1e-4)
        return _matvec_fn
    except Exception as e:  # noqa: BLE001 - any compiler failure: oneDNN for every product, and say so
        _matvec_error = _one_line(e)
        log.warning("generate: compiling the CPU matrix-vector product failed, using oneDNN's (%s)", _matvec_error)
        log.info("generate: the compile error in full:", exc_info=e)
        return None


class _PackedLinear(torch.nn.Module):
    """x [..., in] → x Wᵀ + b for the CPU decode step, which is matrix-vector work at M = batch. MKL's small-M
    sgemm/sgemv streams the weights at about half the memory bandwidth there; oneDNN's inner product does not
    (measured on 2 EPYC cores, 1 thread: the 50304×768 head at B=8 40 → 17 ms, the whole hybrid-130m step
    110 → 93 ms).

    ``mkldnn._linear_pointwise`` takes and returns dense tensors (no to_mkldnn / to_dense per call: 45 linears a
    hybrid-130m step, ≈ 1.5 ms of a ≈ 30 ms batch-1 step) and picks its kernel by the weight's layout. On the
    2-core EPYC (AVX-512), per weight shape of hybrid-130m, weights not in cache: several rows run 30–50% faster
    on the blocked copy that ``_reorder_linear_weight`` makes for M > 1 (avx512 brgemm; packed once here), one row
    5–10% faster on the plain row-major weight (avx2 brgemm; the parameter itself, no copy), and faster still, for
    weights of MATVEC_MIN_BYTES and more, through ``compiled_matvec``. Builds without these ops use mkldnn_linear
    with the per-call conversions."""

    def __init__(self, weight: Tensor, bias: Tensor | None, matvec: Callable[[Tensor, Tensor], Tensor] | None = None
                 ) -> None:
        super().__init__()
        self.weight = weight  # the dense parameter: the batch-1 operand, and for anything that inspects it
        self.pointwise = _onednn_linear_ops()
        self.dense = weight.detach().contiguous()
        self.big = self.dense.numel() * self.dense.element_size() >= MATVEC_MIN_BYTES
        self.matvec = matvec if self.big else None
        self.bias_dense = None if bias is None else bias.detach()
        if self.pointwise:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.dense, None)  # blocked (AB16b64a)
            self.packed_bias = self.bias_dense
        else:
            self.packed = self.dense.to_mkldnn()
            self.packed_bias = None if bias is None else self.bias_dense.to_mkldnn()

    def forward(self, x: Tensor) -> Tensor:
        one_row = x.numel() == x.shape[-1]
        if one_row and self.matvec is not None:
            y = self.matvec(self.dense, x.reshape(-1))
            if self.bias_dense is not None:
                y = y + self.bias_dense
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.pointwise:
            w = self.dense if one_row else self.packed
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, self.packed_bias, "none", [], "")
        flat = x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn()
        y = torch._C._nn.mkldnn_linear(flat, self.packed, self.packed_bias).to_dense()
        return y.view(*x.shape[:-1], y.shape[-1])


_twins: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cpu_fast_refusal(model) -> str | None:
    """Why ``cpu_fast_twin`` would return ``model`` itself (not CPU fp32, no oneDNN, linear weights over
    FAST_CPU_MAX_BYTES), or None where the fast path applies. ``decode.plan_decode`` asks this once."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"the CPU fast path needs a CPU model (this one is on {p.device.type})"
    if p.dtype != torch.float32:
        return f"the CPU fast path needs float32 weights (these are {str(p.dtype).removeprefix('torch.')})"
    if not torch.backends.mkldnn.is_available():
        return "the CPU fast path needs oneDNN (this torch build has none)"
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if nbytes > FAST_CPU_MAX_BYTES:
        return f"the CPU fast path holds a second copy of the linear weights: {nbytes >> 20} MiB is over its " \
               f"{FAST_CPU_MAX_BYTES >> 20} MiB limit"
    return None


def _fingerprint(model) -> tuple:
    # storage and in-place version of every parameter: a twin is stale once any weight changed
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def cpu_fast_twin(model, *, matvec: bool = False):
    """The model to run CPU decode steps with: a twin sharing every tensor with ``model`` whose linears (lm_head /
    tied embedding included) are _PackedLinear: a blocked copy of each weight for oneDNN at several rows, and at one
    row the weight itself through oneDNN or, with ``matvec`` (batch-1 decode), through ``compiled_matvec`` for the
    weights of MATVEC_MIN_BYTES and more (compiled here, on the first such call: seconds, once per process; the
    twin keeps it). The SSM state is updated in place by ref.ssm_step either way. Returns ``model`` itself where the
    fast path does not apply (not CPU fp32, no oneDNN, linear weights over FAST_CPU_MAX_BYTES). Cached per model
    while its weights are unchanged (the packed copy lives as long as the model)."""
    if cpu_fast_refusal(model) is not None:
        return model
    key = _fingerprint(model)
    hit = _twins.get(model)
    if hit is not None and hit[0] == key:
        twin = hit[1]
    else:
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        twin = copy.deepcopy(model, memo)  # new module objects, the same tensors
        for parent in list(twin.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, _PackedLinear(child.weight, child.bias))
        twin.compiled_matvec = False
        if twin.lm_head is None:  # tied: the head is a packed linear over the embedding table (shared, not copied)
            twin.lm_head = _PackedLinear(model.embed.weight, None)
        _twins[model] = (key, twin)
    if matvec and not twin.compiled_matvec:
        big = [m for m in twin.modules() if isinstance(m, _PackedLinear) and m.big]
        fn = compiled_matvec([tuple(m.dense.shape) for m in big]) if big else None
        for m in big:
            m.matvec = fn
        twin.compiled_matvec = fn is not None
    return twin
