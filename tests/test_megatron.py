"""Megatron checkpoints (legacy per-rank and torch_dist): read, write, round trips, safety, corrupt inputs.

Ground truth: a tiny hybrid (GQA, ngroups > 1, swiglu, padded vocab) built with hybridctl.model. Fixtures are made
two ways: with hybridctl's writers, and with the independent hand-written code below (per-rank slicing by explicit
index ranges, per-group q/k/v interleave by loops), so a symmetric bug in reader and writer cannot pass.
"""

from __future__ import annotations

import argparse
import enum
import io
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from hybridctl.checkpoint import load_model, open_checkpoint
from hybridctl.checkpoint.megatron import open_megatron, write_megatron_dist, write_megatron_legacy
from hybridctl.checkpoint.native import open_native, save_model
from hybridctl.config import HybridctlError, ModelConfig
from hybridctl.model import build_model, materialize

UNPADDED = 300  # the "tokenizer" size; the model keeps Megatron's padded 512 rows


def make_config(vocab: int = 512, tie: bool = False, act: str = "swiglu") -> ModelConfig:
    return ModelConfig.from_dict(dict(
        vocab_size=vocab, d_model=32, pattern="M*-M-*M-", tie_embeddings=tie,
        mamba=dict(d_state=4, headdim=8, ngroups=4, dt_clamp_min=0.0),
        attention=dict(n_heads=8, n_kv_heads=4, head_dim=4), mlp=dict(hidden_size=16, activation=act)))


