"""Interop with the real producers: megatron-core 0.19 and mamba_ssm write the fixtures and load our exports back.

The producers live in the oracle venv (tests/oracles/make_venv.sh, built by .ci/run); its python is
``HYBRIDCTL_ORACLE_PYTHON`` (or ./.venv-oracle/bin/python). In CI (CI=true) a missing oracle FAILS these tests;
locally they skip. megatron-core is launched twice per session, each launch one batch of jobs in a set of gloo
processes that import megatron-core once (tests/oracles/megatron_oracle.py): first it writes every fixture
(its own dist_checkpointing.save with a training-like common state, its TP/PP resharding into legacy per-rank files,
each with a safetensors dump of the exact tensors it built), then, after our CLI has converted them, it loads all of
our exports back. mamba_ssm's save_pretrained writes its fixtures in one more process. hybridctl runs in-process
(typer's CliRunner).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridctl.checkpoint import open_checkpoint
from hybridctl.checkpoint.megatron import open_megatron
from hybridctl.checkpoint.megatron_keys import all_entries
from hybridctl.cli import app
from hybridctl.config import HybridctlError

REPO = Path(__file__).resolve().parent.parent
ORACLES = REPO / "tests" / "oracles"
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")

_BASE = dict(hidden=64, heads=4, head_dim=16, ffn=96, d_state=16, headdim=16, vocab=300, padded_vocab=384)
MEGATRON_CASES = {
    # GQA (4 heads / 2 groups), 2 Mamba groups, untied, squared-ReLU MLP, padded vocab (300 -> 384)
    "hybrid_gqa": dict(_BASE, pattern="M*M-", kv=2, ngroups=2, mamba_heads=8, act="relu2", tied=False, seed=1,
                       legacy=[[2, 2], [2, 1]]),
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
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.fail(f"{script} {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


def run_batch(jobs: list[dict], tmp: Path) -> list[str]:
    """One megatron-core launch for all ``jobs``; each job's status ("ok" or its error)."""
    f, res = tmp / "jobs.json", tmp / "result.json"
    f.write_text(json.dumps(jobs))
    run_oracle("megatron_oracle.py", "batch", f, res, cwd=tmp)
    status = json.loads(res.read_text())
    return [status[str(i)] for i in range(len(jobs))]


def write_cases(tmp: Path, name: str, cases: dict) -> Path:
    f = tmp / f"{name}.json"
    f.write_text(json.dumps(cases))
    return f


ALL_CASES = {**MEGATRON_CASES, **WIDE_CASES}


@pytest.fixture(scope="session")
def mega(tmp_path_factory) -> Path:
    """megatron-core's own checkpoints of every case: dist, legacy TP1 and its TP/PP reshardings (one launch)."""
    tmp = tmp_path_factory.mktemp("megatron_oracle")
    out = tmp / "out"
    jobs = [{"kind": "write", "case": c, "out": str(out / name)} for name, c in ALL_CASES.items()]
    jobs += [{"kind": "reshard", "case": c, "tp": tp, "pp": pp, "ckpt": str(out / name / "dist" / "iter_0000010"),
              "dump": str(out / name / f"legacy_tp{tp}_pp{pp}")}
             for name, c in ALL_CASES.items() for tp, pp in c["legacy"]]
    bad = [(j["kind"], s) for j, s in zip(jobs, run_batch(jobs, tmp)) if s != "ok"]
    if bad:
        pytest.fail(f"megatron-core could not write the fixtures: {bad[0][0]}: {bad[0][1]}")
    return out


@dataclass
class LoadBack:
    """One of our exports (CLI exit code and stderr) and what megatron-core made of it (status, rank dumps)."""

    out: Path
    exit_code: int
    stderr: str
    status: str = "not run"
    dump: Path | None = None


# (export, case, TP, PP) loaded back into megatron-core: torch_dist at TP1 and resharded to TP2 x PP2 by
# megatron-core itself; legacy per-rank files written by us at TP/PP (MQA: no TP 2)
LEGACY_EXPORTS = [("hybrid_gqa", 2, 2), ("hybrid_gqa", 2, 1), ("tied_mqa_swiglu", 1, 2)]
LOADBACK = [("megatron", c, 1, 1) for c in ALL_CASES] + [("megatron", "hybrid_gqa", 2, 2)] + [
    ("megatron-legacy", c, tp, pp) for c, tp, pp in LEGACY_EXPORTS]


