"""The pure-PyTorch ops against independent fp64 references (these are also the oracle for the kernels)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridctl import ref

f64 = torch.float64


def naive_ssm(x, dt, A, B, C, D, init=None, seq_idx=None):
    """Token-by-token fp64 recurrence, written independently of ref.py. dt already processed."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    s = torch.zeros(b, h, p, n, dtype=f64) if init is None else init.clone().to(f64)
    ys = torch.zeros(b, t, h, p, dtype=f64)
    for i in range(t):
        for bi in range(b):
            if i > 0 and seq_idx is not None and seq_idx[bi, i] != seq_idx[bi, i - 1]:
                s[bi] = 0
            for hi in range(h):
                gi = hi // rep
                s[bi, hi] = math.exp(dt[bi, i, hi] * A[hi]) * s[bi, hi] + dt[bi, i, hi] * torch.outer(
                    x[bi, i, hi], B[bi, i, gi])
                ys[bi, i, hi] = s[bi, hi] @ C[bi, i, gi] + D[hi] * x[bi, i, hi]
    return ys, s


def rand_inputs(b=2, t=37, h=4, p=8, g=2, n=16, dtype=f64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x, dt_raw, B, C = r(b, t, h, p), r(b, t, h), r(b, t, g, n), r(b, t, g, n)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 4 - 0.1
    D, dt_bias = r(h), r(h)
    return x, dt_raw, A, B, C, D, dt_bias


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("t", [1, 37, 64])
def test_chunked_scan_matches_fp64_recurrence(chunk, t):
    x, dt_raw, A, B, C, D, dt_bias = rand_inputs(t=t)
    init = torch.randn(2, 4, 8, 16, dtype=f64)
    dt = F.softplus(dt_raw + dt_bias)
    y_ref, s_ref = naive_ssm(x, dt, A, B, C, D, init)
    y, s = ref.ssd_scan(x, dt_raw, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, initial_state=init)
    err = (y - y_ref).abs().max().item()
    assert err < 1e-10, f"max abs error {err:.3e} (chunk {chunk}, len {t})"
    assert (s - s_ref).abs().max().item() < 1e-10


def test_chunked_scan_fp32_error_vs_fp64():
    x, dt_raw, A, B, C, D, dt_bias = rand_inputs(t=200, h=8, g=4, n=32)
    y64, s64 = ref.ssd_scan(x, dt_raw, A, B, C, 32, D=D, dt_bias=dt_bias, dt_softplus=True)
    f = lambda v: v.float()  # noqa: E731
    y32, s32 = ref.ssd_scan(f(x), f(dt_raw), f(A), f(B), f(C), 32, D=f(D), dt_bias=f(dt_bias), dt_softplus=True)
    rel = ((y32.double() - y64).norm() / y64.norm()).item()
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    assert rel < 5e-6, f"fp32 relative error {rel:.2e} (max abs {(y32.double() - y64).abs().max():.2e})"


@pytest.mark.parametrize("form", [ref.ssm_step, ref.ssm_step_pointwise])
def test_ssm_step_matches_fp64_recurrence(form):
    """Both forms of the recurrent step (the eager in-place one, the broadcast one torch.compile fuses) against the
    independent recurrence, three steps in a row, with the dt clamp."""
    x, dt_raw, A, B, C, D, dt_bias = rand_inputs(t=3, h=6, p=8, g=3, n=16)
    init = torch.randn(2, 6, 8, 16, dtype=f64)
    dt = F.softplus(dt_raw + dt_bias).clamp(min=0.05)
    y_ref, s_ref = naive_ssm(x, dt, A, B, C, D, init)
    state = init.clone()
    ys = [form(state, x[:, i], dt_raw[:, i], A, B[:, i], C[:, i], D=D, dt_bias=dt_bias, dt_softplus=True,
               dt_limit=(0.05, math.inf)) for i in range(3)]
    assert (torch.stack(ys, 1) - y_ref).abs().max().item() < 1e-12
    assert (state - s_ref).abs().max().item() < 1e-12


def test_ssm_step_forms_agree_with_a_bf16_state():
    """With a bf16 state both forms compute in fp32 and round the state once: the same result."""
    x, dt_raw, A, B, C, D, dt_bias = (v.float() for v in rand_inputs(t=1, h=8, p=16, g=2, n=32))
    s0 = torch.randn(2, 8, 16, 32).bfloat16()
    outs = []
    for form in (ref.ssm_step, ref.ssm_step_pointwise):
        s = s0.clone()
        y = form(s, x[:, 0].bfloat16(), dt_raw[:, 0], A, B[:, 0], C[:, 0], D=D, dt_bias=dt_bias, dt_softplus=True)
        outs.append((y.float(), s.float()))
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=0, rtol=2 ** -7)  # at most one bf16 ulp apart
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=0, rtol=2 ** -7)
    assert not torch.equal(outs[0][1], s0.float())  # the state was updated


