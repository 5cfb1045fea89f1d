"""Hugging Face conversion, with transformers as the oracle: hybridctl → HF → AutoModelForCausalLM gives the same
logits (fp32, 1e-4) and the same greedy continuation; transformers-made models import with the same logits; round
trips are bit-exact tensor by tensor; bad input fails with one clear error and writes nothing."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_config

from hybridctl.checkpoint import load_model, open_checkpoint
from hybridctl.checkpoint.hf import open_hf, plan_hf, write_hf
from hybridctl.checkpoint.io import SafetensorsReader
from hybridctl.checkpoint.keymaps import HF_BACKBONE, HF_MODEL_PREFIX, MAMBA_SSM
from hybridctl.checkpoint.native import save_model
from hybridctl.config import HybridctlError
from hybridctl.model import build_model, materialize
from hybridctl.tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*falling back.*")
transformers.logging.set_verbosity_error()

# Four+ tiny configurations covering: attention first / Mamba last, ngroups > 1, GQA with head_dim != d/heads,
# gelu and relu2, tied and untied embeddings, Mamba biases; sharding is exercised by a small --shard-size.
CONFIGS = {
    "attn-first-gqa-gelu-untied": dict(pattern="*-M-M", vocab_size=300, d_model=64,
                                       mamba=dict(d_state=16, headdim=16, ngroups=2, chunk_size=8),
                                       attention=dict(n_heads=4, n_kv_heads=2, head_dim=24),
                                       mlp=dict(hidden_size=96, activation="gelu")),
    "relu2-tied-ngroups4": dict(pattern="M*-M-", vocab_size=260, d_model=64, tie_embeddings=True,
                                mamba=dict(d_state=8, headdim=8, ngroups=4, chunk_size=16),
                                attention=dict(n_heads=2, n_kv_heads=1, head_dim=40),
                                mlp=dict(hidden_size=80, activation="relu2")),
    "mha-bias-noconvbias": dict(pattern="-M*M", vocab_size=270, d_model=48,
                                mamba=dict(d_state=12, headdim=12, ngroups=2, chunk_size=8, bias=True,
                                           conv_bias=False, d_conv=3),
                                attention=dict(n_heads=3, n_kv_heads=3, head_dim=16),
                                mlp=dict(hidden_size=64, activation="relu2")),
    "pure-mamba-tied": dict(pattern="MMM", vocab_size=280, d_model=64, tie_embeddings=True,
                            mamba=dict(d_state=16, headdim=16, ngroups=2, chunk_size=8)),
}


def _model(name: str, seed: int = 0, **changes):
    cfg = tiny_config(**{**CONFIGS[name], **changes})
    model = materialize(build_model(cfg), "cpu", seed=seed).eval()
    return model


def _save_native(model, path):
    save_model(model, path, tokenizer=ByteTokenizer())
    return path


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _ids(vocab: int, batch: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 256), (batch, t), generator=g)


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference decoding: argmax over the full forward, token by token (no cache)."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    err = (a - b).abs()
    assert err.max().item() <= tol, f"max err {err.max().item():.3g}, mean {err.mean().item():.3g}"


def _used(cfg) -> dict:
    """The config without the sections of layer kinds the pattern lacks (they describe nothing)."""
    d = cfg.to_dict()
    for sym, key in (("M", "mamba"), ("*", "attention"), ("-", "mlp")):
        if sym not in cfg.pattern:
            d.pop(key)
    return d


def _tensors(path) -> dict[str, torch.Tensor]:
    r = SafetensorsReader(path)
    return {k: r.get(k) for k in r.keys()}


# ---- hybridctl → HF → transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_matches_transformers(tmp_path, name):
    model = _model(name, seed=1)
    src = open_checkpoint(_save_native(model, tmp_path / "native"))
    plan = write_hf(tmp_path / "hf", src, max_shard_size="60KB")
    assert plan.arch == ("mamba2" if name.startswith("pure") else "nemotron_h")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() and len(plan.files) > 4
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    if plan.arch == "nemotron_h":
        assert cfg["hybrid_override_pattern"] == model.cfg.pattern and cfg["head_dim"] == model.cfg.head_dim
    hf = _hf(tmp_path / "hf")
    ids = _ids(model.cfg.vocab_size)
    with torch.no_grad():
        _assert_close(model(ids), hf(ids).logits)
    prompt = ids[:1, :8]
    ref = _greedy(model, prompt, 20)
    got = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                      pad_token_id=258)
    assert torch.equal(ref, got), f"greedy continuations differ:\n{ref}\n{got}"
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok("héllo wörld").input_ids == ByteTokenizer().encode("héllo wörld")


def test_dt_clamp_carried_both_ways(tmp_path):
    """NemotronH's time_step_min is a clamp: a clamped hybridctl model exports it, and the clamp matters here."""
    model = _model("attn-first-gqa-gelu-untied", seed=2, mamba=dict(dt_clamp_min=2e-3, dt_min=1e-3,
                                                                    d_state=16, headdim=16, ngroups=2, chunk_size=8))
    unclamped = _model("attn-first-gqa-gelu-untied", seed=2)
    ids = _ids(300)
    with torch.no_grad():
        assert (model(ids) - unclamped(ids)).abs().max() > 1e-4  # the setting is not a no-op for this model
    write_hf(tmp_path / "hf", open_checkpoint(_save_native(model, tmp_path / "n")))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["time_step_min"] == 2e-3
    with torch.no_grad():
        _assert_close(model(ids), _hf(tmp_path / "hf")(ids).logits)
    assert open_hf(tmp_path / "hf").config.mamba.dt_clamp_min == 2e-3