def make_model(cfg: ModelConfig, seed: int = 0):
    model = materialize(build_model(cfg), "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # perturb every tensor so a swapped norm / bias cannot go unnoticed
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def truth():
    cfg = make_config()
    model = make_model(cfg)
    return cfg, model, {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- independent hand-built Megatron layouts -----------------------------------------------------------------------


def hand_global(cfg: ModelConfig, sd: dict, style: str) -> dict:
    """Megatron keys at TP=1 from a native state dict, written out longhand."""
    out = {"embedding.word_embeddings.weight": sd["embed.weight"], "decoder.final_norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = sd["lm_head.weight"]
    a, dh = cfg.attention, cfg.head_dim
    qpg = a.n_heads // a.n_kv_heads
    for i, kind in enumerate(cfg.pattern):
        n, p = f"layers.{i}.", f"decoder.layers.{i}."
        if kind == "M":
            out[p + ("norm.weight" if style == "2024" else "mixer.in_proj.layer_norm_weight")] = sd[n + "norm.weight"]
            conv = "mixer.conv1d." if style in ("2024", "mid") else "mixer.conv1d_"
            out[p + conv + "weight"] = sd[n + "mixer.conv1d.weight"]
            out[p + conv + "bias"] = sd[n + "mixer.conv1d.bias"]
            for s in ("in_proj.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
                out[p + "mixer." + s] = sd[n + "mixer." + s]
        elif kind == "*":
            out[p + "self_attention.linear_qkv.layer_norm_weight"] = sd[n + "norm.weight"]
            q, k, v = (sd[n + f"mixer.{x}_proj.weight"] for x in "qkv")
            rows = []
            for g in range(a.n_kv_heads):
                rows += [q[g * qpg * dh:(g + 1) * qpg * dh], k[g * dh:(g + 1) * dh], v[g * dh:(g + 1) * dh]]
            out[p + "self_attention.linear_qkv.weight"] = torch.cat(rows)
            out[p + "self_attention.linear_proj.weight"] = sd[n + "mixer.o_proj.weight"]
        else:
            out[p + "mlp.linear_fc1.layer_norm_weight"] = sd[n + "norm.weight"]
            out[p + "mlp.linear_fc1.weight"] = torch.cat([sd[n + "mixer.gate_proj.weight"],
                                                          sd[n + "mixer.up_proj.weight"]]) \
                if cfg.mlp.activation == "swiglu" else sd[n + "mixer.up_proj.weight"]
            out[p + "mlp.linear_fc2.weight"] = sd[n + "mixer.down_proj.weight"]
    return out


def hand_rank_slice(cfg: ModelConfig, key: str, t: torch.Tensor, r: int, tp: int) -> torch.Tensor:
    """Rank r's slice, computed from explicit row/column ranges per component."""
    di, gn, H, F = cfg.d_inner, cfg.mamba.ngroups * cfg.mamba.d_state, cfg.mamba_nheads, cfg.mlp.hidden_size

    def comps(sizes):
        idx, start = [], 0
        for s in sizes:
            step = s // tp
            idx += list(range(start + r * step, start + (r + 1) * step))
            start += s
        return t[idx].clone()

    if key.endswith(("layer_norm_weight", "final_norm.weight")) or key.endswith(".norm.weight") and \
            "mixer" not in key:
        return t.clone()
    if key.endswith("in_proj.weight"):
        return comps([di, di, gn, gn, H])
    if "conv1d" in key:
        return comps([di, gn, gn])
    if key.endswith("linear_fc1.weight") and cfg.mlp.activation == "swiglu":
        return comps([F, F])
    if key.endswith(("out_proj.weight", "linear_proj.weight", "linear_fc2.weight")):
        w = t.shape[1] // tp
        return t[:, r * w:(r + 1) * w].clone()
    return comps([t.shape[0]])


@pytest.fixture
def fake_megatron_enum():
    """Pickle a real-looking Megatron enum in args, then make 'megatron' unimportable again."""
    names = ["megatron", "megatron.core", "megatron.core.enums"]
    for n in names:
        sys.modules[n] = types.ModuleType(n)

    class ModelType(enum.Enum):
        encoder_or_decoder = 1

    ModelType.__module__ = "megatron.core.enums"
    ModelType.__qualname__ = "ModelType"
    sys.modules["megatron.core.enums"].ModelType = ModelType
    yield ModelType
    for n in names:
        sys.modules.pop(n, None)


def hand_args(cfg: ModelConfig, tp: int, pp: int, model_type=None, mamba_args: bool = True) -> argparse.Namespace:
    a = argparse.Namespace(
        num_layers=cfg.n_layers, hidden_size=cfg.d_model, ffn_hidden_size=cfg.mlp.hidden_size,
        num_attention_heads=cfg.attention.n_heads, group_query_attention=True,
        num_query_groups=cfg.attention.n_kv_heads, kv_channels=cfg.head_dim, hybrid_attention_ratio=0.25,
        hybrid_mlp_ratio=0.375, hybrid_override_pattern=cfg.pattern, normalization="RMSNorm", norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings, padded_vocab_size=cfg.vocab_size,
        vocab_size=UNPADDED, swiglu=True, position_embedding_type="none", tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, params_dtype=torch.float32, model_type=model_type)
    if mamba_args:
        a.mamba_state_dim, a.mamba_head_dim, a.mamba_num_groups = cfg.mamba.d_state, cfg.mamba.headdim, \
            cfg.mamba.ngroups
    return a


def write_hand_legacy(root: Path, cfg: ModelConfig, sd: dict, *, tp: int, pp: int, style: str, iteration=100,
                      model_type=None) -> Path:
    """Megatron's legacy layout, with the extras real files carry (TE BytesIO extra state, optimizer, numpy RNG)."""
    import numpy as np

    glob = hand_global(cfg, sd, style)
    per = cfg.n_layers // pp
    it_dir = root / f"iter_{iteration:07d}"
    for s in range(pp):
        for r in range(tp):
            model = {}
            for k, t in glob.items():
                parts = k.split(".")
                if k.startswith("decoder.layers."):
                    i = int(parts[2])
                    if not s * per <= i < (s + 1) * per:
                        continue
                    k = ".".join(parts[:2] + [str(i - s * per)] + parts[3:])
                elif k.startswith("embedding.") and s != 0 or not k.startswith(("embedding.", "decoder.layers.")) \
                        and s != pp - 1:
                    continue
                model[k] = hand_rank_slice(cfg, k, t, r, tp)
                if k.endswith("in_proj.weight"):
                    model[k.replace("weight", "_extra_state")] = io.BytesIO(b"te-extra-state")
            d = it_dir / (f"mp_rank_{r:02d}" + (f"_{s:03d}" if pp > 1 else ""))
            d.mkdir(parents=True)
            torch.save({"args": hand_args(cfg, tp, pp, model_type),
                        "checkpoint_version": 3.0, "iteration": iteration, "model": model,
                        "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}},
                        "rng_state": [{"np_rng_state": np.random.get_state(),
                                       "torch_rng_state": torch.get_rng_state()}]},
                       d / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def write_hand_dist(d: Path, cfg: ModelConfig, sd: dict, *, common_pt: bool, objects: dict | None = None) -> Path:
    """torch_dist by hand: split Mamba keys, optimizer/rng/_extra_state entries, common state as pt or object."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    di, gn, H = cfg.d_inner, cfg.mamba.ngroups * cfg.mamba.d_state, cfg.mamba_nheads
    state = {}
    for k, t in hand_global(cfg, sd, "mid").items():
        if k.endswith("in_proj.weight"):
            for name, piece in zip("z x B C dt".split(), torch.split(t, [di, di, gn, gn, H])):
                state[f"{k}.{name}"] = piece.clone()
        elif "conv1d" in k:
            for name, piece in zip("xBC", torch.split(t, [di, gn, gn])):
                state[f"{k}.{name}"] = piece.clone()
        else:
            state[k] = t.clone()
    state["optimizer.state.exp_avg.decoder.final_norm.weight"] = torch.zeros(cfg.d_model)
    state["decoder.layers.0.mixer.in_proj._extra_state/shard_0_1"] = [io.BytesIO(b"x")]
    state.update(objects or {})
    common = {"args": hand_args(cfg, 1, 1), "iteration": 5, "checkpoint_version": 3.0}
    if not common_pt:
        state["common_state/shard_0_1"] = [common]
    d.mkdir(parents=True)
    dcp.save(state, storage_writer=FileSystemWriter(d), planner=DefaultSavePlanner(flatten_state_dict=False),
             no_dist=True)
    if common_pt:
        torch.save(common, d / "common.pt")
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    return d


def assert_matches(src, sd: dict, where: str = "") -> None:
    assert set(src.specs) == set(sd), where
    for k, v in sd.items():
        got = src.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v), f"{where}: {k} differs (max err " \
            f"{(got.float() - v.float()).abs().max().item() if got.shape == v.shape else 'shape'})"


def assert_same_logits(path, model) -> None:
    loaded, _ = load_model(path)
    ids = torch.randint(0, UNPADDED, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ---- reading hand-built checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("tp,pp,style", [(1, 1, "current"), (2, 1, "2024"), (2, 2, "current"), (2, 2, "mid")])
def test_read_hand_built_legacy(tmp_path, truth, fake_megatron_enum, tp, pp, style):
    cfg, model, sd = truth
    root = write_hand_legacy(tmp_path / "ckpt", cfg, sd, tp=tp, pp=pp, style=style,
                             model_type=fake_megatron_enum.encoder_or_decoder)
    sys.modules.pop("megatron.core.enums")  # reading must not need Megatron
    src = open_checkpoint(root)
    assert src.format == "megatron-legacy" and src.config == cfg
    assert (src.info["tp"], src.info["pp"], src.info["vocab_size_unpadded"]) == (tp, pp, UNPADDED)
    assert src.info["key_style"] == ("2024" if style == "2024" else "current")
    assert_matches(src, sd, f"tp{tp} pp{pp} {style}")
    assert_same_logits(root, model)


@pytest.mark.parametrize("common_pt", [True, False])
def test_read_hand_built_dist(tmp_path, truth, common_pt):
    cfg, model, sd = truth
    d = write_hand_dist(tmp_path / "ckpt" / "iter_0000005", cfg, sd, common_pt=common_pt)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("5")
    src = open_megatron(tmp_path / "ckpt")
    assert src.format == "megatron-dist" and src.config == cfg and src.info["iteration"] == 5
    assert_matches(src, sd, "dist")
    assert_same_logits(d, model)  # an iteration directory works as well as the root


def test_2024_args_without_mamba_sizes_use_megatron_defaults(tmp_path):
    # The paper's code had no mamba_* args: N 128, hd 64, ng 8 apply.
    cfg = ModelConfig.from_dict(dict(vocab_size=256, d_model=256, pattern="M-", mlp=dict(hidden_size=32),
                                     mamba=dict(dt_clamp_min=0.0), attention=dict(n_heads=4, n_kv_heads=4)))
    model = make_model(cfg)
    sd = model.state_dict()
    glob = hand_global(cfg, sd, "2024")
    args = hand_args(cfg, 1, 1, mamba_args=False)
    args.swiglu, args.num_attention_heads, args.group_query_attention = False, 4, False
    d = tmp_path / "release" / "mp_rank_00"
    d.mkdir(parents=True)
    torch.save({"args": args, "model": glob, "iteration": 0}, d / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    src = open_megatron(tmp_path)
    assert (src.config.mamba.d_state, src.config.mamba.headdim, src.config.mamba.ngroups) == (128, 64, 8)
    assert src.config.mlp.activation == "gelu" and src.config.mamba.dt_clamp_max is None
    assert_matches(src, sd)


# ---- writers and round trips -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_300(tmp_path_factory):
    """A native checkpoint whose vocab (300) is not a multiple of 128: export pads, import strips."""
    cfg = make_config(vocab=300)
    path = tmp_path_factory.mktemp("n") / "native"
    save_model(make_model(cfg, seed=3), path)
    return open_native(path)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_roundtrip_legacy(tmp_path, native_300, tp, pp):
    out = write_megatron_legacy(tmp_path / "meg", native_300, tp=tp, pp=pp)
    back = open_megatron(out)
    assert back.config == native_300.config
    assert back.info["vocab_size_padded"] == -(-300 // (128 * tp)) * 128 * tp
    assert_matches(back, {k: native_300.get(k) for k in native_300.specs}, f"tp{tp} pp{pp}")


@pytest.mark.parametrize("tp,pp,keys", [(2, 2, "current"), (4, 1, "2024")])
def test_count_writes_matches_progress_ticks(tmp_path, native_300, tp, pp, keys):
    from hybridctl.checkpoint.megatron import count_writes, count_writes_dist, write_megatron_dist

    ticks = []
    write_megatron_legacy(tmp_path / "leg", native_300, tp=tp, pp=pp, keys=keys, progress=ticks.append)
    assert len(ticks) == count_writes(native_300, tp=tp, pp=pp, keys=keys)
    ticks.clear()
    write_megatron_dist(tmp_path / "dist", native_300, progress=ticks.append)
    assert len(ticks) == count_writes_dist(native_300)


def test_roundtrip_legacy_2024_keys_and_tied(tmp_path):
    cfg = make_config(vocab=256, tie=True, act="relu2")
    save_model(make_model(cfg), tmp_path / "n")
    src = open_native(tmp_path / "n")
    out = write_megatron_legacy(tmp_path / "meg", src, tp=2, pp=2, keys="2024")
    last = torch.load(out / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)["model"]
    assert "output_layer.weight" in last  # a tied model's last stage still holds the output layer (Megatron)
    first = torch.load(out / "release" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)["model"]
    assert "decoder.layers.0.norm.weight" in first and "decoder.layers.0.mixer.conv1d.weight" in first
    assert first["decoder.layers.0.mixer.in_proj._extra_state"] is None
    back = open_megatron(out)
    assert back.config == cfg and back.info["key_style"] == "2024"
    assert_matches(back, {k: src.get(k) for k in src.specs})


def test_written_legacy_matches_hand_layout(tmp_path, truth):
    """The writer's per-rank tensors equal the independent hand slicing (TP=2, PP=2)."""
    cfg, model, sd = truth
    save_model(model, tmp_path / "n")
    out = write_megatron_legacy(tmp_path / "meg", open_native(tmp_path / "n"), tp=2, pp=2)
    glob = hand_global(cfg, sd, "current")
    for s in range(2):
        for r in range(2):
            got = torch.load(out / "release" / f"mp_rank_{r:02d}_{s:03d}" / "model_optim_rng.pt",
                             weights_only=False)
            assert got["args"].tensor_model_parallel_size == 2 and got["args"].padded_vocab_size == 512
            for k, t in got["model"].items():
                if k.endswith("_extra_state"):
                    continue
                parts = k.split(".")
                gk = k if not k.startswith("decoder.layers.") else ".".join(
                    parts[:2] + [str(int(parts[2]) + 4 * s)] + parts[3:])
                assert torch.equal(t, hand_rank_slice(cfg, k, glob[gk], r, 2)), k


def test_roundtrip_dist_and_dcp_global_load(tmp_path, native_300):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    out = write_megatron_dist(tmp_path / "meg", native_300)
    back = open_megatron(out)
    assert back.config == native_300.config
    assert_matches(back, {k: native_300.get(k) for k in native_300.specs}, "dist")
    # Megatron's view: plain DCP load into empty global tensors under the Megatron key names.
    cfg = native_300.config
    sd = {k: native_300.get(k) for k in native_300.specs}
    glob = hand_global(cfg, sd, "mid")
    glob["embedding.word_embeddings.weight"] = torch.cat([sd["embed.weight"], torch.zeros(84, cfg.d_model)])
    glob["output_layer.weight"] = torch.cat([sd["lm_head.weight"], torch.zeros(84, cfg.d_model)])
    di, gn, H = cfg.d_inner, cfg.mamba.ngroups * cfg.mamba.d_state, cfg.mamba_nheads
    want = {}
    for k, t in glob.items():
        names, sizes = ("z x B C dt".split(), [di, di, gn, gn, H]) if k.endswith("in_proj.weight") else \
            (list("xBC"), [di, gn, gn]) if "conv1d" in k else ([None], [t.shape[0]])
        for name, piece in zip(names, torch.split(t, sizes)):
            want[k if name is None else f"{k}.{name}"] = piece
    empty = {k: torch.empty_like(v) for k, v in want.items()}
    empty["decoder.layers.1.self_attention.core_attention._extra_state/shard_0_1"] = io.BytesIO()
    empty["common_state/shard_0_1"] = io.BytesIO()
    dcp.load(empty, storage_reader=FileSystemReader(out / "release"), no_dist=True)
    for k, v in want.items():
        assert torch.equal(empty[k], v), k
    assert empty["decoder.layers.1.self_attention.core_attention._extra_state/shard_0_1"] == [None]
    common = empty["common_state/shard_0_1"][0]
    assert common["args"].hybrid_override_pattern == cfg.pattern and common["args"].padded_vocab_size == 384
    assert torch.load(out / "release" / "common.pt", weights_only=False)["args"].num_layers == cfg.n_layers


def test_writer_validates_parallel_sizes(tmp_path, native_300):
    with pytest.raises(HybridctlError, match="not divisible"):
        write_megatron_legacy(tmp_path / "a", native_300, tp=8)  # 4 Mamba groups
    with pytest.raises(HybridctlError, match="pipeline"):
        write_megatron_legacy(tmp_path / "b", native_300, pp=3)
    with pytest.raises(HybridctlError, match="megatron-keys"):
        write_megatron_legacy(tmp_path / "c", native_300, keys="2023")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- safety and corrupt inputs -----------------------------------------------------------------------------------


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["legacy-args", "common.pt", "dcp-metadata"])
def test_malicious_pickle_is_refused(tmp_path, native_300, where):
    marker = tmp_path / "pwned"
    if where == "legacy-args":
        out = write_megatron_legacy(tmp_path / "meg", native_300)
        f = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
        obj = torch.load(f, weights_only=False)
        obj["args"].evil = Payload(marker)
        torch.save(obj, f)
    elif where == "common.pt":
        out = write_megatron_dist(tmp_path / "meg", native_300)
        torch.save({"args": Payload(marker)}, out / "release" / "common.pt")
    else:
        import pickle

        out = write_megatron_dist(tmp_path / "meg", native_300)
        (out / "release" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(HybridctlError, match="system") as e:
        open_megatron(out)
    assert "--trust-pickle" in str(e.value)
    assert not marker.exists()


def test_dist_object_entries_are_never_unpickled(tmp_path, native_300):
    """Poisoned _extra_state / rng objects inside the DCP files are skipped: only tensors go through DCP."""
    marker = tmp_path / "pwned"
    sd = {k: native_300.get(k) for k in native_300.specs}
    d = write_hand_dist(tmp_path / "x", native_300.config, sd, common_pt=False,
                        objects={"decoder.layers.0.mixer.in_proj._extra_state/shard_0_1": [Payload(marker)],
                                 "rng_state/shard_0.0_1.1": [Payload(marker)]})
    assert_matches(open_megatron(d), sd)
    assert not marker.exists()


def test_trust_pickle_opens_unlisted_globals(tmp_path, native_300):
    out = write_megatron_legacy(tmp_path / "meg", native_300)
    f = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    obj["args"].extra = __import__("decimal").Decimal("1.5")  # harmless, but not on the allowlist
    torch.save(obj, f)
    with pytest.raises(HybridctlError, match="decimal.Decimal"):
        open_megatron(out)
    assert open_megatron(out, trust_pickle=True).config == native_300.config


def test_corrupt_inputs(tmp_path, native_300):
    out = write_megatron_legacy(tmp_path / "meg", native_300, tp=2, pp=2)
    # missing rank file
    (out / "release" / "mp_rank_01_001" / "model_optim_rng.pt").rename(tmp_path / "moved.pt")
    with pytest.raises(HybridctlError, match="missing rank file"):
        open_megatron(out)
    (tmp_path / "moved.pt").rename(out / "release" / "mp_rank_01_001" / "model_optim_rng.pt")
    # inconsistent shapes across ranks
    f = out / "release" / "mp_rank_01_000" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    obj["model"]["decoder.layers.0.mixer.A_log"] = torch.zeros(7)
    torch.save(obj, f)
    with pytest.raises(HybridctlError, match="inconsistent"):
        open_megatron(out)
    # tracker pointing nowhere / garbage tracker / missing requested iteration
    (out / "latest_checkpointed_iteration.txt").write_text("1200")
    with pytest.raises(HybridctlError, match="iter_0001200.*does not exist"):
        open_megatron(out)
    (out / "latest_checkpointed_iteration.txt").write_text("hello")
    with pytest.raises(HybridctlError, match="expected an iteration number"):
        open_megatron(out)
    with pytest.raises(HybridctlError, match="iteration 7"):
        open_megatron(out, iteration=7)


def test_truncated_distcp(tmp_path, native_300):
    out = write_megatron_dist(tmp_path / "meg", native_300)
    f = out / "release" / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(HybridctlError, match="truncated"):
        open_megatron(out)


def test_truncated_rank_file(tmp_path, native_300):
    out = write_megatron_legacy(tmp_path / "meg", native_300)
    f = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[:-200])
    with pytest.raises(HybridctlError, match="mp_rank_00"):
        open_megatron(out)


def test_iteration_selection(tmp_path, truth):
    cfg, _, sd = truth
    write_hand_legacy(tmp_path, cfg, sd, tp=1, pp=1, style="current", iteration=10)
    sd2 = {k: v + 1 for k, v in sd.items()}
    write_hand_legacy(tmp_path, cfg, sd2, tp=1, pp=1, style="current", iteration=20)  # tracker → 20
    assert torch.equal(open_megatron(tmp_path).get("norm_f.weight"), sd2["norm_f.weight"])
    assert torch.equal(open_megatron(tmp_path, iteration=10).get("norm_f.weight"), sd["norm_f.weight"])
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(HybridctlError, match="iter_0000010, iter_0000020"):
        open_megatron(tmp_path)


# ---- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_convert_megatron(tmp_path, truth):
    pytest.importorskip("hybridctl.convert")
    from typer.testing import CliRunner

    from hybridctl.cli import app

    cfg, model, sd = truth
    root = write_hand_legacy(tmp_path / "meg", cfg, sd, tp=2, pp=1, style="2024")
    r = CliRunner().invoke(app, ["convert", str(root), "--to", "native", "--out", str(tmp_path / "n"), "--json"])
    assert r.exit_code == 0, r.output
    assert_matches(open_native(tmp_path / "n"), sd)
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "n"), "--to", "megatron-legacy", "--tp", "2", "--pp", "2",
                                 "--out", str(tmp_path / "m2"), "--json"])
    assert r.exit_code == 0, r.output
    assert_same_logits(tmp_path / "m2", model)
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "m2"), "--to", "native", "--iteration", "99",
                                 "--out", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "does not exist" in r.output and not (tmp_path / "bad").exists()


