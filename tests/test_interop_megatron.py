"""Interop with the real producers: megatron-core 0.19 and mamba_ssm write the fixtures and load our exports back.

The producers live in the oracle venv (tests/oracles/make_venv.sh, built by .ci/run); its python is
``HYBRIDCTL_ORACLE_PYTHON`` (or ./.venv-oracle/bin/python). In CI (CI=true) a missing oracle FAILS these tests;
locally they skip. Fixtures are written once per session (megatron-core's own dist_checkpointing.save with a
training-like common state, its TP/PP resharding into legacy per-rank files, mamba_ssm's save_pretrained), each with
a safetensors dump of the exact tensors the producer built.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridctl.checkpoint import open_checkpoint
from hybridctl.checkpoint.megatron import open_megatron
from hybridctl.checkpoint.megatron_keys import all_entries
from hybridctl.config import HybridctlError

REPO = Path(__file__).resolve().parent.parent
ORACLES = REPO / "tests" / "oracles"
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")

_BASE = dict(hidden=64, heads=4, head_dim=16, ffn=96, d_state=16, headdim=16, vocab=300, padded_vocab=384)
MEGATRON_CASES = {
    # GQA (4 heads / 2 groups), 2 Mamba groups, untied, squared-ReLU MLP, padded vocab (300 -> 384)
    "hybrid_gqa": dict(_BASE, pattern="M*M-", kv=2, ngroups=2, mamba_heads=8, act="relu2", tied=False, seed=1,
                       legacy=[[2, 2]]),
    # MQA, 4 Mamba groups, tied embeddings, swiglu MLP (fc1 = [gate, up]), vocab already a multiple of 128
    "tied_mqa_swiglu": dict(_BASE, pattern="MM*-", kv=1, ngroups=4, mamba_heads=8, act="swiglu", tied=True,
                            vocab=256, padded_vocab=256, seed=2, legacy=[[1, 2]]),
}
# d_inner != 2 * hidden and not a multiple of it (10 heads x 16 = 160 = 2.5 * 64), as in Nemotron-H 4B / Nano v2
WIDE_CASES = {"wide_mamba": dict(_BASE, pattern="M*-M", kv=2, ngroups=2, mamba_heads=10, act="relu2", tied=False,
                                 seed=3, legacy=[])}
MAMBA_SSM_CASES = {
    "mamba2_tied": {"d_model": 64, "n_layer": 2, "vocab": 300, "pad": 16, "tied": True,
                    "ssm": {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 64}},
    "mamba2_untied": {"d_model": 48, "n_layer": 3, "vocab": 250, "pad": 8, "tied": False,
                      "ssm": {"d_state": 8, "headdim": 8, "ngroups": 1, "expand": 2}},
}


def oracle_python() -> str:
    env = os.environ.get("HYBRIDCTL_ORACLE_PYTHON")
    py = Path(env) if env else REPO / ".venv-oracle" / "bin" / "python"
    if py.is_file():
        return str(py)
    msg = (f"oracle python {py} not found (build it with tests/oracles/make_venv.sh .venv-oracle, or set "
           "HYBRIDCTL_ORACLE_PYTHON)")
    if os.environ.get("CI") == "true":
        pytest.fail(msg + "; CI must run the interop tests with the real producers")
    pytest.skip(msg)


def run_oracle(script: str, *args: str | Path, cwd: Path) -> None:
    r = subprocess.run([oracle_python(), "-W", "ignore", str(ORACLES / script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"{script} {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


def write_cases(tmp: Path, name: str, cases: dict) -> Path:
    f = tmp / f"{name}.json"
    f.write_text(json.dumps(cases))
    return f


@pytest.fixture(scope="session")
def mega(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("megatron_oracle")
    run_oracle("megatron_oracle.py", "write", tmp / "out", write_cases(tmp, "cases", MEGATRON_CASES), cwd=tmp)
    return tmp / "out"


@pytest.fixture(scope="session")
def mamba_ssm_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mamba_ssm_oracle")
    run_oracle("mamba_ssm_oracle.py", "write", tmp / "out", write_cases(tmp, "cases", MAMBA_SSM_CASES), cwd=tmp)
    return tmp / "out"


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hybridctl", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def megatron_view(src) -> dict[str, torch.Tensor]:
    """Our Source re-expressed under Megatron's TP=1 keys (both key aliases), through our own key table."""
    cfg = src.config
    rows = src.info.get("vocab_size_padded") or cfg.vocab_size
    out = {}
    for e in all_entries(cfg, max(rows, cfg.vocab_size)):
        t = e.to_megatron([src.get(n) for n in e.natives])
        for k in (e.key, *e.aliases):
            out[k] = t
    return out


