import pytest

from hybridctl.config import (HYBRID_8B_PATTERN, HybridctlError, ModelConfig, PRESETS, allocate_pattern,
                              apply_overrides, mamba_size, parse_pattern, preset)
from hybridctl.model import param_counts


def test_allocation_reproduces_paper_patterns():
    assert allocate_pattern(56, 0.08, 0.5) == HYBRID_8B_PATTERN
    assert allocate_pattern(56, 0.08, 0.5) == "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
    assert allocate_pattern(48, 0.08, 0.5) == "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"


@pytest.mark.parametrize("n,a,m", [(10, 0.0, 0.0), (12, 0.25, 0.0), (20, 0.1, 0.5), (7, 0.0, 0.5), (1, 1.0, 0.0)])
def test_allocation_counts(n, a, m):
    p = allocate_pattern(n, a, m)
    assert len(p) == n and p.count("*") == round(n * a) and p.count("-") == round(n * m)


def test_hybrid_8b_parameter_count_exact():
    cfg = preset("hybrid-8b")
    assert sum(param_counts(cfg).values()) == 8_654_517_248
    assert cfg.layer_counts() == {"mamba": 24, "attention": 4, "mlp": 28}


def test_every_preset_builds_and_tiny_is_about_1m():
    for name in PRESETS:
        cfg = preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert 0.5e6 < sum(param_counts(preset("tiny")).values()) < 1.5e6
    ladder = {n: sum(param_counts(preset(n)).values()) for n in ("hybrid-130m", "hybrid-370m", "hybrid-1.3b",
                                                                   "hybrid-2.7b")}
    assert 100e6 < ladder["hybrid-130m"] < 200e6 and 300e6 < ladder["hybrid-370m"] < 450e6
    assert 1.1e9 < ladder["hybrid-1.3b"] < 1.6e9 and 2.3e9 < ladder["hybrid-2.7b"] < 3.1e9


@pytest.mark.parametrize("pattern,needle", [("MEM", "MoE"), ("M|M", "pipeline"), ("MGM", "DeltaNet"),
                                            ("MXM", "unknown layer symbol 'X'"), ("", "empty")])
def test_bad_patterns(pattern, needle):
    with pytest.raises(HybridctlError, match=needle):
        parse_pattern(pattern)


