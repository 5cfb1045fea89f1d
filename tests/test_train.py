"""Training: schedules, weight-decay groups, bit-exact resume, crash-safe checkpoints, no leakage between packed
documents, 2-process FSDP2 (gloo) vs one process, the README's main job through the CLI, init_from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hybridctl import parallel
from hybridctl.checkpoint import load_model, open_checkpoint
from hybridctl.cli import app
from hybridctl.config import HybridctlError
from hybridctl.recipe import load_recipe, resolve_recipe
from hybridctl.train import (
    IGNORE_INDEX,
    build_optimizer,
    build_training_model,
    find_checkpoint,
    lm_loss_sum,
    lr_at,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.seq_len=64", "optim.micro_batch=2", "optim.global_batch=4", "optim.lr=3e-3", "optim.min_lr=3e-4",
         "optim.warmup_steps=2", "eval.batches=1", "logging.interval=1", "logging.progress=false"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _recipe(tmp_path: Path, *sets: str, steps: int = 6):
    return resolve_recipe({"name": "t", "optim": {"steps": steps}, "checkpoint": {"dir": str(tmp_path / "run")}},
                          SMALL + list(sets))


def _single() -> parallel.DistInfo:
    return parallel.DistInfo(0, 1, torch.device("cpu"))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    src = open_checkpoint(path)
    return {k: src.get(k) for k in src.specs}


# ---- schedule, optimizer ------------------------------------------------------------------------------------------


def test_lr_schedules():
    r = resolve_recipe({"optim": {"steps": 100, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}})
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(10, r) == pytest.approx(1.0) and lr_at(100, r) == pytest.approx(0.1)
    assert lr_at(55, r) == pytest.approx(0.55)  # cosine midpoint
    w = resolve_recipe({"optim": {"steps": 100, "lr": 1.0, "min_lr": 0.1, "schedule": "wsd", "decay_fraction": 0.2}})
    assert lr_at(0, w) == 1.0 and lr_at(79, w) == 1.0 and lr_at(99, w) == pytest.approx(0.1)
    assert lr_at(89, w) == pytest.approx(1.0 - 0.9 * 10 / 20)
    c = resolve_recipe({"optim": {"steps": 100, "lr": 0.5, "schedule": "constant"}})
    assert {lr_at(s, c) for s in range(20, 100)} == {0.5}


def test_no_weight_decay_on_ssm_params_norms_and_biases(tmp_path):
    r = _recipe(tmp_path)
    cfg = r.model_config()
    model, no_decay = build_training_model(cfg, r, None, _single())
    opt = build_optimizer(model, no_decay, r, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    for n in plain:
        assert n.split(".")[-1] in ("A_log", "D", "dt_bias", "weight", "bias") and ("norm" in n or n.split(".")[-1]
                                                                                    in ("A_log", "D", "dt_bias",
                                                                                        "bias")), n
    assert "layers.0.mixer.A_log" in plain and "layers.0.mixer.conv1d.bias" in plain and "norm_f.weight" in plain
    assert "layers.0.mixer.in_proj.weight" in decayed and "embed.weight" in decayed


# ---- resume -------------------------------------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path):
    whole = train(recipe=_recipe(tmp_path / "a", steps=4), progress=False)
    first = train(recipe=_recipe(tmp_path / "b", steps=4), max_steps=2, progress=False)
    assert first.steps == 2 and find_checkpoint(tmp_path / "b" / "run").name == "step_00000002"
    second = train(recipe=_recipe(tmp_path / "b", steps=4), resume="auto", progress=False)
    assert second.resumed_from is not None and second.steps == 4
    assert first.losses + second.losses == whole.losses  # bit-exact on CPU
    wa, wb = _weights(whole.export), _weights(second.export)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    # finished: resuming again runs nothing
    again = train(recipe=_recipe(tmp_path / "b", steps=4), resume="auto", progress=False)
    assert again.losses == [] and again.steps == 4
    with pytest.raises(HybridctlError, match="no complete checkpoint"):
        train(recipe=_recipe(tmp_path / "c"), resume=str(tmp_path / "nothing"), progress=False)


def test_crash_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    r = _recipe(tmp_path, "checkpoint.interval=2", steps=4)
    real_save, calls = dcp.save, []

    def failing_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # the step-4 checkpoint dies half-written
            real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)
            raise OSError("disk full")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(recipe=r, progress=False)
    monkeypatch.setattr(dcp, "save", real_save)
    ckroot = tmp_path / "run" / "checkpoints"
    assert (ckroot / ".step_00000004.tmp").is_dir()  # the torn write is left as it was...
    # ...and so is a directory that looks like a checkpoint but was never completed
    (ckroot / "step_00000009").mkdir()
    (ckroot / "step_00000009" / ".metadata").write_bytes(b"junk")
    assert find_checkpoint(tmp_path / "run") == ckroot / "step_00000002"
    resumed = train(recipe=r, resume="auto", progress=False)
    assert resumed.resumed_from == ckroot / "step_00000002" and resumed.steps == 4
    reference = train(recipe=_recipe(tmp_path / "ref", "checkpoint.interval=2", steps=4), progress=False)
    assert resumed.losses == reference.losses[2:]
    assert not (ckroot / ".step_00000004.tmp").exists() and (ckroot / "latest").read_text().strip() == \
        "step_00000004"


def test_keep_last_prunes_old_checkpoints(tmp_path):
    r = _recipe(tmp_path, "checkpoint.interval=1", "checkpoint.keep_last=2", "checkpoint.export=false", steps=4)
    res = train(recipe=r, progress=False)
    left = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert left == ["step_00000003", "step_00000004"] and res.export is None


# ---- packing --------------------------------------------------------------------------------------------------------


def _document_gradients(pattern: str, tmp_path: Path, use_seq_idx: bool = True) -> tuple[float, float]:
    """(max |d loss(document 1) / d embedding| over document 0's positions, the same over document 1's)."""
    r = _recipe(tmp_path, f"model.config.pattern='{pattern}'")
    model, _ = build_training_model(r.model_config(), r, None, _single())
    T, cut = 40, 17  # chunk_size 32: the boundary falls inside the first chunk, the second chunk is document 1 only
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))
    seq_idx = torch.cat([torch.zeros(1, cut, dtype=torch.int32), torch.ones(1, T - cut, dtype=torch.int32)], 1)
    captured = {}

    def keep(_m, _i, out):
        out.retain_grad()
        captured["emb"] = out

    model.embed.register_forward_hook(keep)
    labels = torch.roll(ids, -1, 1)
    labels[:, :cut] = IGNORE_INDEX  # the loss sees document 1 only
    labels[:, -1] = IGNORE_INDEX
    lm_loss_sum(model(ids, seq_idx=seq_idx if use_seq_idx else None), labels).backward()
    g = captured["emb"].grad[0]
    return g[:cut].abs().max().item(), g[cut:].abs().max().item()


def test_packed_documents_do_not_leak(tmp_path):
    """d loss(document 1) / d embeddings(document 0) through the full model (Mamba-2, attention, MLP layers)."""
    for pattern in ("*-", "-"):  # attention and MLP: exactly zero
        leak, inside = _document_gradients(pattern, tmp_path)
        assert leak == 0.0 and inside > 0, pattern
    leak, inside = _document_gradients("M*-M*-", tmp_path)  # Mamba-2 (scan and conv) too: exactly zero
    assert leak == 0.0 and inside > 0, (leak, inside)
    leak, inside = _document_gradients("M*-M*-", tmp_path, use_seq_idx=False)  # control: without document ids
    assert leak > 1e-4 * inside  # the loss does reach document 0


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    base = train(recipe=_recipe(tmp_path / "a", "checkpoint.export=false", steps=2), progress=False)
    ac = train(recipe=_recipe(tmp_path / "b", "checkpoint.export=false", "parallel.activation_checkpointing=true",
                              steps=2), progress=False)
    assert ac.losses == pytest.approx(base.losses, rel=1e-6, abs=1e-6)


def test_compile_keeps_names_and_results(tmp_path):
    """apply_compile through Dynamo (backend="eager": tracing without code generation, fast on CPU). In fp64: the
    compiled graph takes the masked-tap document conv, eager CPU the dense conv + recomputed starts (ref.causal_conv1d),
    so in fp32 they differ by rounding (~1e-6 on these summed-loss gradients); in fp64 they must agree to 1e-10."""
    r = _recipe(tmp_path)
    plain, _ = build_training_model(r.model_config(), r, None, _single())
    compiled, _ = build_training_model(r.model_config(), r, None, _single())
    plain.double(), compiled.double()
    parallel.apply_compile(compiled, backend="eager")
    assert list(compiled.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 256, (2, 48))
    seq_idx = (torch.arange(48) >= 20).int().expand(2, -1)
    for m in (plain, compiled):
        lm_loss_sum(m(ids, seq_idx=seq_idx), ids).backward()
    for (n, a), b in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=n)


# ---- several processes ------------------------------------------------------------------------------------------------


def test_torchrun_two_process_fsdp2_gloo_matches_one_process(tmp_path):
    sets = [a for s in SMALL + ["checkpoint.export=true"] for a in ("--set", s)]
    recipe = ROOT / "recipes" / "tiny.toml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hybridctl", "train", str(recipe), *sets, "--max-steps", "3", "--device", "cpu",
           "--run-dir", str(tmp_path / "ddp"), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HYBRIDCTL_DEBUG="1")
    # own session: on a timeout the whole group (torchrun and its workers) is killed, never left behind
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["steps"] == 3
    one = train(recipe=load_recipe(recipe, SMALL), run_dir=tmp_path / "one", max_steps=3, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    multi = [x["loss"] for x in rows if "loss" in x]
    assert multi == pytest.approx(one.losses, rel=1e-5, abs=1e-5)
    wa, wb = _weights(tmp_path / "ddp" / "final"), _weights(one.export)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    # the 2-rank DCP checkpoint resumes in one process (resharded by DCP)
    more = train(recipe=load_recipe(recipe, SMALL), run_dir=tmp_path / "ddp", max_steps=4, progress=False)
    assert more.resumed_from is not None and more.steps == 4


# ---- the README's main job, init_from -------------------------------------------------------------------------------


def test_cli_tiny_recipe_end_to_end_and_export_loads(tmp_path):
    args = ["train", str(ROOT / "recipes" / "tiny.toml"), "--run-dir", str(tmp_path / "tiny"), "--max-steps", "4",
            "--device", "cpu", "--json"] + [a for s in SMALL for a in ("--set", s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout[res.stdout.index("{"):])
    assert s["steps"] == 4 and s["tokens"] == 4 * 4 * 64 and s["eval_loss"] > 0 and s["final_loss"] > 0
    model, src = load_model(s["export"])
    assert src.tokenizer_dir is not None and src.info["trained_steps"] == 4
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, model.cfg.vocab_size) and torch.isfinite(logits).all()
    gen = CliRunner().invoke(app, ["generate", s["export"], "--prompt", "The", "--max-new-tokens", "5", "--device",
                                   "cpu", "--json"])
    assert gen.exit_code == 0, gen.output
    saved = load_recipe(tmp_path / "tiny" / "recipe.toml")
    assert saved.data.seq_len == 64 and saved.model_config() == load_recipe(ROOT / "recipes" / "tiny.toml")\
        .model_config()
    bad = CliRunner().invoke(app, ["train", str(ROOT / "recipes" / "tiny.toml"), "--set", "optim.lrr=1"])
    assert bad.exit_code == 1 and "did you mean optim.lr?" in bad.output


def test_init_from_a_checkpoint(tmp_path):
    first = train(recipe=_recipe(tmp_path / "a", steps=2), progress=False)
    r = load_recipe(ROOT / "recipes" / "tiny.toml", SMALL + ["optim.steps=1", f"checkpoint.dir={tmp_path / 'b'}"],
                    init_from=str(first.export))  # what --init-from does: the recipe's model section is replaced
    assert r.model.init_from == str(first.export) and r.model.preset is None
    from hybridctl.train import resolve_model

    cfg, src = resolve_model(r)
    model, _ = build_training_model(cfg, r, src, _single())
    ref = _weights(first.export)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    res = train(recipe=r, progress=False)
    assert res.steps == 1 and res.losses[0] < first.losses[0]


def test_phonebook_recipe_reports_accuracy(tmp_path):
    r = load_recipe(ROOT / "recipes" / "phonebook.toml", ["data.seq_len=96", "optim.micro_batch=2",
                                                           "optim.global_batch=2", "eval.batches=1",
                                                           "logging.progress=false", "checkpoint.export=false"])
    res = train(recipe=r, run_dir=tmp_path / "pb", max_steps=2, progress=False)
    assert res.eval_accuracy is not None and 0.0 <= res.eval_accuracy <= 1.0


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    """A .metadata pickle that would execute code on load is refused; the marker file never appears."""
    import os
    import pickle

    from hybridctl.train import find_checkpoint

    rd = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", str(ROOT / "recipes" / "tiny.toml"), "--run-dir", str(rd), "--max-steps",
                                 "1", "--set", "optim.steps=2", "--set", "data.seq_len=32", "--set",
                                 "optim.micro_batch=2", "--set", "optim.global_batch=2", "--set", "eval.batches=1"])
    assert r.exit_code == 0, r.output
    ckpt = find_checkpoint(rd)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    r = CliRunner().invoke(app, ["train", str(ROOT / "recipes" / "tiny.toml"), "--run-dir", str(rd), "--set",
                                 "optim.steps=2", "--set", "data.seq_len=32", "--set", "optim.micro_batch=2",
                                 "--set", "optim.global_batch=2", "--set", "eval.batches=1"])
    assert r.exit_code == 1 and "hybridctl: error:" in r.stderr
    assert not marker.exists()


def test_resuming_from_an_older_checkpoint_abandons_the_later_ones(tmp_path):
    from hybridctl.train import find_checkpoint

    rd = tmp_path / "run"
    common = ["--run-dir", str(rd), "--set", "optim.steps=6", "--set", "data.seq_len=32", "--set",
              "optim.micro_batch=2", "--set", "optim.global_batch=2", "--set", "eval.batches=1", "--set",
              "checkpoint.interval=3", "--set", "checkpoint.keep_last=2", "--set", "checkpoint.export=false"]
    tiny = str(ROOT / "recipes" / "tiny.toml")
    assert CliRunner().invoke(app, ["train", tiny, *common]).exit_code == 0
    ckpts = rd / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003", "step_00000006"]
    r = CliRunner().invoke(app, ["train", tiny, *common, "--resume", str(ckpts / "step_00000003"), "--max-steps", "4"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert find_checkpoint(rd).name == "step_00000004"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    # steps 3-4 are logged, then the step-4 checkpoint is lost (a crash before it completed): resuming from step 2
    # repeats steps 3-4, which must not appear twice in metrics.jsonl
    r = _recipe(tmp_path, "checkpoint.interval=2", "eval.interval=2", "checkpoint.export=false", steps=4)
    train(recipe=r, progress=False)
    ckroot = tmp_path / "run" / "checkpoints"
    import shutil

    shutil.rmtree(ckroot / "step_00000004")
    (ckroot / "latest").write_text("step_00000002\n")
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 5, "lo')  # a torn last line
    resumed = train(recipe=r, resume="auto", progress=False)
    assert resumed.resumed_from == ckroot / "step_00000002" and resumed.steps == 4
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in rows if "eval_loss" in x] == [2, 4]


def test_evaluation_batches_are_built_once_and_replayed(tmp_path, monkeypatch):
    from hybridctl import train as train_mod

    real, splits = train_mod.build_data, []

    def counting(recipe, tokenizer, info, split):
        splits.append(split)
        return real(recipe, tokenizer, info, split)

    monkeypatch.setattr(train_mod, "build_data", counting)
    r = _recipe(tmp_path, "eval.interval=1", "checkpoint.export=false", steps=3)
    train(recipe=r, progress=False)
    assert splits.count("eval") == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "eval_loss" in x] == [1, 2, 3]
    monkeypatch.setattr(train_mod, "build_data", real)
    # the same numbers as a loader rebuilt for the evaluation
    from hybridctl.model import build_model, materialize
    from hybridctl.tokenizer import build_tokenizer

    tok, info = build_tokenizer("byte"), _single()
    model = materialize(build_model(r.model_config()), torch.device("cpu"), seed=0)
    fresh = train_mod.evaluate(model, real(r, tok, info, "eval"), r, info)
    replayed = train_mod._EvalBatches(r, tok, info)
    assert train_mod.evaluate(model, iter(replayed), r, info) == fresh == \
        train_mod.evaluate(model, iter(replayed), r, info)
