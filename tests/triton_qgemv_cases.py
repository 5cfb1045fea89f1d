"""The quantized linears' Triton kernels (hybridctl/triton_kernels.py (last section)) run by Triton's CPU interpreter, against fp64
dequantize-then-matmul and against qlinear's twins. Run in a subprocess by tests/test_qgemv.py (the interpreter must
be on before the kernels are defined); fp16 / fp32 only (the interpreter's bf16 is not faithful, see
tests/triton_interp_cases.py); on a GPU, benchmarks/quantize_gpu.py checks them in bf16."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridctl import qlinear as Q  # noqa: E402
from hybridctl import triton_kernels as tq  # noqa: E402

ULP = {torch.float16: 2**-11, torch.float32: 2**-24}


def _case(m, n, k, method, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    qw, s = Q.quantize_int8(w) if method == "int8" else Q.quantize_int4(w, group)
    if method == "int4":  # the calibrated methods may use -8 too: cover the whole nibble range
        q = Q.unpack_int4(qw)
        q[0, :16] = -8
        qw = Q.pack_int4(q)
    s = s.to(dtype)
    dense = (Q.dequantize_int8(qw, s.double(), torch.float64) if method == "int8"
             else Q.dequantize_int4(qw, s.double(), group, torch.float64))
    return x, qw, s, x.double() @ dense.T


def _check(y, want, dtype, k):
    scale = want.abs().max().item() + 1.0
    err = (y.double() - want).abs().max().item()
    assert err <= 4 * ULP[dtype] * scale * max(1.0, k**0.5 / 16), f"max |err| {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k,config", [(1, 96, 64, None), (1, 100, 300, (4, 128, 4)), (2, 37, 1000, (8, 256, 2)),
                                          (1, 64, 2048, None)])
def test_int8_gemv(dtype, m, n, k, config):
    x, qw, s, want = _case(m, n, k, "int8", 0, dtype)
    y = tq.int8_gemv_launch(x, qw, s, torch.full((m, n), float("nan"), dtype=dtype), config=config)
    _check(y, want, dtype, k)
    _check(Q.int8_mm_ref(x, qw, s), want, dtype, k)  # the twin is as close: same meaning


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k,group,config", [(1, 96, 128, 32, None), (1, 100, 512, 128, (4, 64, 4)),
                                                (3, 37, 256, 64, (8, 32, 2)), (1, 64, 1024, 128, None)])
def test_int4_gemv(dtype, m, n, k, group, config):
    x, qw, s, want = _case(m, n, k, "int4", group, dtype)
    y = tq.int4_gemv_launch(x, qw, s, group, torch.full((m, n), float("nan"), dtype=dtype), config=config)
    _check(y, want, dtype, k)


@pytest.mark.parametrize("method,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("m,n,k", [(5, 70, 256), (17, 64, 384)])
def test_skinny_gemm(method, group, m, n, k):
    dtype = torch.float32
    if method == "int4" and k % group:
        pytest.skip("group does not divide K")
    x, qw, s, want = _case(m, n, k, method, group, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = tq.qmm_launch(x, qw, s, 8 if method == "int8" else 4, group, out, config=(16, 32, 32 if group != 128 else 64, 4))
    _check(y, want, dtype, k)


def test_custom_ops_and_the_module_route(monkeypatch):
    """The registered ops give the launchers' results; a quantized linear on a (pretend) CUDA input routes rows to
    the GEMV / skinny GEMM and matches its twin."""
    x, qw, s, want = _case(1, 64, 256, "int4", 64, torch.float32)
    _check(tq.int4_gemv(x, qw, s, 64), want, torch.float32, 256)
    x8, qw8, s8, want8 = _case(1, 64, 256, "int8", 0, torch.float32)
    _check(tq.int8_gemv(x8, qw8, s8), want8, torch.float32, 256)
    _check(tq.quant_mm(x8.expand(20, -1), qw8, s8, 8, 0), want8.expand(20, -1), torch.float32, 256)
    monkeypatch.setattr(Q, "_triton_ops", lambda: tq)  # None without CUDA: the interpreted kernels stand in
    for method in ("int8", "int4"):
        lin = torch.nn.Linear(256, 64, bias=True)
        q = Q.from_linear(lin, method, 64)
        for rows in (1, 3, 20, 80):
            xx = torch.randn(rows, 256)
            ref = q._mm_ref(xx) + q.bias
            got = Q.triton_forward(q, xx) + q.bias
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (method, rows)


@pytest.mark.parametrize("method,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("fused", ["norm", "gelu", "relu2", "res"])
@pytest.mark.parametrize("m,config", [(1, None), (2, (4, 256, 2))])
def test_fused_gemv(method, group, fused, m, config):
    """The decode step's norm / activation / bias + residual inside the quantized GEMV, against fp64 math on the
    same dequantized weights."""
    dtype, n, k = torch.float32, 48, 512
    x, qw, s, _ = _case(m, n, k, method, group, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    nw, bias, res = torch.rand(k, generator=g) + 0.5, torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    dense = (Q.dequantize_int8(qw, s.double(), torch.float64) if method == "int8"
             else Q.dequantize_int4(qw, s.double(), group, torch.float64))
    xd = x.double()
    if fused == "norm":
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    elif fused in ("gelu", "relu2"):
        xd = torch.nn.functional.gelu(xd) if fused == "gelu" else torch.relu(xd) ** 2
    want = xd @ dense.T + (bias.double() + res.double() if fused == "res" else 0.0)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = tq.qgemv_launch(x, qw, s, 8 if method == "int8" else 4, group, out, bias=bias if fused == "res" else None,
                        residual=res if fused == "res" else None, norm_weight=nw if fused == "norm" else None,
                        activation=fused if fused in ("gelu", "relu2") else None, config=config)
    _check(y, want, dtype, k)


def test_fused_module_hook_matches_the_unfused_step(monkeypatch):
    """fused_forward (what a quantized linear's fused_linear hook runs on CUDA) gives the unfused step's result:
    norm → module → + residual (kernels.triton_ops() is None without CUDA: the interpreted module stands in)."""
    from hybridctl.blocks import RMSNorm

    monkeypatch.setattr(Q, "_triton_ops", lambda: tq)

    torch.manual_seed(0)
    norm = RMSNorm(256, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    for method in ("int8", "int4"):
        q = Q.from_linear(torch.nn.Linear(256, 64, bias=True), method, 64)
        x, r = torch.randn(1, 256), torch.randn(1, 64)
        want = r + q._mm_ref(norm(x)) + q.bias
        got = Q.fused_forward(q, x, r, norm.weight, norm.eps, None)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), method
