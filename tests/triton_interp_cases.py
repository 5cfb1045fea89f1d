"""hybridctl's Triton kernels run by Triton's CPU interpreter (TRITON_INTERPRET=1), against fp64 references.

Not a test_*.py file: the interpreter must be switched on before triton_kernels is imported, so
test_triton_kernels.py runs this file in a subprocess. The interpreter's bf16 is not faithful (tl.dot of bf16
returns garbage, fp32 → bf16 conversion is off by up to 2 ulps: Triton 3.9), so the kernels are checked in
fp16/fp32 here and in bf16 on a GPU (tests/test_gpu.py)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridctl import ref  # noqa: E402
from hybridctl import triton_kernels as tk  # noqa: E402

ULP = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}


def _gemv_inputs(n, k, dtype, bias, res, norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    r = torch.randn(1, n, generator=g).to(dtype) if res else None
    nw = (torch.rand(k, generator=g) + 0.5).to(dtype) if norm else None
    return x, w, b, r, nw


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,config", [(96, 64, None), (100, 300, (4, 128, 4)), (64, 2048, (2, 512, 4)),
                                        (37, 1000, (8, 256, 2)), (130, 129, None)])
@pytest.mark.parametrize("bias,res,norm", [(False, False, False), (True, False, False), (False, True, True),
                                           (True, True, True)])
def test_gemv_matches_fp64(dtype, n, k, config, bias, res, norm):
    x, w, b, r, nw = _gemv_inputs(n, k, dtype, bias, res, norm)
    out = torch.full((1, n), float("nan"), dtype=dtype)
    y = tk.gemv_launch(x, w, b, r, nw, 1e-5, out, config=config).double()
    # fp64 reference (the normalised x exact: the kernel never rounds it), the product rounded to dtype before the
    # residual as in ref.linear and the kernel
    xin = x.double() if nw is None else ref.rmsnorm(x.double(), nw.double(), 1e-5)
    want = torch.nn.functional.linear(xin, w.double(), None if b is None else b.double())
    if r is not None:
        want = want.to(dtype).double() + r.double()
    scale = want.abs().max().item() + 1.0
    err = (y - want).abs().max().item()
    assert err <= 2 * ULP[dtype] * scale, f"max |err| {err:.3g} (scale {scale:.3g}, {dtype}, n={n}, k={k})"
    # and within the error of the library path (ref.linear in dtype) against the same reference
    lib = ref.linear(x, w, b, residual=r, norm_weight=nw, norm_eps=1e-5).double()
    assert err <= max(2 * (lib - want).abs().max().item(), ULP[dtype] * scale), (err, (lib - want).abs().max().item())


@pytest.mark.parametrize("activation", ["gelu", "relu2"])
def test_gemv_activation_prologue(activation):
    x, w, b, r, _ = _gemv_inputs(80, 700, torch.float16, False, True, False)
    out = torch.empty(1, 80, dtype=torch.float16)
    y = tk.gemv_launch(x, w, None, r, None, 1e-5, out, config=(4, 256, 4), activation=activation).double()
    xin = ref.mlp_activation(x, activation).double()  # the activation rounded to fp16, as the kernel does
    want = torch.nn.functional.linear(xin, w.double()).to(torch.float16).double() + r.double()
    err = (y - want).abs().max().item()
    assert err <= 2 * ULP[torch.float16] * (want.abs().max().item() + 1), err


def test_gemv_refuses_a_norm_under_an_activation():
    x, w, _, _, nw = _gemv_inputs(16, 32, torch.float32, False, False, True)
    with pytest.raises(ValueError, match="not both"):
        tk.gemv_launch(x, w, None, None, nw, 1e-5, torch.empty(1, 16), activation="gelu")


def test_gemv_custom_op_and_fake():
    x, w, b, r, nw = _gemv_inputs(48, 96, torch.float16, True, True, True)
    y = torch.ops.hybridctl.gemv(x, w, b, r, nw, 1e-5)
    assert y.shape == (1, 48) and y.dtype == torch.float16
    for args in [(x, w, b, r, nw, 1e-5), (x, w, None, r, None, 0.0, "gelu")]:
        torch.library.opcheck(torch.ops.hybridctl.gemv.default, args, test_utils=("test_schema", "test_faketensor"))


def _attn_inputs(bsz, heads, kv, dh, seqlen, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, dh, generator=g).to(dtype)
    k = torch.randn(bsz, seqlen, kv, dh, generator=g).to(dtype)
    v = torch.randn(bsz, seqlen, kv, dh, generator=g).to(dtype)
    mask = torch.rand(bsz, seqlen, generator=g) < 0.7
    mask[:, 0] = True  # every row sees at least one key (the current token, in a real step)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bsz,heads,kv,dh,seqlen", [(1, 4, 2, 64, 200), (2, 6, 2, 32, 130), (3, 4, 4, 16, 64),
                                                    (1, 8, 1, 128, 1000)])
def test_decode_attention_matches_fp64(dtype, bsz, heads, kv, dh, seqlen):
    q, k, v, mask = _attn_inputs(bsz, heads, kv, dh, seqlen, dtype)
    mask[:, seqlen // 2:] = False  # the unused tail of a preallocated cache: whole blocks and splits skipped
    mask[-1, 1:] = False  # a row that sees only its first key
    splits = tk.decode_attention_splits(bsz, kv, seqlen, 64, tk._sm_count(q.device))
    y = tk.decode_attention(q, k, v, mask).double()
    want = ref.decode_attention(q.double(), k.double(), v.double(), mask)
    err = (y - want).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert err <= tol, f"max |err| {err:.3g} ({dtype}, splits {splits})"
    assert torch.equal(y[-1], v[-1, 0].double().repeat_interleave(heads // kv, 0).to(dtype).double())


def test_decode_attention_splits_cover_the_cache():
    for bsz, kv, seqlen, sms in [(1, 8, 1088, 132), (64, 8, 1088, 132), (1, 8, 16448, 132), (1, 1, 7, 4)]:
        n, length = tk.decode_attention_splits(bsz, kv, seqlen, 64, sms)
        assert length % 64 == 0 and (n - 1) * length < seqlen <= n * length
        assert bsz * kv * n <= max(2 * sms, bsz * kv) + bsz * kv  # about two programs per SM, no more


def test_decode_attention_custom_op_and_fake():
    q, k, v, mask = _attn_inputs(2, 4, 2, 32, 80, torch.float16)
    torch.library.opcheck(torch.ops.hybridctl.decode_attention.default, (q, k, v, mask),
                          test_utils=("test_schema", "test_faketensor"))