def test_native_hf_native_roundtrip_bit_exact(tmp_path):
    for name in ("relu2-tied-ngroups4", "pure-mamba-tied", "mha-bias-noconvbias"):
        model = _model(name, seed=3)
        a = _save_native(model, tmp_path / name / "a")
        write_hf(tmp_path / name / "hf", open_checkpoint(a), max_shard_size="50KB")
        from hybridctl.convert import convert

        convert(src=tmp_path / name / "hf", to="native", out=tmp_path / name / "b", progress=False)
        sa, sb = open_checkpoint(a), open_checkpoint(tmp_path / name / "b")
        assert _used(sa.config) == _used(sb.config)
        assert sa.specs.keys() == sb.specs.keys()
        for k in sa.specs:
            assert torch.equal(sa.get(k), sb.get(k)) and sa.get(k).dtype == sb.get(k).dtype, k
        assert sb.tokenizer_dir is not None


# ---- transformers → hybridctl -------------------------------------------------------------------------------------


def _nemotron(tmp_path, **kw):
    args = dict(vocab_size=200, hidden_size=64, layers_block_type=["full_attention", "linear_attention", "mlp",
                                                                   "linear_attention"],
                num_attention_heads=4, num_key_value_heads=2, head_dim=20, intermediate_size=72,
                mlp_hidden_act="relu2", mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
                chunk_size=8)
    cfg = transformers.NemotronHConfig(**{**args, **kw})
    torch.manual_seed(5)
    m = transformers.NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers' init leaves norms at 1 and D at 1: perturb so every tensor matters
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(str(tmp_path / "tf"))
    return m, tmp_path / "tf"


def test_transformers_nemotron_imports_with_same_logits(tmp_path):
    m, path = _nemotron(tmp_path)
    model, src = load_model(path)
    assert src.format == "hf-nemotron_h" and model.cfg.pattern == "*M-M" and model.cfg.mamba.dt_clamp_min == 1e-3
    ids = _ids(200)
    with torch.no_grad():
        _assert_close(model(ids), m(ids).logits)