@pytest.fixture(scope="session")
def loadback(mega, tmp_path_factory) -> dict[tuple, LoadBack]:
    """Our CLI converts megatron-core's dist fixtures; megatron-core loads every export back (one launch)."""
    tmp = tmp_path_factory.mktemp("loadback")
    res: dict[tuple, LoadBack] = {}
    jobs, keys = [], []
    for to, case, tp, pp in LOADBACK:
        out = tmp / f"{to}_{case}" if to == "megatron" else tmp / f"{to}_{case}_tp{tp}_pp{pp}"
        if not out.exists():
            extra = ["--tp", tp, "--pp", pp] if to == "megatron-legacy" else []
            r = cli("convert", mega / case / "dist", "--to", to, "--out", out, *extra)
            res[(to, case, tp, pp)] = lb = LoadBack(out, r.exit_code, r.stderr)
        else:
            prev = next(v for v in res.values() if v.out == out)
            res[(to, case, tp, pp)] = lb = LoadBack(out, prev.exit_code, prev.stderr)
        if lb.exit_code == 0:
            lb.dump = tmp / f"dump_{to}_{case}_tp{tp}_pp{pp}"
            jobs.append({"kind": "load-dist" if to == "megatron" else "load-legacy", "case": ALL_CASES[case],
                         "tp": tp, "pp": pp, "ckpt": str(out), "dump": str(lb.dump)})
            keys.append((to, case, tp, pp))
    for k, status in zip(keys, run_batch(jobs, tmp) if jobs else []):
        res[k].status = status
    return res


def loaded(lb: dict, key: tuple) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """The rank dumps of one load-back, after asserting that our export was written and megatron-core loaded it."""
    b = lb[key]
    assert b.exit_code == 0, b.stderr
    assert b.status == "ok", b.status
    return rank_dumps(b.dump)


@pytest.fixture(scope="session")
def mamba_ssm_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mamba_ssm_oracle")
    run_oracle("mamba_ssm_oracle.py", "write", tmp / "out", write_cases(tmp, "cases", MAMBA_SSM_CASES), cwd=tmp)
    return tmp / "out"


_runner = CliRunner()


def cli(*args: str | Path):
    """hybridctl in-process (exit_code, stdout, stderr)."""
    return _runner.invoke(app, [str(a) for a in args])


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
    assert r.exit_code == 1 and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "o").exists()


# ---- our exports, loaded back by megatron-core at default strictness ---------------------------------------------


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_export_torch_dist_loads_in_megatron_core(mega, loadback, case):
    """Defect 4: megatron-core's dist_checkpointing.load at default strictness (what Megatron-LM uses to resume)
    takes our --to megatron output, and the model it builds equals the original tensor for tensor."""
    ours = loaded(loadback, ("megatron", case, 1, 1))
    ref = load_file(mega / case / "model.safetensors")
    assert_equal_vocab_aware(ours[(0, 0)], ref, case)
    assert ours[(0, 0)].keys() == ref.keys()


def test_export_torch_dist_reshards_in_megatron_core(mega, loadback):
    """Our torch_dist loaded by megatron-core into TP=2 x PP=2 models equals megatron-core's own resharding."""
    ours = loaded(loadback, ("megatron", "hybrid_gqa", 2, 2))
    assert_ranks_equal(ours, rank_dumps(mega / "hybrid_gqa" / "legacy_tp2_pp2"), "hybrid_gqa")


@pytest.mark.parametrize("case,tp,pp", LEGACY_EXPORTS)  # MQA (one KV head): no TP 2
def test_export_legacy_tp_pp_loads_in_megatron_core(mega, loadback, case, tp, pp):
    """--to megatron-legacy --tp/--pp: every rank file loads into its rank's megatron-core model with nothing missing
    and nothing unexpected but TE core attention's extra state (the oracle's local-spec model has no such module;
    see megatron_oracle._legacy_load) and equals megatron-core's own TP/PP resharding."""
    ours = loaded(loadback, ("megatron-legacy", case, tp, pp))
    assert len(ours) == tp * pp
    assert [tp, pp] in MEGATRON_CASES[case]["legacy"]
    assert_ranks_equal(ours, rank_dumps(mega / case / f"legacy_tp{tp}_pp{pp}"), case)
    # and read back by us, the whole model equals what megatron-core built
    out = loadback[("megatron-legacy", case, tp, pp)].out
    assert_equal_vocab_aware(megatron_view(open_megatron(out)), load_file(mega / case / "model.safetensors"), case)