def test_tp_split_slice_merge_are_inverse():
    from hybridctl.checkpoint.megatron_keys import Split, tp_merge, tp_slice, tp_split

    t = torch.randn(3 * 4 + 8 + 4, 5)
    for split in (Split(0, (12, 8, 4)), Split(0, (24,)), None):
        for tp in (1, 2, 4):
            parts = tp_split(t, split, tp)
            assert all(torch.equal(parts[r], tp_slice(t, split, tp, r)) for r in range(tp))
            assert torch.equal(tp_merge(parts, split), t)
    parts = tp_split(t, Split(0, (12, 8, 4)), 2)  # rank 0 = [z0, x0, y0]: rows 0-5, 12-15, 20-21
    assert torch.equal(parts[0], torch.cat([t[0:6], t[12:16], t[20:22]]))


@pytest.mark.parametrize("fmt", ["legacy", "dist"])
def test_tokenizer_travels_with_megatron_export(tmp_path, fmt):
    from hybridctl.checkpoint import load_tokenizer_for
    from hybridctl.tokenizer import build_tokenizer

    cfg = make_config(vocab=300)
    save_model(make_model(cfg), tmp_path / "n", tokenizer=build_tokenizer("byte"))
    src = open_native(tmp_path / "n")
    writer = write_megatron_legacy if fmt == "legacy" else write_megatron_dist
    back = open_megatron(writer(tmp_path / "meg", src))
    tok = load_tokenizer_for(back)
    assert tok.decode(tok.encode("hybrid", add_bos=False)) == "hybrid"