def test_transformers_nemotron_tied_config_is_imported_as_it_runs(tmp_path):
    m, path = _nemotron(tmp_path, tie_word_embeddings=True, mlp_hidden_act="gelu")
    model, src = load_model(path)
    assert not model.cfg.tie_embeddings and any("untied" in n for n in src.info["notes"])
    ids = _ids(200)
    with torch.no_grad():
        _assert_close(model(ids), m(ids).logits)


def test_hf_native_hf_roundtrip_bit_exact(tmp_path):
    _, path = _nemotron(tmp_path)
    from hybridctl.convert import convert

    convert(src=path, to="native", out=tmp_path / "n", progress=False)
    convert(src=tmp_path / "n", to="hf", out=tmp_path / "hf2", shard_size="40KB", progress=False)
    a, b = _tensors(path), _tensors(tmp_path / "hf2")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (path, tmp_path / "hf2"))
    for k in ("layers_block_type", "head_dim", "mamba_num_heads", "n_groups", "time_step_min", "mlp_hidden_act",
              "vocab_size", "tie_word_embeddings", "layer_norm_epsilon"):
        assert ca[k] == cb[k], k


def test_transformers_mamba2_imports_with_same_logits(tmp_path):
    cfg = transformers.Mamba2Config(vocab_size=150, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                                    expand=2, n_groups=2, state_size=8, chunk_size=8, time_step_limit=(0.0, 0.05),
                                    tie_word_embeddings=False)
    torch.manual_seed(6)
    m = transformers.Mamba2ForCausalLM(cfg).eval()
    m.save_pretrained(str(tmp_path / "m2"))
    model, src = load_model(tmp_path / "m2")
    assert src.format == "hf-mamba2" and model.cfg.mamba.dt_clamp_max == 0.05
    ids = _ids(150)
    with torch.no_grad():
        _assert_close(model(ids), m(ids).logits)


# ---- mamba_ssm layout ---------------------------------------------------------------------------------------------


def test_mamba_ssm_dir_imports(tmp_path):
    model = _model("pure-mamba-tied", seed=4, vocab_size=256)
    sd = model.state_dict()
    ssm = {("backbone.embedding.weight" if k == "embed.weight" else "backbone." + k): v for k, v in sd.items()}
    ssm["lm_head.weight"] = ssm["backbone.embedding.weight"]  # MambaLMHeadModel saves the tied head too
    d = tmp_path / "mamba_ssm"
    d.mkdir()
    torch.save(ssm, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({
        "d_model": 64, "d_intermediate": 0, "n_layer": 3, "vocab_size": 250, "pad_vocab_size_multiple": 8,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "tie_embeddings": True}))
    loaded, src = load_model(d)
    assert src.format == "mamba_ssm" and loaded.cfg.vocab_size == 256 and loaded.cfg.tie_embeddings
    ids = _ids(256)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    # and on to HF: Mamba2ForCausalLM runs it the same way
    from hybridctl.convert import convert

    convert(src=d, to="hf", out=tmp_path / "hf", progress=False)
    with torch.no_grad():
        _assert_close(model(ids), _hf(tmp_path / "hf")(ids).logits)


def test_pickle_with_code_is_refused(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"backbone.embedding.weight": torch.zeros(2, 2), "x": HybridctlError("boom")}, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({"d_model": 2, "n_layer": 1, "ssm_cfg": {"layer": "Mamba2"}}))
    with pytest.raises(HybridctlError, match="cannot be read safely"):
        open_checkpoint(d)


# ---- vocab, keymaps -----------------------------------------------------------------------------------------------


def test_vocab_strip_is_explicit_and_exact(tmp_path):
    model = _model("attn-first-gqa-gelu-untied", seed=7)
    src = open_checkpoint(_save_native(model, tmp_path / "n"))
    plan = write_hf(tmp_path / "hf", src, vocab_size=259)
    assert any("300 → 259" in n for n in plan.notes)
    ids = _ids(259)
    with torch.no_grad():
        _assert_close(model(ids)[..., :259], _hf(tmp_path / "hf")(ids).logits)
    with pytest.raises(HybridctlError, match="cannot cut real tokens"):
        plan_hf(src, vocab_size=200)
    with pytest.raises(HybridctlError, match="larger than"):
        plan_hf(src, vocab_size=301)