@pytest.mark.parametrize("changes,field", [
    (dict(mamba=dict(headdim=48)), "mamba.headdim"),
    (dict(mamba=dict(ngroups=3)), "mamba.ngroups"),
    (dict(attention=dict(n_heads=4, n_kv_heads=3)), "attention.n_kv_heads"),
    (dict(attention=dict(n_heads=3, n_kv_heads=1, head_dim=None)), "attention.n_heads"),
    (dict(mlp=dict(activation="tanh")), "mlp.activation"),
    (dict(vocab_size=0), "model.vocab_size"),
    (dict(norm="layernorm"), "model.norm"),
    (dict(mamba=dict(d_stat=4)), "did you mean mamba.d_state"),
])
def test_invalid_configs_name_the_field(changes, field):
    d = preset("tiny").to_dict()
    for k, v in changes.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    with pytest.raises(HybridctlError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(d)


def test_overrides_and_errors():
    d = preset("tiny").to_dict()
    apply_overrides(d, ["mamba.d_state=32", "tie_embeddings=true", "mlp.activation=relu2", "init_std=0.01"])
    cfg = ModelConfig.from_dict(d)
    assert cfg.mamba.d_state == 32 and cfg.tie_embeddings is True and cfg.mlp.activation == "relu2"
    with pytest.raises(HybridctlError, match="did you mean mamba.d_state"):
        apply_overrides(d, ["mamba.dstate=3"])
    with pytest.raises(HybridctlError, match="key=value"):
        apply_overrides(d, ["nonsense"])


def test_unknown_preset_lists_valid():
    with pytest.raises(HybridctlError, match="hybrid-8b"):
        preset("hybrid-9b")


@pytest.mark.parametrize("override,needle", [
    ("tie_embeddings=no", "model.tie_embeddings: expected bool, got 'no'"),
    ("norm_eps=abc", "model.norm_eps: expected float"),
    ("attention.rope_base=abc", "attention.rope_base: expected float"),
    ("mamba.d_state=2.5", "mamba.d_state: expected int"),
    ("mamba.conv_bias=1", "mamba.conv_bias: expected bool"),
])
def test_override_values_are_type_checked(override, needle):
    d = preset("tiny").to_dict()
    apply_overrides(d, [override])
    with pytest.raises(HybridctlError, match=needle.replace(".", r"\.")):
        ModelConfig.from_dict(d)
    d = preset("tiny").to_dict()
    apply_overrides(d, ["mamba.dt_clamp_max=none", "init_std=1", "mamba.dt_clamp_max=2"])
    assert ModelConfig.from_dict(d).mamba.dt_clamp_max == 2


def test_allocation_refuses_rounding_past_the_total():
    with pytest.raises(HybridctlError, match="cannot hold 2 attention \\+ 2 MLP"):
        allocate_pattern(3, 0.5, 0.5)


# ---- Mamba heads are first-class (d_inner = nheads * headdim, not expand * d_model) ------------------------------


def _nemotron_h_4b_like(**mamba):
    # Nemotron-H-4B: hidden 3072, 112 Mamba heads x 64 = 7168 (not 2 * 3072), 8 groups, d_state 128
    return ModelConfig.from_dict(dict(vocab_size=1024, d_model=3072, pattern="M-M*-",
                                      mamba={**dict(headdim=64, ngroups=8, nheads=112), **mamba},
                                      attention=dict(n_heads=32, n_kv_heads=8, head_dim=128),
                                      mlp=dict(hidden_size=12288, activation="relu2")))


def test_nheads_sizes_the_mixer_and_expand_is_derived():
    cfg = _nemotron_h_4b_like()
    assert (cfg.mamba_nheads, cfg.d_inner) == (112, 7168)
    assert cfg.mamba.expand is None  # 7168 / 3072 is no integer
    m = cfg.mamba
    assert cfg.conv_dim == 7168 + 2 * 8 * 128 and cfg.in_proj_dim == 2 * 7168 + 2 * 8 * 128 + 112
    # exact parameter count of one Mamba layer, by hand: in_proj, conv (weight+bias), dt_bias/A_log/D, norm, out_proj
    per_layer = (3072 * cfg.in_proj_dim + cfg.conv_dim * (m.d_conv + 1) + 3 * 112 + 7168 + 7168 * 3072 + 3072)
    assert param_counts(cfg)["mamba"] == 2 * per_layer
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.d_inner == 7168
    # an integral ratio gives expand back; nheads stays the size of record
    cfg2 = ModelConfig.from_dict(dict(d_model=64, pattern="M", mamba=dict(headdim=16, ngroups=2, nheads=12,
                                                                          expand=7)))
    assert (cfg2.d_inner, cfg2.mamba.expand) == (192, 3)


def test_expand_only_configs_keep_working():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.mamba.nheads is None and cfg.d_inner == cfg.mamba.expand * cfg.d_model
    assert preset("hybrid-8b").mamba_nheads == 128


@pytest.mark.parametrize("mamba,needle", [
    (dict(nheads=0), "mamba.nheads: must be a positive integer"),
    (dict(nheads=113), r"mamba.ngroups: nheads \(113\) must be divisible by ngroups \(8\)"),
    (dict(nheads=None, expand=None), "mamba.expand: set mamba.expand or mamba.nheads"),
    (dict(nheads=None, headdim=7000), "mamba.headdim: expand\\*d_model = 6144 is not divisible by headdim 7000"),
    (dict(nheads=2.5), "mamba.nheads: expected int"),
])
def test_bad_mamba_sizes_name_the_field(mamba, needle):
    with pytest.raises(HybridctlError, match=needle):
        _nemotron_h_4b_like(**mamba)


def test_nheads_override_on_a_preset():
    d = preset("tiny").to_dict()
    apply_overrides(d, ["mamba.nheads=6"])
    cfg = ModelConfig.from_dict(d)
    assert (cfg.d_inner, cfg.mamba.expand) == (192, None)


def test_mamba_size_canonical_form():
    assert mamba_size(3072, 112, 64) == {"expand": None, "nheads": 112}
    assert mamba_size(64, 8, 16) == {"expand": 2, "nheads": None}


@pytest.mark.parametrize("to, kw", [("native", {}), ("hf", {}), ("megatron", {}), ("megatron-legacy", {"tp": 2})])
def test_nheads_threads_through_every_writer_and_reader(tmp_path, to, kw):
    """A Nemotron-H-4B-like mixer (d_inner/d_model = 2.33) written by each writer reads back with the same heads and
    tensors (Megatron: args.mamba_num_heads; HF: mamba_num_heads / mamba_head_dim)."""
    import torch
    from conftest import tiny_config

    from hybridctl.checkpoint import open_checkpoint
    from hybridctl.checkpoint.native import save_model
    from hybridctl.convert import convert
    from hybridctl.model import build_model, materialize

    cfg = tiny_config(pattern="M*-", d_model=96, mamba=dict(d_state=8, headdim=16, ngroups=2, nheads=14),
                      attention=dict(n_heads=4, n_kv_heads=2, head_dim=32), mlp=dict(hidden_size=128))
    save_model(materialize(build_model(cfg), "cpu", seed=0), tmp_path / "n", tokenizer=None)
    convert(src=tmp_path / "n", to=to, out=tmp_path / to, progress=False, **kw)
    a, b = open_checkpoint(tmp_path / "n"), open_checkpoint(tmp_path / to)
    assert (b.config.d_inner, b.config.mamba.nheads, b.config.mamba.expand) == (224, 14, None)
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.specs)
