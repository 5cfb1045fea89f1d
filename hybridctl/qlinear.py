"""Weight-only quantized linears (the runtime half of ``quantize``): module swaps for ``nn.Linear``, gpt-fast style.

Formats (symmetric, round-to-nearest unless a calibrated method chose the integers):

- ``int8``: ``qweight`` int8 [N,K], ``scales`` [N] (one per output channel); ``W ≈ qweight · scales[:, None]``.
- ``int4``: ``qweight`` uint8 [N,K/2], two 4-bit values a byte (column 2j in the low nibble, 2j+1 in the high one),
  each stored as q + 8 for q in [-8, 7]; ``scales`` [N, K/g] (one per group of g consecutive inputs of a row);
  ``W[n, k] ≈ q[n, k] · scales[n, k // g]``. No zero points.

These are also the safetensors layouts of a quantized native checkpoint (``<module>.qweight``, ``<module>.scales``,
``<module>.bias`` when the linear has one); the ``quantization`` section of its config.json says which modules were
swapped (``apply_quantization``). The layout is portable: the CPU int4 kernel's blocked copy is made at run time.

Kernels: on CPU with fp32 activations, hybridctl's C matrix-vector kernels (cpu_qkernels.py: they read this layout
directly; PyTorch's ops are vectorised for AVX-512 only), else PyTorch's weight-only ops (``aten._weight_int8pack_mm``; ``aten._weight_int4pack_mm_for_cpu`` on
the ``aten._convert_weight_to_int4pack_for_cpu`` copy, which dequantizes ``(u - 8) · scale + zero`` with u in
[0, 15]: our q + 8, zero 0); elsewhere, above KERNEL_MAX_ROWS rows, and where an op's shape rules fail (int4
needs N % 16 == 0), the twin. On CUDA: hybridctl's Triton kernels (triton_kernels.py) — the dequantizing GEMV up to
GPU_GEMV_MAX_ROWS rows (decode), a skinny tl.dot GEMM up to GPU_QMM_MAX_ROWS (a batch's decode step), the twin beyond
(prefill: dequantize into one cuBLAS GEMM).
Every kernel has a pure-PyTorch dequantize-then-matmul twin with the same signature (``*_mm_ref``), the oracle of
the tests.

Contract of a linear replacement (what blocks.py / model.py / generate.py rely on):
- a ``torch.nn.Module`` whose ``forward(x [..., in_features]) -> [..., out_features]`` in ``x``'s dtype computes
  ``x Wᵀ + b`` for any leading shape (prefill [B,T,K] and the decode step's [B,K]);
- its type is not ``nn.Linear``: ``blocks._linear`` first offers the step to its ``fused_linear`` hook (CUDA, a few
  rows: norm / activation / residual fused into the dequantizing GEMV, as the bf16 path fuses them), else calls it
  as a module (norm / activation applied before, residual added after) instead of reading ``.weight``, and generate's CPU fast path
  (``cpu_fast_twin``), which repacks only exact ``nn.Linear`` modules, leaves it alone; a quantized ``lm_head`` is
  called by ``HybridLM.logits`` / ``head`` instead of being read as a matrix;
- ``in_features``, ``out_features`` attributes; no ``weight`` attribute (code that would read the dense matrix fails
  loudly instead of multiplying integers); its state lives in buffers/parameters (``state_dict`` round trips, and
  ``copy.deepcopy`` with a memo of the model's tensors shares them);
- constructible on the meta device from the shapes alone (``build → swap → to_empty/load(assign=True)``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl import cpu_qkernels
from hybridctl.config import HybridctlError

Tensor = torch.Tensor
METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
KERNEL_MAX_ROWS = 16  # more rows than this: dequantize-then-matmul (the ops are slow at large M on CPU)
GPU_GEMV_MAX_ROWS = 4  # CUDA: up to this many rows, the Triton dequantizing GEMV (triton_kernels.py)
GPU_QMM_MAX_ROWS = 256  # CUDA: up to this many, the Triton skinny GEMM; beyond (prefill), dequantize into cuBLAS
_EPS = 1e-12
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ---- (de)quantization --------------------------------------------------------------------------------------------


def int8_scales(w: Tensor) -> Tensor:
    """Per-output-channel symmetric scales [N] (fp32) of w [N,K]: max |w| of the row / 127."""
    return (w.detach().float().abs().amax(dim=1) / 127.0).clamp(min=_EPS)


def int4_scales(w: Tensor, group_size: int) -> Tensor:
    """Per-group symmetric scales [N, K/g] (fp32): max |w| of the group / 7 (q in [-7, 7]; -8 only via calibration)."""
    n, k = w.shape
    return (w.detach().float().reshape(n, k // group_size, group_size).abs().amax(dim=2) / 7.0).clamp(min=_EPS)


def round_to_grid(w: Tensor, scales: Tensor, bits: int) -> Tensor:
    """q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) as int8; ``scales`` broadcast against w (fp32 math)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return torch.clamp(torch.round(w.float() / scales), lo, hi).to(torch.int8)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Round-to-nearest int8: (qweight int8 [N,K], scales fp32 [N])."""
    s = int8_scales(w)
    return round_to_grid(w, s[:, None], 8), s


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest int4: (packed qweight uint8 [N,K/2], scales fp32 [N,K/g])."""
    check_group(w.shape[1], group_size, "weight")
    s = int4_scales(w, group_size)
    return pack_int4(round_to_grid(w, s.repeat_interleave(group_size, dim=1), 4)), s