def test_keymaps_are_invertible():
    names = ["embed.weight", "layers.0.norm.weight", "layers.12.mixer.in_proj.weight", "norm_f.weight",
             "lm_head.weight", "layers.3.mixer.conv1d.bias"]
    for km in (HF_BACKBONE, HF_MODEL_PREFIX, MAMBA_SSM):
        for n in names:
            assert km.to_native(km.to_foreign(n)) == n
    assert HF_BACKBONE.to_foreign("embed.weight") == "backbone.embeddings.weight"
    assert MAMBA_SSM.to_foreign("embed.weight") == "backbone.embedding.weight"
    assert HF_BACKBONE.to_native("backbone.layers.1.mixer.experts.up_proj") == "layers.1.mixer.experts.up_proj"
    assert HF_BACKBONE.to_native("something.else") is None


# ---- refusals: one clear error, nothing written -------------------------------------------------------------------


def _nothing_written(parent, name):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


@pytest.mark.parametrize("changes, arch, match", [
    (dict(attention=dict(n_heads=4, n_kv_heads=2, head_dim=24, position="rope")), "auto", "RoPE"),
    (dict(mlp=dict(hidden_size=96, activation="swiglu")), "nemotron_h", "not gated"),
    ({}, "mamba2", "only Mamba-2 layers"),
    (dict(pattern="MM", mamba=dict(d_state=16, headdim=16, ngroups=2, chunk_size=8, dt_clamp_max=0.5)),
     "nemotron_h", "dt_clamp_max"),
])
def test_unrepresentable_exports_are_refused(tmp_path, changes, arch, match):
    model = _model("attn-first-gqa-gelu-untied", **changes)
    src = open_checkpoint(_save_native(model, tmp_path / "n"))
    with pytest.raises(HybridctlError, match=match):
        write_hf(tmp_path / "hf", src, arch=arch)
    _nothing_written(tmp_path, "hf")


def test_pure_mamba_dt_clamp_max_goes_to_mamba2(tmp_path):
    model = _model("pure-mamba-tied", mamba=dict(d_state=16, headdim=16, ngroups=2, chunk_size=8,
                                                 dt_clamp_max=0.02))
    write_hf(tmp_path / "hf", open_checkpoint(_save_native(model, tmp_path / "n")))
    ids = _ids(280)
    with torch.no_grad():
        _assert_close(model(ids), _hf(tmp_path / "hf")(ids).logits)


def _exported(tmp_path):
    model = _model("attn-first-gqa-gelu-untied")
    write_hf(tmp_path / "hf", open_checkpoint(_save_native(model, tmp_path / "n")), max_shard_size="60KB")
    return tmp_path / "hf"


def _edit_config(path, **changes):
    c = json.loads((path / "config.json").read_text())
    c.update(changes)
    (path / "config.json").write_text(json.dumps(c))


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path):
    from hybridctl.convert import convert

    hf = _exported(tmp_path)
    cases = []
    missing = tmp_path / "missing"
    missing.mkdir()
    for p in hf.iterdir():
        (missing / p.name).write_bytes(p.read_bytes())
    next(missing.glob("model-00002-*")).unlink()
    cases.append((missing, "missing"))
    for name, changes, match in [
        ("llama", dict(model_type="llama"), "model_type 'llama' is not supported"),
        ("moe", dict(layers_block_type=["full_attention", "mlp", "moe", "mlp", "linear_attention"]), "MoE"),
        ("shape", dict(intermediate_size=97), "has shape"),
        ("act", dict(mlp_hidden_act="silu"), "mlp_hidden_act 'silu' is not supported"),
        ("heads", dict(mamba_num_heads=5), r"mamba.ngroups: nheads \(5\) must be divisible by ngroups"),
        ("heads-shape", dict(mamba_num_heads=6), "has shape"),
    ]:
        d = tmp_path / name
        d.mkdir()
        for p in hf.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        _edit_config(d, **changes)
        cases.append((d, match))
    for d, match in cases:
        with pytest.raises(HybridctlError, match=match):
            convert(src=d, to="native", out=tmp_path / "out", progress=False)
        _nothing_written(tmp_path, "out")


