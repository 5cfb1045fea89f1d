import pytest

from hybridctl.config import (HYBRID_8B_PATTERN, HybridctlError, ModelConfig, PRESETS, allocate_pattern,
                              apply_overrides, parse_pattern, preset)
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
