"""HybridLM: full forward vs token-by-token decode, packing isolation, init, counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from hybridctl.config import preset
from hybridctl.model import (build_model, flops_per_token, materialize, memory_per_sequence, no_weight_decay,
                             param_counts)

PATTERNS = ["M*-", "*M-M", "-*M*M", "MMM", "*-*-"]


def make(cfg, seed=1, dtype=torch.float32):
    return materialize(build_model(cfg, dtype=dtype), "cpu", seed=seed).eval()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("variant", [{}, {"tie_embeddings": True, "mlp": {"activation": "relu2"}},
                                     {"mlp": {"activation": "swiglu"},
                                      "attention": {"position": "rope", "rotary_fraction": 0.5}}])
def test_full_forward_equals_token_by_token_decode(pattern, variant):
    cfg = tiny_config(pattern=pattern, **variant)
    model = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 45))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 64)
        steps = [model(ids[:, :1], cache=cache)]  # a one-token prefill, then pure decode
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(1, 45)]
    err = (full - torch.cat(steps, 1)).abs().max().item()
    assert err <= 1e-4, f"{pattern} {variant}: max |full - decode| = {err:.2e}"


def test_chunked_prefill_continues_from_cache():
    cfg = tiny_config(pattern="M*-M")
    model = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 70))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 80)
        parts = [model(ids[:, :33], cache=cache), model(ids[:, 33:50], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(50, 70)]
    assert (full - torch.cat(parts, 1)).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_single_prompts():
    cfg = tiny_config(pattern="*M-M")
    model = make(cfg)
    lens = [13, 5, 2]
    prompts = [torch.randint(0, 256, (n,)) for n in lens]
    tmax = max(lens)
    ids = torch.full((3, tmax), 258)
    seq_idx = torch.zeros(3, tmax, dtype=torch.int32)
    for i, p in enumerate(prompts):
        ids[i, tmax - len(p):] = p
        seq_idx[i, tmax - len(p):] = 1
    nxt = torch.randint(0, 256, (3, 6))
    with torch.no_grad():
        cache = model.allocate_cache(3, 32)
        out = [model(ids, seq_idx=seq_idx, cache=cache)[:, -1]]
        out += [model(nxt[:, t:t + 1], cache=cache)[:, -1] for t in range(6)]
        batched = torch.stack(out, 1)
        for i, p in enumerate(prompts):
            full = model(torch.cat([p, nxt[i]])[None])[0, len(p) - 1:]
            err = (batched[i] - full).abs().max().item()
            assert err <= 1e-4, f"prompt {i} (len {len(p)}): {err:.2e}"


def test_packed_documents_are_isolated_in_forward():
    cfg = tiny_config(pattern="M*-M")
    model = make(cfg)
    a, b = torch.randint(0, 256, (1, 21)), torch.randint(0, 256, (1, 30))
    packed = torch.cat([a, b], 1)
    seq_idx = torch.tensor([[0] * 21 + [1] * 30], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, seq_idx=seq_idx)
        assert (out[:, :21] - model(a)).abs().max() < 1e-5
        assert (out[:, 21:] - model(b)).abs().max() < 1e-5


def test_initialisation_follows_mamba_ssm():
    cfg = tiny_config(pattern="MM-*")
    model = make(cfg, seed=3)
    m = cfg.mamba
    mixer = model.layers[0].mixer
    A = torch.exp(mixer.A_log)
    assert A.min() >= m.A_init_min - 1e-5 and A.max() <= m.A_init_max + 1e-5
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= m.dt_min * (1 - 1e-4) and dt.max() <= m.dt_max * (1 + 1e-4)
    assert torch.all(mixer.D == 1) and torch.all(mixer.norm.weight == 1)
    std = mixer.in_proj.weight.std().item()
    out_std = mixer.out_proj.weight.std().item()
    assert abs(std - cfg.init_std) < 0.002 and abs(out_std - cfg.init_std / math.sqrt(2 * cfg.n_layers)) < 0.001
    # same seed → same weights; different seed → different
    again, other = make(cfg, seed=3), make(cfg, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model.embed.weight, other.embed.weight)


def test_no_weight_decay_marks_exactly_the_1d_parameters():
    model = make(tiny_config())
    names = {n for n, p in model.named_parameters() if no_weight_decay(n, p)}
    assert any(n.endswith("A_log") for n in names) and any(n.endswith("dt_bias") for n in names)
    assert any(n.endswith(".D") for n in names) and "norm_f.weight" in names
    assert any(n.endswith("conv1d.bias") for n in names)
    assert not any(n.endswith(("in_proj.weight", "q_proj.weight", "up_proj.weight", "conv1d.weight")) for n in names)


def test_param_counts_match_real_parameters():
    for cfg in (tiny_config(), tiny_config(tie_embeddings=True, pattern="*-M")):
        model = make(cfg)
        assert sum(param_counts(cfg).values()) == sum(p.numel() for p in model.parameters())


def test_meta_build_of_8b_allocates_nothing():
    model = build_model(preset("hybrid-8b"))
    assert all(p.is_meta for p in model.parameters())


def test_flops_and_memory_figures():
    cfg = preset("hybrid-8b")
    f = flops_per_token(cfg, 4096)
    n = sum(param_counts(cfg).values()) - cfg.vocab_size * cfg.d_model  # embedding lookup is not a matmul
    assert 2 * n * 0.99 < f["matmul"] < 2 * n * 1.01
    assert f["training"] == 3 * f["forward"] and f["attention"] > 0
    mem = memory_per_sequence(cfg, dtype_bytes=2)
    assert mem["kv_bytes_per_token"] == 4 * 2 * 8 * 128 * 2
    assert mem["ssm_state_bytes"] == 24 * 128 * 64 * 128 * 4


def test_state_dtype_bf16_cache():
    cfg = tiny_config(pattern="M-")
    model = make(cfg)
    cache = model.allocate_cache(1, 8, state_dtype=torch.bfloat16)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 5)), cache=cache)
        model(torch.randint(0, 256, (1, 1)), cache=cache)
    assert cache.layers[0].ssm.dtype == torch.bfloat16 and cache.offset == 6