def assert_equal_vocab_aware(ours: dict, ref: dict, where: str) -> None:
    """Every reference tensor present in ours and equal. Vocab tensors: the shared rows equal, extra rows zero."""
    for k, r in ref.items():
        assert k in ours, f"{where}: {k} missing"
        o = ours[k]
        if k in VOCAB_KEYS and o.shape[0] != r.shape[0]:
            n = min(o.shape[0], r.shape[0])
            assert torch.equal(o[:n], r[:n]), f"{where}: {k}"
            longer = o if o.shape[0] > n else r
            assert not (o.shape[0] > n and longer[n:].any()), f"{where}: {k} padding rows are not zero"
            continue
        assert o.shape == r.shape and o.dtype == r.dtype, f"{where}: {k} {tuple(o.shape)} vs {tuple(r.shape)}"
        assert torch.equal(o, r), f"{where}: {k} differs"


def rank_dumps(d: Path) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    return {tuple(int(x) for x in f.stem.split("_")[1:]): load_file(f) for f in sorted(d.glob("rank_*.safetensors"))}


def merge_vocab(ranks: dict, key: str, pp_stage: int) -> torch.Tensor:
    parts = [sd[key] for (t, p), sd in sorted(ranks.items()) if p == pp_stage and key in sd]
    return torch.cat(parts)


def assert_ranks_equal(ours: dict, ref: dict, where: str) -> None:
    """Per-rank state dicts equal; vocab-parallel tensors compared after merging the TP ranks (the padding of the
    vocab may differ: Megatron pads to 128 * tp by default)."""
    assert ours.keys() == ref.keys(), f"{where}: ranks {sorted(ours)} vs {sorted(ref)}"
    for rank in ref:
        assert ours[rank].keys() == ref[rank].keys(), f"{where} rank {rank}: key sets differ"
        for k in ref[rank]:
            if k in VOCAB_KEYS:
                continue
            assert torch.equal(ours[rank][k], ref[rank][k]), f"{where} rank {rank}: {k}"
    for k in VOCAB_KEYS:
        for p in {p for (_, p), sd in ref.items() if k in sd}:
            assert_equal_vocab_aware({k: merge_vocab(ours, k, p)}, {k: merge_vocab(ref, k, p)}, f"{where} pp{p}")


# ---- our readers on megatron-core's own checkpoints ----------------------------------------------------------------


def _fixture_dirs(case: str) -> list[str]:
    return ["dist", "legacy_tp1_pp1"] + [f"legacy_tp{t}_pp{p}" for t, p in MEGATRON_CASES[case]["legacy"]]


@pytest.mark.parametrize("case,fmt", [(c, f) for c in MEGATRON_CASES for f in _fixture_dirs(c)])
def test_readers_give_the_tensors_megatron_core_built(mega, case, fmt):
    ref = load_file(mega / case / "model.safetensors")
    src = open_megatron(mega / case / fmt)
    c = MEGATRON_CASES[case]
    assert src.config.pattern == c["pattern"] and src.config.tie_embeddings == c["tied"]
    assert src.config.attention.n_kv_heads == c["kv"] and src.config.mamba.ngroups == c["ngroups"]
    assert_equal_vocab_aware(megatron_view(src), ref, f"{case}/{fmt}")
    assert src.info.get("vocab_size_unpadded") == c["vocab"] or c["vocab"] == c["padded_vocab"]


