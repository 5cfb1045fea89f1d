"""transformers as the producer: fixtures written by transformers' own NemotronH / Mamba2 classes, shaped like the real
released checkpoints (shared/docs/FORMATS.md §1b, tiny widths with the same ratios and quirks), read by hybridctl and
written back for transformers to load.

Every fixture: every parameter randomised (norms around 1, A_log = log U[1, 16], D, dt_bias), a seed chosen so that
transformers' greedy continuation has top-1/top-2 margins >= 1e-3, a tokenizers BPE saved with the transformers
tokenizer. Checked: our import gives transformers' greedy ids and logits (<= 1e-4, fp32); our export (native → hf)
loads with AutoModelForCausalLM + AutoTokenizer and gives the same; ``convert --dry-run`` writes nothing.
mamba_ssm / causal_conv1d are blocked in this process so transformers runs its torch paths.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from typer.testing import CliRunner

from hybridctl.checkpoint import load_model
from hybridctl.cli import app
from hybridctl.config import HybridctlError
from hybridctl.convert import convert

try:
    import transformers  # a dev dependency: the producer of these fixtures
except ImportError:  # in CI a missing producer fails the run instead of skipping it
    if __import__("os").environ.get("CI") == "true":
        raise
    transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 3, 99, 7, 64, 12]
NEW = 4
MARGIN = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _block_cuda_kernels():
    """transformers would take mamba_ssm / causal_conv1d kernels when importable; these tests pin its torch path."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("mamba_ssm", "causal_conv1d"):
            if name in sys.modules or importlib.util.find_spec(name) is not None:
                mp.setitem(sys.modules, name, None)
        yield


# --------------------------------------------------------------------------------------------------------------------
# Fixtures built by transformers
# --------------------------------------------------------------------------------------------------------------------

_NEMOTRON_BASE = dict(vocab_size=320, ssm_state_size=16, conv_kernel=4, chunk_size=8, use_conv_bias=True,
                      use_bias=False, mamba_hidden_act="silu", layer_norm_epsilon=1e-5, attention_bias=False,
                      mlp_bias=False, num_nextn_predict_layers=0)

# name → (transformers class, config kwargs); widths tiny, ratios and quirks those of the released models (§1b)
CASES = {
    # Nemotron-H-4B: d_inner/h = 7168/3072 = 2.33, q width 4096 != h, GQA 4:1, relu2, untied, sharded
    "nemotron-h-4b": ("nemotron_h", dict(_NEMOTRON_BASE, hidden_size=96, mamba_num_heads=14, mamba_head_dim=16,
                                         n_groups=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                         intermediate_size=384, mlp_hidden_act="relu2", tie_word_embeddings=False,
                                         hybrid_override_pattern="M-M*-M-"), "60KB"),
    # Nano-9B-v2: 10240/4480 = 2.29, head_dim 128 with 40 heads (h/heads not an integer here), 8 groups, tied
    "nano-9b-v2": ("nemotron_h", dict(_NEMOTRON_BASE, hidden_size=112, mamba_num_heads=16, mamba_head_dim=16,
                                      n_groups=8, num_attention_heads=5, num_key_value_heads=1, head_dim=32,
                                      intermediate_size=392, mlp_hidden_act="relu2", tie_word_embeddings=True,
                                      hybrid_override_pattern="M-M-*M-"), "5GB"),
    # Nemotron-3-Nano-4B: 7680/3136 = 2.45, head dim 80-like (20), 4 groups, MHA, gelu, untied
    "nemotron-3-nano-4b": ("nemotron_h", dict(_NEMOTRON_BASE, hidden_size=98, mamba_num_heads=12, mamba_head_dim=20,
                                              n_groups=4, num_attention_heads=2, num_key_value_heads=2, head_dim=48,
                                              intermediate_size=392, mlp_hidden_act="gelu",
                                              tie_word_embeddings=False, hybrid_override_pattern="M*M-M-"), "80KB"),
    # Nemotron-H-8B/47B/56B and Nano-12B-v2: d_inner = 2h, 8 groups, MQA; the legacy `attention_head_dim` key only
    "nemotron-h-8b-legacy-key": ("nemotron_h", dict(_NEMOTRON_BASE, hidden_size=64, mamba_num_heads=8,
                                                    mamba_head_dim=16, n_groups=8, num_attention_heads=2,
                                                    num_key_value_heads=1, head_dim=128, intermediate_size=256,
                                                    mlp_hidden_act="relu2", tie_word_embeddings=False,
                                                    hybrid_override_pattern="M-*-M-"), "5GB"),
    # Mamba-Codestral-7B: pure Mamba2ForCausalLM, 8 groups, chunk 256, residual_in_fp32, norm_before_gate (ignored)
    "mamba-codestral": ("mamba2", dict(vocab_size=320, hidden_size=64, num_heads=8, head_dim=16, expand=2, n_groups=8,
                                       state_size=16, num_hidden_layers=3, conv_kernel=4, chunk_size=256,
                                       use_bias=False, use_conv_bias=True, residual_in_fp32=True,
                                       norm_before_gate=True, tie_word_embeddings=False), "100KB"),
    # a tied Mamba2 (one group, as state-spaces' models)
    "mamba2-tied": ("mamba2", dict(vocab_size=320, hidden_size=48, num_heads=6, head_dim=16, expand=2, n_groups=1,
                                   state_size=16, num_hidden_layers=2, conv_kernel=4, chunk_size=16,
                                   tie_word_embeddings=True), "5GB"),
}