def test_legacy_export_carries_no_extra_state_megatron_core_lacks(loadback):
    """Strictness, the other way: no key in our legacy files for a module that has no extra state in any
    megatron-core spec (the Mamba gated norm is mamba_ssm's RMSNormGated in both); only the TE core attention's
    (TE spec) beyond what the local-spec model loads."""
    out = loadback[("megatron-legacy", "hybrid_gqa", 2, 2)].out
    for f in out.rglob("model_optim_rng.pt"):
        keys = torch.load(f, weights_only=False)["model"].keys()  # our own file
        assert not [k for k in keys if k.endswith("mixer.norm._extra_state")], f
        assert [k for k in keys if k.endswith("_extra_state")], f


@pytest.mark.parametrize("fmt", ["dist", "legacy_tp2_pp2"])
def test_dry_run_on_megatron_fixtures_writes_nothing(mega, tmp_path, fmt):
    src = mega / "hybrid_gqa" / fmt
    before = sorted((p.relative_to(src), p.stat().st_mtime_ns) for p in src.rglob("*"))
    for to in ("hf", "megatron", "megatron-legacy", "native"):
        out = tmp_path / f"o_{to}"
        r = cli("convert", src, "--to", to, "--out", out, "--dry-run")
        assert r.exit_code == 0, r.stderr
        assert not out.exists() and r.stdout.strip()
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
        assert dry.exit_code == 0, dry.stderr
        assert not (tmp_path / f"dry_{to}").exists()
    r = cli("convert", mamba_ssm_dir / case, "--to", "hf", "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.stderr
    back = open_checkpoint(tmp_path / "hf")
    for n in src.specs:
        assert torch.equal(back.get(n), src.get(n)), n
    _greedy_parity_through_transformers(mamba_ssm_dir / case, tmp_path / "hf")


def _greedy_parity_through_transformers(ours_dir: Path, hf_dir: Path) -> None:
    """mamba_ssm's forward needs CUDA, so generation is checked against transformers' Mamba2ForCausalLM (torch path)
    on our HF export of the same tensors: our greedy ids from the mamba_ssm directory equal transformers' (its
    logits within 1e-4, fp32)."""
    import importlib.util
    import sys

    transformers = pytest.importorskip("transformers")
    from hybridctl.checkpoint import load_model
    from hybridctl.generate import generate

    prompt, new = [5, 17, 42, 3, 99, 7], 4
    with pytest.MonkeyPatch.context() as mp:
        for name in ("mamba_ssm", "causal_conv1d"):  # pin transformers to its torch path
            if name in sys.modules or importlib.util.find_spec(name) is not None:
                mp.setitem(sys.modules, name, None)
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        ids = list(prompt)
        with torch.no_grad():
            ref_logits = ref(torch.tensor([ids])).logits[0]
            for _ in range(new):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    model, _ = load_model(ours_dir, dtype=torch.float32)
    with torch.no_grad():
        our_logits = model(torch.tensor([prompt]))[0]
    assert (our_logits - ref_logits).abs().max().item() <= 1e-4 * max(1.0, ref_logits.abs().max().item())
    got = generate(model, [prompt], max_new_tokens=new, use_eos=False, fast_cpu=False).tokens[0]
    assert got == ids[len(prompt):]


# ---- d_inner != expand * hidden (needs ModelConfig.mamba.nheads) ---------------------------------------------------


def test_megatron_core_wide_mamba_dinner_not_multiple_of_hidden(mega, loadback):
    """d_inner = 10 heads x 16 = 2.5 x hidden, written by megatron-core: read exactly, and our export loads back."""
    case = "wide_mamba"
    src = open_megatron(mega / case / "dist")
    assert src.config.mamba_nheads == 10 and src.config.d_inner == 160
    ref = load_file(mega / case / "model.safetensors")
    assert_equal_vocab_aware(megatron_view(src), ref, case)
    assert_equal_vocab_aware(loaded(loadback, ("megatron", case, 1, 1))[(0, 0)], ref, case)