def pack_int4(q: Tensor) -> Tensor:
    """int8 q [N,K] in [-8,7] → uint8 [N,K/2]: (q[:, 2j] + 8) | (q[:, 2j+1] + 8) << 4."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: Tensor) -> Tensor:
    """uint8 [N,K/2] → int8 q [N,K] in [-8,7] (inverse of pack_int4)."""
    lo, hi = (p & 0x0F).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], p.shape[1] * 2)


def dequantize_int8(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (qweight.to(dtype) * scales.to(dtype)[:, None])


def dequantize_int4(qweight: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return unpack_int4(qweight).to(dtype) * scales.to(dtype).repeat_interleave(group_size, dim=1)


def check_group(in_features: int, group_size: int, where: str) -> None:
    if group_size not in GROUP_SIZES:
        raise HybridctlError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise HybridctlError(f"{where}: group size {group_size} does not divide its input width {in_features}")


# ---- kernels and their twins (x [M,K] → [M,N], in x's dtype) ------------------------------------------------------


def int8_mm_ref(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """Twin: dequantize, then matmul."""
    return F.linear(x, dequantize_int8(qweight, scales, x.dtype))


def _c_kernels_for(x: Tensor, qweight: Tensor, scales: Tensor) -> bool:
    """hybridctl's C kernels (cpu_qkernels.py) take fp32 CPU inputs with fp32 scales, where they built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and scales.dtype == torch.float32 \
        and cpu_qkernels.usable(x, qweight, scales)


def int8_mm(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return int8_mm_ref(x, qweight, scales)
    if _c_kernels_for(x, qweight, scales):
        return cpu_qkernels.int8_gemv(x, qweight, scales)
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), qweight, scales.to(x.dtype))


