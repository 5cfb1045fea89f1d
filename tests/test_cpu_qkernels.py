"""hybridctl's C weight-only matrix-vector kernels (hybridctl/cpu_qkernels.py) against qlinear's dequantize-then-
matmul twins, and the quantized linears' CPU route through them (and without them: PyTorch's ops)."""

import pytest
import torch

from hybridctl import cpu_qkernels as C
from hybridctl import qlinear as Q

pytestmark = pytest.mark.skipif(not C.available(), reason=f"no C compiler: {C.error()}")


def _close(y, ref, k):
    scale = ref.abs().max().item() + 1e-6
    assert (y - ref).abs().max().item() <= 1e-5 * scale * max(1.0, k**0.5 / 8), (y - ref).abs().max().item()


@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (1, 33, 300), (3, 70, 1000), (16, 8, 2048)])
def test_int8_gemv_matches_the_twin(m, n, k):
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    qw, s = Q.quantize_int8(w)
    _close(C.int8_gemv(x, qw, s), Q.int8_mm_ref(x, qw, s), k)
    _close(C.int8_gemv(x.t().contiguous().t(), qw, s), Q.int8_mm_ref(x, qw, s), k)  # a non-contiguous x


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,n,k", [(1, 96, 256), (2, 45, 384), (5, 16, 1024)])
def test_int4_gemv_matches_the_twin(m, n, k, group):
    if k % group:
        pytest.skip("group does not divide K")
    g = torch.Generator().manual_seed(k + group)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    qw, s = Q.quantize_int4(w, group)
    q = Q.unpack_int4(qw)
    q[0, :20] = -8  # calibrated methods use -8 too: the whole nibble range
    qw = Q.pack_int4(q)
    _close(C.int4_gemv(x, qw, s, group), Q.int4_mm_ref(x, qw, s, group), k)


def test_modules_route_through_the_c_kernels_and_fall_back_without_them(monkeypatch):
    lin = torch.nn.Linear(256, 48, bias=True)
    x = torch.randn(2, 256)
    for method in ("int8", "int4"):
        q = Q.from_linear(lin, method, 64)
        ref = q._mm_ref(x) + q.bias
        calls = []
        real = C.int8_gemv if method == "int8" else C.int4_gemv
        monkeypatch.setattr(C, real.__name__, lambda *a: calls.append(1) or real(*a))
        torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)
        assert calls, method
        monkeypatch.setattr(C, "usable", lambda *a: False)  # no compiler: PyTorch's weight-only ops
        torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)
        monkeypatch.undo()