def _randomise(model: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=g)))
            elif leaf == "dt_bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 - 1.0)
            elif leaf == "D":
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim == 2 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (0.5 if "conv" in name else 1.0))
        if getattr(model.config, "tie_word_embeddings", False):  # a tied file: the head on disk is the embedding
            emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
            if head.data_ptr() != emb.data_ptr():
                head.copy_(emb)  # NemotronH never ties itself


def _reference(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], torch.Tensor, float]:
    """transformers' greedy continuation by full forwards (no cache), the prompt logits, the smallest top-2 margin."""
    ids = list(prompt)
    margin, first = math.inf, None
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(torch.tensor([ids])).logits[0].float()
            first = logits if first is None else first
            top = logits[-1].topk(2).values
            margin = min(margin, float(top[0] - top[1]))
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], first, margin


def _tokenizer(out) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Mamba-2 hybrids mix state-space, attention and MLP layers."] * 20, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(out))


def _build(kind: str, kw: dict, shard: str, out):
    """Write the fixture with transformers; returns (model, greedy ids, prompt logits)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, NemotronHConfig, NemotronHForCausalLM

    cls, cfg_cls = (NemotronHForCausalLM, NemotronHConfig) if kind == "nemotron_h" else (Mamba2ForCausalLM,
                                                                                          Mamba2Config)
    config = cfg_cls(**kw)
    for seed in range(20):
        torch.manual_seed(seed)
        model = cls(config).float().eval()
        _randomise(model, torch.Generator().manual_seed(seed))
        ids, logits, margin = _reference(model, PROMPT)
        if margin >= MARGIN:
            break
    else:
        raise AssertionError("no seed gave greedy margins >= 1e-3")
    model.save_pretrained(str(out), max_shard_size=shard)
    _tokenizer(out)
    return model, ids, logits


def _legacy_head_dim_key(out) -> None:
    """Released Nemotron-H configs name the attention head size `attention_head_dim` (remote-code era)."""
    c = json.loads((out / "config.json").read_text())
    c["attention_head_dim"] = c.pop("head_dim")
    (out / "config.json").write_text(json.dumps(c))


@pytest.fixture(scope="module", params=list(CASES))
def produced(request, tmp_path_factory):
    kind, kw, shard = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    model, ids, logits = _build(kind, kw, shard, out)
    if request.param.endswith("legacy-key"):
        _legacy_head_dim_key(out)
    return request.param, out, model, ids, logits


def _our_greedy(path) -> tuple[list[int], torch.Tensor]:
    from hybridctl.generate import generate

    model, _ = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]))[0].float()
    res = generate(model, [PROMPT], max_new_tokens=NEW, use_eos=False, fast_cpu=False)
    return res.tokens[0], logits


# --------------------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------------------


def test_import_matches_transformers(produced):
    name, out, _, ids, logits = produced
    if name == "nemotron-h-4b":
        assert len(list(out.glob("model-*.safetensors"))) > 1  # the sharded layout is what is being read
    ours, our_logits = _our_greedy(out)
    assert ours == ids
    assert (our_logits - logits).abs().max().item() <= 1e-4


def test_export_loads_in_transformers(produced, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, out, _, ids, logits = produced
    convert(src=out, to="native", out=tmp_path / "native", progress=False)
    convert(src=tmp_path / "native", to="hf", out=tmp_path / "hf", progress=False, shard_size="100KB")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    got, got_logits, _ = _reference(back, PROMPT)
    assert got == ids
    assert (got_logits - logits).abs().max().item() <= 1e-4
    text = "attention and MLP layers"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(out))(text)["input_ids"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    if cfg["model_type"] == "mamba2" and cfg["tie_word_embeddings"]:
        assert not any("lm_head" in k for k in _stored_names(tmp_path / "hf"))  # Mamba2 stays properly tied
    if cfg["model_type"] == "nemotron_h":
        assert "lm_head.weight" in _stored_names(tmp_path / "hf")  # NemotronH never re-ties: the head is on disk


def _stored_names(d) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            names |= set(s.keys())
    return names


def test_dry_run_writes_nothing(produced, tmp_path):
    _, out, *_ = produced
    before = sorted(p.name for p in out.iterdir())
    for to in ("native", "hf"):
        r = CliRunner().invoke(app, ["convert", str(out), "--to", to, "--out", str(tmp_path / to), "--dry-run"])
        assert r.exit_code == 0, r.output
        assert "dry run: nothing written" in r.stdout and not (tmp_path / to).exists()
    assert sorted(p.name for p in out.iterdir()) == before


def test_tied_nemotron_h_round_trip_through_hf(tmp_path):
    """Defect 1: a tied NemotronH converted to native and back --to hf died in safetensors ("Some tensors share
    memory"), in several lines. Now lm_head.weight is its own tensor and transformers runs the export unchanged."""
    from transformers import AutoModelForCausalLM

    kind, kw, _ = CASES["nano-9b-v2"]
    model, ids, logits = _build(kind, dict(kw, hybrid_override_pattern="M*-"), "5GB", tmp_path / "src")
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), "--to", "native", "--out", str(tmp_path / "n")])
    assert r.exit_code == 0 and "tied embeddings" in r.stdout, r.output
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "n"), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert torch.equal(back.lm_head.weight, back.get_input_embeddings().weight)
    got, got_logits, _ = _reference(back, PROMPT)
    assert got == ids and (got_logits - logits).abs().max().item() <= 1e-4