def int4_mm_ref(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """Twin: dequantize, then matmul."""
    return F.linear(x, dequantize_int4(qweight, scales, group_size, x.dtype))


def int4_cpu_operands(qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The CPU int4 op's operands: the blocked uint8 copy of the weight and qScaleAndZeros [K/g, N, 2] (zeros 0)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((unpack_int4(qweight).to(torch.int32) + 8), 1)
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).to(dtype).contiguous()
    return packed, sz


def int4_cpu_ok(x: Tensor, out_features: int) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and out_features % 16 == 0


def int4_mm(x: Tensor, packed: Tensor, sz: Tensor, group_size: int) -> Tensor:
    """The CPU kernel on ``int4_cpu_operands``'s tensors."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, sz)


def _triton_ops():
    """hybridctl.triton_kernels (through kernels.py, the one module that imports it), or None without Triton."""
    from hybridctl import kernels

    return kernels.triton_ops()


def triton_forward(mod: "_QuantLinear", x: Tensor) -> Tensor:
    """x [M,K] through the Triton kernels: the GEMV for decode rows, the skinny GEMM for a batch's decode step,
    dequantize-then-matmul for prefill-sized M (no bias; forward adds it)."""
    tq, m = _triton_ops(), x.shape[0]
    if tq is None or m > GPU_QMM_MAX_ROWS:
        return mod._mm_ref(x)
    bits = 8 if mod.method == "int8" else 4
    scales = mod.scales if mod.scales.dtype == x.dtype else mod.scales.to(x.dtype)
    if m <= GPU_GEMV_MAX_ROWS:
        if bits == 8:
            return tq.int8_gemv(x, mod.qweight, scales)
        return tq.int4_gemv(x, mod.qweight, scales, mod.group_size)
    return tq.quant_mm(x, mod.qweight, scales, bits, getattr(mod, "group_size", 0))


def fused_forward(mod: "_QuantLinear", x: Tensor, residual: Tensor | None, norm_weight: Tensor | None,
                  eps: float, activation: str | None) -> Tensor:
    """The decode step's ``act(norm(x)) · Wᵀ + b + residual`` in one Triton GEMV launch (x [M,K], M ≤
    GPU_GEMV_MAX_ROWS; the norm / activation / residual fused as in the bf16 GEMV)."""
    tq = _triton_ops()
    bits = 8 if mod.method == "int8" else 4
    scales = mod.scales if mod.scales.dtype == x.dtype else mod.scales.to(x.dtype)
    return tq.qgemv(x, mod.qweight, scales, bits, getattr(mod, "group_size", 0),
                    None if mod.bias is None else mod.bias.to(x.dtype), residual,
                    None if norm_weight is None else norm_weight.to(x.dtype), float(eps), activation)


# ---- modules ---------------------------------------------------------------------------------------------------------


class _QuantLinear(nn.Module):
    method = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_kernel = True  # False: always the dequantize-then-matmul twin (tests, debugging)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.use_kernel and flat.is_cuda and flat.dtype in _FLOATS:
            y = triton_forward(self, flat)
        # the weight-only ops are matrix-vector kernels: many rows (prefill, evaluation) dequantize into one GEMM
        elif self.use_kernel and flat.shape[0] <= KERNEL_MAX_ROWS:
            y = self._mm(flat)
        else:
            y = self._mm_ref(flat)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def fused_linear(self, x: Tensor, *, residual: Tensor | None = None, norm=None,
                     activation: str | None = None) -> Tensor | None:
        """blocks._linear's hook: ``self(act(norm(x))) + residual`` as one fused GEMV for a CUDA decode step of at
        most GPU_GEMV_MAX_ROWS rows (``norm``: an RMSNorm module, its ``weight`` and ``eps``); None elsewhere (the
        caller then applies them around ``forward``)."""
        if not (self.use_kernel and x.is_cuda and x.dtype in _FLOATS and x.dim() == 2
                and x.shape[0] <= GPU_GEMV_MAX_ROWS and (norm is None or activation is None)
                and (residual is None or residual.shape == (x.shape[0], self.out_features))) \
                or _triton_ops() is None:
            return None
        return fused_forward(self, x, None if residual is None else residual.to(x.dtype),
                             None if norm is None else norm.weight, 1e-5 if norm is None else norm.eps, activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightOnlyLinear(_QuantLinear):
    """Symmetric per-output-channel int8 weights (``qweight`` [N,K] int8, ``scales`` [N]); activations stay float."""

    method = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features, device=device, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, device=device, dtype=dtype))

    def _mm(self, x: Tensor) -> Tensor:
        return int8_mm(x, self.qweight, self.scales)

    def _mm_ref(self, x: Tensor) -> Tensor:
        return int8_mm_ref(x, self.qweight, self.scales)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def set_quantized(self, qweight: Tensor, scales: Tensor) -> None:
        self.qweight.copy_(qweight)
        self.scales.copy_(scales)


class Int4WeightOnlyLinear(_QuantLinear):
    """Symmetric group-wise int4 weights (``qweight`` [N,K/2] uint8 packed, ``scales`` [N,K/g])."""

    method = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None, *,
                 group_size: int = 128) -> None:
        check_group(in_features, group_size, f"Int4WeightOnlyLinear({in_features}, {out_features})")
        if in_features % 2:
            raise HybridctlError(f"int4 needs an even input width, got {in_features}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.group_size = group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, device=device, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, device=device,
                                                   dtype=dtype))
        self._cpu_cache: tuple[Any, Tensor, Tensor] | None = None  # (key, blocked weight, qScaleAndZeros)

    def _operands(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales.data_ptr(), self.scales._version, dtype)
        if self._cpu_cache is None or self._cpu_cache[0] != key:
            self._cpu_cache = (key, *int4_cpu_operands(self.qweight, self.scales, dtype))
        return self._cpu_cache[1], self._cpu_cache[2]

    def _mm(self, x: Tensor) -> Tensor:
        if _c_kernels_for(x, self.qweight, self.scales):
            return cpu_qkernels.int4_gemv(x, self.qweight, self.scales, self.group_size)
        if not int4_cpu_ok(x, self.out_features):
            return self._mm_ref(x)
        packed, sz = self._operands(x.dtype)
        return int4_mm(x, packed, sz, self.group_size)

    def _mm_ref(self, x: Tensor) -> Tensor:
        return int4_mm_ref(x, self.qweight, self.scales, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int4(self.qweight, self.scales, self.group_size, dtype)

    def set_quantized(self, qweight: Tensor, scales: Tensor) -> None:
        self.qweight.copy_(qweight)
        self.scales.copy_(scales)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


QuantLinear = Int8WeightOnlyLinear | Int4WeightOnlyLinear


def empty_like_linear(linear: nn.Linear, method: str, group_size: int) -> QuantLinear:
    """An uninitialised quantized twin of ``linear`` (same device and float dtype; meta stays meta)."""
    kw = dict(bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
    if method == "int8":
        return Int8WeightOnlyLinear(linear.in_features, linear.out_features, **kw)
    if method == "int4":
        return Int4WeightOnlyLinear(linear.in_features, linear.out_features, group_size=group_size, **kw)
    raise HybridctlError(f"unknown quantization method {method!r} (choose from {', '.join(METHODS)})")


def from_linear(linear: nn.Linear, method: str, group_size: int = 128, *, qweight: Tensor | None = None,
                scales: Tensor | None = None) -> QuantLinear:
    """The quantized module for a dense ``linear``: round-to-nearest, or the given (qweight, scales)."""
    m = empty_like_linear(linear, method, group_size)
    w = linear.weight.detach()
    if qweight is None:
        qweight, scales = quantize_int8(w) if method == "int8" else quantize_int4(w, group_size)
    m.set_quantized(qweight, scales)
    if linear.bias is not None:
        m.bias.data.copy_(linear.bias.detach())
    return m.eval()


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---- the config.json section -------------------------------------------------------------------------------------


def check_section(section: Any, where: str = "quantization") -> tuple[str, int, list[str]]:
    """(method, group_size, module names) of a config.json ``quantization`` section, or one clear error."""
    if not isinstance(section, dict):
        raise HybridctlError(f"{where}: expected an object, got {type(section).__name__}")
    method, group, names = section.get("method"), section.get("group_size"), section.get("modules")
    if method not in METHODS:
        raise HybridctlError(f"{where}.method: unknown method {method!r} (choose from {', '.join(METHODS)})")
    if method == "int4" and group not in GROUP_SIZES:
        raise HybridctlError(f"{where}.group_size: must be one of {GROUP_SIZES} for int4, got {group!r}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HybridctlError(f"{where}.modules: expected a list of module names")
    return method, int(group or 0), names


def apply_quantization(model: nn.Module, section: dict[str, Any], where: str = "quantization") -> nn.Module:
    """Swap the ``nn.Linear`` modules the section names for empty quantized ones (in place; meta-friendly)."""
    method, group, names = check_section(section, where)
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise HybridctlError(f"{where}.modules: the model has no module {name!r}") from None
        if type(lin) is not nn.Linear:
            raise HybridctlError(f"{where}.modules: {name!r} is a {type(lin).__name__}, not a linear layer")
        set_submodule(model, name, empty_like_linear(lin, method, group))
    return model