@pytest.mark.parametrize("chunk", [4, 16])
def test_seq_idx_resets_state_at_document_boundaries(chunk):
    x, dt_raw, A, B, C, D, dt_bias = rand_inputs(t=40)
    seq_idx = torch.tensor([[0] * 9 + [1] * 20 + [2] * 11, [0] * 3 + [1] * 37], dtype=torch.int32)
    init = torch.randn(2, 4, 8, 16, dtype=f64)
    dt = F.softplus(dt_raw + dt_bias)
    y_ref, s_ref = naive_ssm(x, dt, A, B, C, D, init, seq_idx)
    y, s = ref.ssd_scan(x, dt_raw, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, initial_state=init,
                        seq_idx=seq_idx)
    assert (y - y_ref).abs().max().item() < 1e-10
    assert (s - s_ref).abs().max().item() < 1e-10
    # each document alone (fresh state) gives the same outputs as inside the packed row
    for lo, hi in ((9, 29), (29, 40)):
        yd, _ = ref.ssd_scan(x[:1, lo:hi], dt_raw[:1, lo:hi], A, B[:1, lo:hi], C[:1, lo:hi], chunk, D=D,
                             dt_bias=dt_bias, dt_softplus=True)
        assert (yd - y[:1, lo:hi]).abs().max().item() < 1e-10


def test_dt_limit_clamps():
    x, dt_raw, A, B, C, D, dt_bias = rand_inputs(t=20)
    dt = F.softplus(dt_raw + dt_bias).clamp(0.5, 1.0)
    y_ref, _ = naive_ssm(x, dt, A, B, C, D)
    y, _ = ref.ssd_scan(x, dt_raw, A, B, C, 8, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.5, 1.0))
    assert (y - y_ref).abs().max().item() < 1e-10


def test_causal_conv1d_against_torch_conv_and_step():
    b, t, ch, k = 2, 23, 12, 4
    x, w, bias = torch.randn(b, t, ch, dtype=f64), torch.randn(ch, k, dtype=f64), torch.randn(ch, dtype=f64)
    expect = F.silu(F.conv1d(x.transpose(1, 2), w[:, None], bias, padding=k - 1, groups=ch)[..., :t]).transpose(1, 2)
    got = ref.causal_conv1d(x, w, bias)
    assert (got - expect).abs().max().item() < 1e-12
    state = torch.zeros(b, ch, k, dtype=f64)
    steps = torch.stack([ref.conv_step(state, x[:, i], w, bias) for i in range(t)], dim=1)
    assert (steps - expect).abs().max().item() < 1e-12
    # continuing from a state equals running over the concatenation
    first = ref.causal_conv1d(x[:, :10], w, bias)
    st = F.pad(x[:, :10].transpose(1, 2), (k, 0))[..., -k:]
    rest = ref.causal_conv1d(x[:, 10:], w, bias, initial_state=st)
    assert (torch.cat([first, rest], 1) - expect).abs().max().item() < 1e-12


def test_causal_conv1d_seq_idx_isolates_documents():
    b, t, ch, k = 1, 15, 6, 4
    x, w, bias = torch.randn(b, t, ch, dtype=f64), torch.randn(ch, k, dtype=f64), torch.randn(ch, dtype=f64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 2 + [2] * 8], dtype=torch.int32)
    got = ref.causal_conv1d(x, w, bias, seq_idx=seq_idx)
    for lo, hi in ((0, 5), (5, 7), (7, 15)):
        assert (got[:, lo:hi] - ref.causal_conv1d(x[:, lo:hi], w, bias)).abs().max().item() < 1e-12


def test_gated_rmsnorm_normalises_after_gating_per_group():
    x, z, w = torch.randn(3, 5, 16, dtype=f64), torch.randn(3, 5, 16, dtype=f64), torch.randn(16, dtype=f64)
    y = x * z * torch.sigmoid(z)
    g = y.view(3, 5, 4, 4)
    expect = (g / g.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 5, 16) * w
    assert (ref.rmsnorm_gated(x, z, w, 1e-5, 4) - expect).abs().max().item() < 1e-12
    ungrouped = ref.rmsnorm_gated(x, z, w, 1e-5, 16)
    assert (ungrouped - expect).abs().max().item() > 1e-3  # grouping matters