def test_root_without_tracker_is_detected_and_dtype_applies(tmp_path, native_300):
    from hybridctl.checkpoint import detect_format
    from hybridctl.convert import convert

    res = convert(src=native_300.path, to="megatron", out=tmp_path / "m", dtype="bfloat16", progress=False)
    back = open_megatron(res.out)
    assert all(back.get(k).dtype == torch.bfloat16 for k in back.specs)
    assert torch.equal(back.get("norm_f.weight"), native_300.get("norm_f.weight").to(torch.bfloat16))
    (tmp_path / "m" / "latest_checkpointed_iteration.txt").unlink()
    assert detect_format(tmp_path / "m") == "megatron"  # a root with release/ (or iter_NNNNNNN/) dirs
    assert open_megatron(tmp_path / "m", iteration="release").config == native_300.config


def _metadata_with_save_plan(out: Path, planner_data) -> Path:
    """Our .metadata with a megatron-core-0.19-like save plan (SavePlan / WriteItem / TensorWriteData /
    WriteItemType) pickled into it; ``planner_data`` lands inside the plan."""
    import pickle

    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    f = out / "release" / ".metadata"
    md = pickle.loads(f.read_bytes())  # our own file, written by the test a moment ago
    item = WriteItem(index=MetadataIndex("embedding.word_embeddings.weight"), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 4])),
                                                 properties=TensorProperties(dtype=torch.float32),
                                                 size=torch.Size([4, 4])))
    md.all_local_plans = [SavePlan(items=[item], planner_data=planner_data)]
    f.write_bytes(pickle.dumps(md))
    return f


