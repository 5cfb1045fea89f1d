"""Recipes: TOML loading, --set overrides, error messages, every shipped recipe validates; the LR schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hybridctl.config import HybridctlError, ModelConfig, preset
from hybridctl.recipe import dump_toml, load_recipe, recipe_files, resolve_recipe, tomllib

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_defaults_and_overrides_apply():
    r = resolve_recipe({"optim": {"steps": 5}}, ["optim.lr=3e-4", "data.seq_len=512", "model.config.d_model=256",
                                                  "model.config.mamba.d_state=32", "parallel.compile=true"])
    assert r.optim.lr == 3e-4 and r.data.seq_len == 512 and r.parallel.compile is True
    cfg = r.model_config()
    assert isinstance(cfg, ModelConfig) and cfg.d_model == 256 and cfg.mamba.d_state == 32
    assert cfg.pattern == preset("tiny").pattern  # the default preset fills everything not given


def test_preset_pattern_and_partial_model_config():
    r = resolve_recipe({"model": {"preset": "hybrid-130m", "pattern": "M*-", "config": {"mlp": {"hidden_size": 64}}},
                        "optim": {"steps": 1}})
    cfg = r.model_config()
    assert cfg.pattern == "M*-" and cfg.mlp.hidden_size == 64
    assert cfg.d_model == preset("hybrid-130m").d_model and cfg.mlp.activation == "gelu"


@pytest.mark.parametrize("raw, sets, match", [
    ({"optim": {"lrr": 1e-3}}, [], r"optim\.lrr: unknown key; did you mean optim\.lr\?"),
    ({"optm": {}}, [], r"optm: unknown key; did you mean optim\?"),
    ({}, ["optim.warmup=3"], r"unknown key 'optim\.warmup'; did you mean optim\.warmup_steps\?"),
    ({"model": {"config": {"d_modle": 3}}}, [], r"model\.config\.d_modle: unknown key; did you mean "
                                                r"model\.config\.d_model\?"),
    ({}, ["model.config.mamba.d_stat=3"], r"did you mean model\.config\.mamba\.d_state\?"),
    ({"optim": {"lr": "fast"}}, [], r"optim\.lr: expected float, got str"),
    ({"optim": {"micro_batch": 2.5}}, [], r"optim\.micro_batch: expected int"),
    ({"parallel": {"compile": "yes"}}, [], r"parallel\.compile: expected bool"),
    ({"optim": {"steps": 3, "tokens": 100}}, [], r"exactly one of optim\.steps and optim\.tokens"),
    ({"optim": {"schedule": "linear"}}, [], r"optim\.schedule: must be one of cosine, wsd, constant"),
    ({"optim": {"micro_batch": 3, "global_batch": 8}}, [], r"not a multiple of micro_batch"),
    ({"optim": {"lr": 1e-4, "min_lr": 1e-3}}, [], r"optim\.min_lr"),
    ({"model": {"preset": "hybrid-9b"}}, [], r"preset 'hybrid-9b' is unknown"),
    ({"model": {"config": {"mamba": {"headdim": 7}}}}, [], r"mamba\.headdim"),
    ({"model": {"init_from": "x", "preset": "tiny"}}, [], r"model\.init_from"),
    ({"precision": {"dtype": "fp8"}}, [], r"precision\.dtype"),
])
def test_errors_are_one_clear_line(raw, sets, match):
    with pytest.raises(HybridctlError, match=match) as e:
        resolve_recipe(raw, sets)
    assert "\n" not in str(e.value)


def test_token_budget_gives_steps_and_accumulation():
    r = resolve_recipe({"optim": {"tokens": 10_000, "micro_batch": 2, "global_batch": 8}, "data": {"seq_len": 128}})
    assert r.optim.steps is None and r.total_steps == math.ceil(10_000 / (8 * 128))
    assert r.grad_accum(1) == 4 and r.grad_accum(2) == 2 and r.grad_accum(4) == 1
    with pytest.raises(HybridctlError, match="multiple of micro_batch"):
        r.grad_accum(3)


def test_resolved_recipe_round_trips_through_toml(tmp_path):
    r = resolve_recipe({"name": "x", "optim": {"steps": 7}, "data": {"source": ["a.txt", "b/*.jsonl"]}},
                       ["model.config.tie_embeddings=true"])
    text = dump_toml(r.to_dict())
    (tmp_path / "r.toml").write_text(text)
    again = load_recipe(tmp_path / "r.toml")
    assert again == r


def test_bad_toml_and_missing_file(tmp_path):
    (tmp_path / "bad.toml").write_text("[optim\nsteps = 3")
    with pytest.raises(HybridctlError, match="invalid TOML"):
        load_recipe(tmp_path / "bad.toml")
    with pytest.raises(HybridctlError, match="no such recipe"):
        load_recipe(tmp_path / "nope.toml")


def test_shipped_recipes_all_load_and_validate():
    files = recipe_files(RECIPES)
    names = {p.stem for p in files}
    assert {"tiny", "phonebook", "hybrid-8b", "mamba2-8b", "transformer-8b", "hybrid-370m", "hybrid-1.3b"} <= names
    for p in files:
        r = load_recipe(p)
        cfg = r.model_config()
        assert cfg is not None, p
        assert r.total_steps >= 1
        assert r.checkpoint.dir.startswith("runs/"), p
        with open(p, "rb") as f:
            assert "name" in tomllib.load(f), p


def test_paper_recipes_match_the_paper():
    """arXiv 2406.07887: 8B models, seq 4096, global batch 1024 sequences, 3.5T tokens (the hybrid), bf16."""
    h = load_recipe(RECIPES / "hybrid-8b.toml")
    cfg = h.model_config()
    assert cfg.pattern == preset("hybrid-8b").pattern and cfg.vocab_size == 256000
    assert h.data.seq_len == 4096 and h.optim.global_batch == 1024 and h.optim.tokens == 3_500_000_000_000
    assert h.precision.dtype == "bfloat16" and h.optim.weight_decay == 0.1 and h.optim.grad_clip == 1.0
    assert (h.optim.beta1, h.optim.beta2) == (0.9, 0.95) and h.optim.schedule == "cosine"
    assert h.total_steps == math.ceil(3.5e12 / (1024 * 4096))
    for name in ("mamba2-8b", "transformer-8b"):
        r = load_recipe(RECIPES / f"{name}.toml")
        assert r.model_config().pattern == preset(name).pattern
        assert r.data.seq_len == 4096 and r.optim.global_batch == 1024


def test_tiny_recipe_is_cpu_sized():
    r = load_recipe(RECIPES / "tiny.toml")
    assert r.data.source == "builtin" and r.model_config().vocab_size >= 259
    assert r.total_steps * r.optim.global_batch * r.data.seq_len <= 2_000_000  # a few minutes on 2 cores