def test_moe_nemotron_h_is_refused_in_one_line(tmp_path):
    """Nemotron-3-Nano-30B-A3B-like: Mamba + attention + MoE layers ('E'); refused by what it is, in one line."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(**dict(_NEMOTRON_BASE, hidden_size=64, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                    hybrid_override_pattern="ME*E", n_routed_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                                    n_shared_experts=1, mlp_hidden_act="relu2"))
    NemotronHForCausalLM(config).save_pretrained(str(tmp_path / "moe"))
    with pytest.raises(HybridctlError, match="MoE models are not yet supported"):
        load_model(tmp_path / "moe")
    for cmd in (["convert", str(tmp_path / "moe"), "--to", "native", "--out", str(tmp_path / "x")],
                ["generate", str(tmp_path / "moe"), "--prompt", "hi"]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 1 and not (tmp_path / "x").exists()
        line = r.stderr if hasattr(r, "stderr") and r.stderr else r.output
        assert "not yet supported" in line and len(line.strip().splitlines()) == 1, line


def test_mamba2_export_refuses_heads_that_are_no_multiple_of_hidden(tmp_path):
    """transformers' Mamba2 sizes its mixer as expand*hidden_size: a Nemotron-H-4B-like mixer (d_inner/h = 2.33)
    cannot be written as Mamba2ForCausalLM, and says so in one line instead of writing a model that will not load."""
    from conftest import tiny_config

    from hybridctl.checkpoint.native import save_model
    from hybridctl.model import build_model, materialize

    cfg = tiny_config(pattern="MM", d_model=96, mamba=dict(d_state=8, headdim=16, ngroups=2, nheads=14))
    assert cfg.d_inner == 224
    save_model(materialize(build_model(cfg), "cpu", seed=0), tmp_path / "native", tokenizer=None)
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "native"), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 1 and not (tmp_path / "hf").exists()
    assert "cannot export to mamba2" in r.output and "--hf-arch nemotron_h" in r.output