def test_megatron_core_metadata_holds_save_plan_and_is_read(mega):
    """Defect 3: megatron-core 0.19 pickles DCP's SavePlan / WriteItem into .metadata; it is read as plain data."""
    md = (mega / "hybrid_gqa" / "dist" / "iter_0000010" / ".metadata").read_bytes()
    assert b"SavePlan" in md and b"WriteItemType" in md
    assert open_megatron(mega / "hybrid_gqa" / "dist").config.n_layers == 4


def test_hostile_payload_inside_real_metadata_is_refused(mega, tmp_path):
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(mega / "hybrid_gqa" / "dist", d)
    f = d / "iter_0000010" / ".metadata"
    md = pickle.loads(f.read_bytes())  # our own fixture, written a moment ago by megatron-core
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    plan = md.all_local_plans[0]
    object.__setattr__(plan, "planner_data", Payload())  # a frozen dataclass, poisoned inside the save plan
    f.write_bytes(pickle.dumps(md))
    with pytest.raises(HybridctlError, match="system") as e:
        open_megatron(d)
    assert "--trust-pickle" in str(e.value)
    assert not marker.exists()
    r = cli("convert", d, "--to", "native", "--out", tmp_path / "o")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "o").exists()


# ---- our exports, loaded back by megatron-core at default strictness ---------------------------------------------


@pytest.mark.parametrize("case", list(MEGATRON_CASES))
def test_export_torch_dist_loads_in_megatron_core(mega, tmp_path, case):
    """Defect 4: megatron-core's dist_checkpointing.load at default strictness (what Megatron-LM uses to resume)
    takes our --to megatron output, and the model it builds equals the original tensor for tensor."""
    out = tmp_path / "meg"
    r = cli("convert", mega / case / "dist", "--to", "megatron", "--out", out)
    assert r.returncode == 0, r.stderr
    cases = write_cases(tmp_path, "case", MEGATRON_CASES[case])
    run_oracle("megatron_oracle.py", "load-dist", out, cases, 1, 1, tmp_path / "dump", cwd=tmp_path)
    ours = rank_dumps(tmp_path / "dump")
    assert_equal_vocab_aware(ours[(0, 0)], load_file(mega / case / "model.safetensors"), case)
    assert ours[(0, 0)].keys() == load_file(mega / case / "model.safetensors").keys()


def test_export_torch_dist_reshards_in_megatron_core(mega, tmp_path):
    """Our torch_dist loaded by megatron-core into TP=2 x PP=2 models equals megatron-core's own resharding."""
    case = "hybrid_gqa"
    out = tmp_path / "meg"
    assert cli("convert", mega / case / "dist", "--to", "megatron", "--out", out).returncode == 0
    cases = write_cases(tmp_path, "case", MEGATRON_CASES[case])
    run_oracle("megatron_oracle.py", "load-dist", out, cases, 2, 2, tmp_path / "dump", cwd=tmp_path)
    assert_ranks_equal(rank_dumps(tmp_path / "dump"), rank_dumps(mega / case / "legacy_tp2_pp2"), case)


@pytest.mark.parametrize("case,tp,pp", [("hybrid_gqa", 2, 2), ("tied_mqa_swiglu", 1, 2)])  # MQA: no TP 2
def test_export_legacy_tp_pp_loads_in_megatron_core(mega, tmp_path, case, tp, pp):
    """--to megatron-legacy --tp 2 --pp 2: every rank file loads strictly into its rank's megatron-core model (no
    missing key; nothing unexpected but TE's core-attention extra state, absent from the local spec) and equals
    megatron-core's own TP2/PP2 resharding (or, for cases resharded otherwise, the original after merging)."""
    out = tmp_path / "leg"
    r = cli("convert", mega / case / "dist", "--to", "megatron-legacy", "--tp", tp, "--pp", pp, "--out", out)
    assert r.returncode == 0, r.stderr
    cases = write_cases(tmp_path, "case", MEGATRON_CASES[case])
    run_oracle("megatron_oracle.py", "load-legacy", out, cases, tp, pp, tmp_path / "dump", cwd=tmp_path)
    ours = rank_dumps(tmp_path / "dump")
    assert len(ours) == tp * pp
    assert [tp, pp] in MEGATRON_CASES[case]["legacy"]
    assert_ranks_equal(ours, rank_dumps(mega / case / f"legacy_tp{tp}_pp{pp}"), case)
    # and read back by us, the whole model equals what megatron-core built
    assert_equal_vocab_aware(megatron_view(open_megatron(out)), load_file(mega / case / "model.safetensors"), case)