def test_dcp_save_plan_in_metadata_is_read_as_data(tmp_path, native_300):
    """megatron-core 0.19 pickles DCP's save plan into .metadata: those inert dataclasses are allowed."""
    out = write_megatron_dist(tmp_path / "meg", native_300)
    assert b"SavePlan" in _metadata_with_save_plan(out, {"note": [1, 2]}).read_bytes()
    assert_matches(open_megatron(out), {k: native_300.get(k) for k in native_300.specs})


def test_hostile_payload_inside_dcp_save_plan_is_refused(tmp_path, native_300):
    marker = tmp_path / "pwned"
    out = write_megatron_dist(tmp_path / "meg", native_300)
    _metadata_with_save_plan(out, Payload(marker))
    with pytest.raises(HybridctlError, match="system"):
        open_megatron(out)
    assert not marker.exists()


def test_torch_dist_export_carries_every_extra_state(tmp_path, native_300):
    """Defect 4: output_layer / final norm / every linear's _extra_state (what megatron-core asks for strictly)."""
    from hybridctl.checkpoint.safe_pickle import SafeFileSystemReader

    out = write_megatron_dist(tmp_path / "meg", native_300)
    keys = set(SafeFileSystemReader(out / "release").read_metadata().state_dict_metadata)
    cfg = native_300.config
    want = {"output_layer._extra_state/shard_0_1", "decoder.final_norm._extra_state/shard_0_1"}
    for i, kind in enumerate(cfg.pattern):
        mods = {"M": ["mixer.in_proj", "mixer.out_proj", "mixer.norm"],
                "*": ["self_attention.linear_qkv", "self_attention.linear_proj", "self_attention.core_attention"],
                "-": ["mlp.linear_fc1", "mlp.linear_fc2"]}[kind]
        want |= {f"decoder.layers.{i}.{m}._extra_state/shard_0_1" for m in mods}
    assert want <= keys, sorted(want - keys)