def naive_attention(q, k, v, mask):
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def test_attention_gqa_causal_documents_and_offset():
    b, t, a, g, d = 2, 11, 6, 2, 8
    q, k, v = torch.randn(b, t, a, d, dtype=f64), torch.randn(b, t, g, d, dtype=f64), torch.randn(b, t, g, d, dtype=f64)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    assert (ref.attention(q, k, v) - naive_attention(q, k, v, causal)).abs().max() < 1e-12
    seq_idx = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    docs = causal & (seq_idx[:, :, None] == seq_idx[:, None, :])
    got = ref.attention(q, k, v, seq_idx=seq_idx)
    assert (got - naive_attention(q, k, v, docs[:, None])).abs().max() < 1e-12
    # the last 3 queries against all keys (decode with a cache), with one invalid key slot
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 0] = False
    got = ref.attention(q[:, -3:], k, v, offset=t - 3, key_valid=valid)
    m = causal[-3:][None, None] & valid[:, None, None, :]
    assert (got - naive_attention(q[:, -3:], k, v, m)).abs().max() < 1e-12


def test_causal_conv1d_seq_idx_compiles_without_graph_break():
    """The document conv has static shapes and no host sync: it traces as one graph (a data-dependent nonzero made
    every packed Mamba block break and recompile per batch), and equals the eager result, with an initial state."""
    g = torch.Generator().manual_seed(3)
    x, w, bias = (torch.randn(2, 12, 5, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g))
    init = torch.randn(2, 5, 4, generator=g)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 2 + [1] * 3 + [2] * 7], dtype=torch.int32)
    compiled = torch.compile(ref.causal_conv1d, fullgraph=True, backend="eager")
    got = compiled(x, w, bias, initial_state=init, seq_idx=seq_idx)
    assert torch.allclose(got, ref.causal_conv1d(x, w, bias, initial_state=init, seq_idx=seq_idx), atol=1e-6)
    # the first document keeps the initial state's taps; a later one never sees them
    assert not torch.allclose(got[:, :1], ref.causal_conv1d(x, w, bias, seq_idx=seq_idx)[:, :1])
    assert torch.allclose(got[0, 5:], ref.causal_conv1d(x[:1, 5:], w, bias)[0], atol=1e-6)


def test_document_conv_eager_cpu_path_equals_the_masked_taps_values_and_gradients():
    """Eager CPU code takes the dense conv with the windows across a document start recomputed (4× cheaper there);
    CUDA / compiled code the masked taps. Both are exact: equal values and gradients (x, weight, initial state), with
    documents shorter than the kernel, a row that is one document and a row starting a new document at t=1."""
    g = torch.Generator().manual_seed(5)
    b, t, ch, k = 4, 13, 6, 4
    seq_idx = torch.tensor([[0] * 13, [0] + [1] * 2 + [2] + [3] * 9, [0] * 6 + [1] * 7, [0] * 3 + [1] + [2] * 9],
                           dtype=torch.int32)

    def run(masked: bool):
        x = torch.randn(b, t, ch, dtype=f64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = torch.randn(ch, k, dtype=f64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        init = torch.randn(b, ch, k, dtype=f64, generator=torch.Generator().manual_seed(3)).requires_grad_()
        if masked:
            xp = torch.cat([init[:, :, 1:].transpose(1, 2), x], dim=1)
            out = ref._document_conv(xp, w, seq_idx)
        else:
            out = ref.causal_conv1d(x, w, None, initial_state=init, seq_idx=seq_idx, activation=None)
        (out * torch.randn(out.shape, dtype=f64, generator=g.manual_seed(9))).sum().backward()
        return out.detach(), x.grad, w.grad, init.grad

    for a, c in zip(run(False), run(True)):
        assert (a - c).abs().max().item() < 1e-12
    # a document that starts inside the row never sees another document's inputs
    x = torch.randn(b, t, ch, dtype=f64, generator=g)
    got = ref.causal_conv1d(x, torch.ones(ch, k, dtype=f64), None, seq_idx=seq_idx, activation=None)
    assert (got[1, 3] - x[1, 3]).abs().max().item() < 1e-12  # a one-token document: only its own tap