@pytest.mark.parametrize("fmt", ["dist", "legacy_tp2_pp2"])
def test_dry_run_on_megatron_fixtures_writes_nothing(mega, tmp_path, fmt):
    src = mega / "hybrid_gqa" / fmt
    before = sorted((p.relative_to(src), p.stat().st_mtime_ns) for p in src.rglob("*"))
    for to in ("hf", "megatron", "megatron-legacy", "native"):
        out = tmp_path / f"o_{to}"
        r = cli("convert", src, "--to", to, "--out", out, "--dry-run")
        assert r.returncode == 0, r.stderr
        assert not out.exists()
    assert sorted((p.relative_to(src), p.stat().st_mtime_ns) for p in src.rglob("*")) == before
    assert not list(tmp_path.iterdir())


# ---- mamba_ssm -----------------------------------------------------------------------------------------------------


def _mamba_ssm_native_view(src) -> dict[str, torch.Tensor]:
    out = {}
    for n in src.specs:
        k = {"embed.weight": "backbone.embedding.weight", "norm_f.weight": "backbone.norm_f.weight",
             "lm_head.weight": "lm_head.weight"}.get(n, f"backbone.{n}")
        out[k] = src.get(n)
    if "lm_head.weight" not in out:  # tied: mamba_ssm's head is the embedding
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out


@pytest.mark.parametrize("case", list(MAMBA_SSM_CASES))
def test_mamba_ssm_save_pretrained_imports_and_converts(mamba_ssm_dir, tmp_path, case):
    ref = load_file(mamba_ssm_dir / f"{case}.safetensors")
    src = open_checkpoint(mamba_ssm_dir / case)
    assert src.config.tie_embeddings == MAMBA_SSM_CASES[case]["tied"]
    ours = _mamba_ssm_native_view(src)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    for to in ("hf", "megatron"):
        dry = cli("convert", mamba_ssm_dir / case, "--to", to, "--out", tmp_path / f"dry_{to}", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert not (tmp_path / f"dry_{to}").exists()
    r = cli("convert", mamba_ssm_dir / case, "--to", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    back = open_checkpoint(tmp_path / "hf")
    for n in src.specs:
        assert torch.equal(back.get(n), src.get(n)), n


# ---- d_inner != expand * hidden (needs ModelConfig.mamba.nheads) ---------------------------------------------------


def test_megatron_core_wide_mamba_dinner_not_multiple_of_hidden(tmp_path):
    tmp = tmp_path / "w"
    tmp.mkdir()
    run_oracle("megatron_oracle.py", "write", tmp / "out", write_cases(tmp, "cases", WIDE_CASES), cwd=tmp)
    case = "wide_mamba"
    src = open_megatron(tmp / "out" / case / "dist")
    assert src.config.mamba_nheads == 10 and src.config.d_inner == 160
    ref = load_file(tmp / "out" / case / "model.safetensors")
    assert_equal_vocab_aware(megatron_view(src), ref, case)
    out = tmp_path / "meg"
    r = cli("convert", tmp / "out" / case / "dist", "--to", "megatron", "--out", out)
    assert r.returncode == 0, r.stderr
    run_oracle("megatron_oracle.py", "load-dist", out, write_cases(tmp_path, "case", WIDE_CASES[case]), 1, 1,
               tmp_path / "dump", cwd=tmp_path)
    assert_equal_vocab_aware(rank_dumps(tmp_path / "dump")[(0, 0)], ref, case)