# ---- Megatron → HF (the users' first need) ------------------------------------------------------------------------


def test_megatron_to_hf_matches_transformers(tmp_path):
    pytest.importorskip("hybridctl.checkpoint.megatron")
    from hybridctl.convert import convert

    model = _model("attn-first-gqa-gelu-untied", seed=8, vocab_size=259)
    _save_native(model, tmp_path / "n")
    convert(src=tmp_path / "n", to="megatron", out=tmp_path / "mg", progress=False)
    res = convert(src=tmp_path / "mg", to="hf", out=tmp_path / "hf", progress=False)
    assert res.src_format == "megatron-dist" and res.vocab_size == 259
    ids = _ids(259)
    with torch.no_grad():
        _assert_close(model(ids), _hf(tmp_path / "hf")(ids).logits)


def test_megatron_padding_is_stripped_out_loud(tmp_path):
    from hybridctl.checkpoint import Source
    from hybridctl.convert import _auto_vocab

    model = _model("attn-first-gqa-gelu-untied")
    src = open_checkpoint(_save_native(model, tmp_path / "n"))
    fake = Source("megatron-legacy", src.path, src.config, src.specs, src.get, src.tokenizer_dir,
                  {"vocab_size_unpadded": 280})
    notes: list[str] = []
    assert _auto_vocab(fake, "hf", None, notes) == 280 and "300 → 280" in notes[0]
    fake.info.clear()
    assert _auto_vocab(fake, "hf", None, notes) == 259  # the tokenizer's size
    assert _auto_vocab(fake, "hf", 290, notes) == 290  # explicit wins
    assert _auto_vocab(src, "hf", None, notes) is None  # non-Megatron sources are never stripped implicitly


def test_remote_code_style_nemotron_config_reads(tmp_path):
    """Hub NemotronH configs written for the remote-code model: hybrid_override_pattern only, attention_head_dim,
    a JSON Infinity literal."""
    hf = _exported(tmp_path)
    c = json.loads((hf / "config.json").read_text())
    for k in ("layers_block_type", "head_dim", "hybridctl"):
        c.pop(k)
    c["attention_head_dim"] = 24
    (hf / "config.json").write_text(json.dumps(c).replace('{"__float__": "Infinity"}', "Infinity"))
    assert "Infinity]" in (hf / "config.json").read_text()
    src = open_hf(hf)
    assert src.config.pattern == "*-M-M" and src.config.head_dim == 24


def test_write_hf_accepts_the_plan_it_was_given(tmp_path):
    model = _model(next(iter(CONFIGS)), seed=2)
    src = open_checkpoint(_save_native(model, tmp_path / "n"))
    a = write_hf(tmp_path / "a", src, vocab_size=259)
    plan, stripped = plan_hf(src, vocab_size=259)
    b = write_hf(tmp_path / "b", stripped, plan=plan)
    assert b is plan and a.files == b.files and a.config == b.config
    ra, rb = SafetensorsReader(tmp_path / "a"), SafetensorsReader(tmp_path / "b")
    assert ra.keys() == rb.keys() and all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())
    with pytest.raises(HybridctlError, match="pass the source plan_hf returned"):
        write_hf(tmp_path / "c", src, plan=plan)  # the unstripped source does not fit the plan
    assert not (tmp_path / "c").exists()
