"""Quantized linears: packing, kernels vs twins vs fp64 dequantized math, module contract (state dict, meta, decode)."""

import copy

import pytest
import torch
import torch.nn as nn

from hybridctl import qlinear as Q
from hybridctl.config import HybridctlError


def _fp64_int8(x, qw, s):
    return x.double() @ (qw.double() * s.double()[:, None]).T


def _fp64_int4(x, qw, s, g):
    return x.double() @ (Q.unpack_int4(qw).double() * s.double().repeat_interleave(g, 1)).T


def test_pack_unpack_int4_round_trips_every_value():
    q = torch.randint(-8, 8, (32, 64), dtype=torch.int8)
    p = Q.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (32, 32)
    assert torch.equal(Q.unpack_int4(p), q)
    assert int(p[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)  # the documented nibble order


def test_rtn_error_is_at_most_half_a_step():
    w = torch.randn(48, 256)
    qw, s = Q.quantize_int8(w)
    assert (Q.dequantize_int8(qw, s) - w).abs().le(s[:, None] / 2 + 1e-6).all()
    assert qw.abs().max() == 127
    p, s4 = Q.quantize_int4(w, 64)
    step = s4.repeat_interleave(64, 1)
    assert (Q.dequantize_int4(p, s4, 64) - w).abs().le(step / 2 + 1e-6).all()
    assert Q.unpack_int4(p).abs().max() == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
def test_int8_kernel_matches_twin_and_fp64(dtype, m):
    w, x = torch.randn(96, 256), torch.randn(m, 256)
    qw, s = Q.quantize_int8(w)
    s = s.to(dtype)
    want = _fp64_int8(x.to(dtype), qw, s)
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    for got in (Q.int8_mm(x.to(dtype), qw, s), Q.int8_mm_ref(x.to(dtype), qw, s)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3])
def test_int4_kernel_matches_twin_and_fp64(dtype, g, m):
    w, x = torch.randn(64, 256), torch.randn(m, 256)
    qw, s = Q.quantize_int4(w, g)
    s = s.to(dtype)
    want = _fp64_int4(x.to(dtype), qw, s, g)
    packed, sz = Q.int4_cpu_operands(qw, s, dtype)
    tol = dict(atol=2e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    for got in (Q.int4_mm(x.to(dtype), packed, sz, g), Q.int4_mm_ref(x.to(dtype), qw, s, g)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("out_features", [64, 40])  # 40: not a multiple of 16, int4 falls back to the twin
def test_module_kernel_path_equals_twin_path_any_leading_shape(method, out_features):
    lin = nn.Linear(128, out_features, bias=True)
    m = Q.from_linear(lin, method, 32)
    assert type(m) is not nn.Linear and not hasattr(m, "weight")
    x = torch.randn(2, 7, 128)  # 14 rows: the kernel path (<= KERNEL_MAX_ROWS)
    assert x.shape[0] * x.shape[1] <= Q.KERNEL_MAX_ROWS
    y = m(x)
    m.use_kernel = False
    torch.testing.assert_close(y, m(x), atol=1e-4, rtol=1e-4)
    assert y.shape == (2, 7, out_features)
    dense = torch.nn.functional.linear(x.double(), m.dequantized_weight(torch.float64), lin.bias.double())
    torch.testing.assert_close(y.double(), dense, atol=1e-4, rtol=1e-4)
    err = (m.dequantized_weight() - lin.weight).abs().max()
    assert 0 < err < (0.01 if method == "int8" else 0.05) * lin.weight.abs().max() * 10


def test_state_dict_meta_construction_and_deepcopy_share():
    m = Q.from_linear(nn.Linear(64, 32), "int4", 32)
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "bias"} and sd["qweight"].dtype == torch.uint8
    meta = Q.empty_like_linear(nn.Linear(64, 32, device="meta"), "int4", 32)
    meta = meta.to_empty(device="cpu")
    meta.load_state_dict(sd, assign=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(meta(x), m(x))
    memo = {id(t): t for t in m.buffers()}
    twin = copy.deepcopy(m, memo)
    assert twin.qweight.data_ptr() == m.qweight.data_ptr()


def test_int4_kernel_cache_follows_weight_updates():
    lin = nn.Linear(64, 32)
    m = Q.from_linear(lin, "int4", 32)
    x = torch.randn(1, 64)
    y0 = m(x)
    m.set_quantized(*Q.quantize_int4(-lin.weight.detach(), 32))
    torch.testing.assert_close(m(x) - m.bias, -(y0 - m.bias), atol=1e-4, rtol=1e-4)


def test_apply_quantization_swaps_named_linears_and_rejects_bad_sections():
    from hybridctl.model import build_model
    from tests.conftest import tiny_config

    model = build_model(tiny_config())
    Q.apply_quantization(model, {"method": "int8", "group_size": None, "modules": ["layers.0.mixer.in_proj"]})
    assert isinstance(model.layers[0].mixer.in_proj, Q.Int8WeightOnlyLinear)
    assert model.layers[0].mixer.in_proj.qweight.is_meta
    bad = [({"method": "fp3", "modules": []}, "unknown method"),
           ({"method": "int4", "group_size": 48, "modules": []}, "group_size"),
           ({"method": "int8", "modules": ["layers.0.nope"]}, "no module"),
           ({"method": "int8", "modules": ["layers.0.norm"]}, "not a linear"),
           ({"method": "int8", "modules": "all"}, "list of module names")]
    for section, msg in bad:
        with pytest.raises(HybridctlError, match=msg):
            Q.apply_quantization(build_model(tiny_config()), section)
    with pytest.raises(HybridctlError, match="does not divide its input width 96"):
        Q.quantize_int4(torch.randn(8, 96), 64)
