"""extend-context: the plan (dry run), bad input (one line, nothing written), the long-context data mix, and the
mechanics of a shortened run (recipe rerunnable by train, resumable checkpoint, complete report, plots)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hybridctl.cli import app
from hybridctl.config import HybridctlError
from hybridctl.data import IGNORE_INDEX, build_loader
from hybridctl.extend_context import DEFAULT_MIX, ntk_rope_base, parse_lengths, parse_mix
from hybridctl.recipe import load_recipe
from hybridctl.tasks import make_task
from hybridctl.tokenizer import build_tokenizer

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (a busy 2-core machine)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny hybrid recorded as trained at 64 tokens (an initialised checkpoint: mechanics, not learning)."""
    d = tmp_path_factory.mktemp("ext") / "base"
    r = runner.invoke(app, ["build", "--preset", "tiny", "--out", str(d), "--set", "max_seq_len=64"])
    assert r.exit_code == 0, r.output
    return d


def _run(*args):
    return runner.invoke(app, ["extend-context", *map(str, args)])


def _one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    msg = r.output.strip()
    assert "\n" not in msg and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_dry_run_plan_writes_nothing(base, tmp_path):
    out = tmp_path / "run"
    r = _run(base, "--seq-len", 256, "--out", out, "--dry-run", "--json", "--steps", 7)
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert not out.exists()
    assert (s["base_seq_len"], s["seq_len"], s["steps"], s["tokens"]) == (64, 256, 7, 7 * 8 * 256)
    m = s["memory"]
    assert m["activations_checkpointed"] < m["activations"] and m["total"] > m["params"] + m["optimizer"]
    assert s["fits"] is True and s["micro_batch"] == 8 and s["activation_checkpointing"] is False
    # planned for the backend that will run: on the CPU the ref scan (model.training_memory(backend="ref"))
    from hybridctl.checkpoint import open_checkpoint
    from hybridctl.model import training_memory

    ref = training_memory(open_checkpoint(base).config, seq_len=256, micro_batch=8, activation_checkpointing=False,
                          compute_bytes=4, backend="ref")
    assert m["backend"] == "ref" and m["total"] == pytest.approx(ref["total"])
    i = s["inference"]  # NoPE hybrid: SSM state + KV of its one attention layer vs an all-attention stack
    assert i["ssm_state_bytes"] > 0 and i["transformer_kv_bytes"] > i["kv_cache_bytes"] > 0
    assert s["rope"] is None and s["eval_lengths"] == [64, 128, 256]
    assert s["data"]["mix"] == DEFAULT_MIX and sum(DEFAULT_MIX.values()) == pytest.approx(1)
    assert s["data"]["task_options"]["needle"] == {"min_context_len": 128}  # max(128, 256 // 16)
    assert s["data"]["min_doc_tokens"] == 65 and s["data"]["short_seq_len"] == 64
    assert s["lr"]["warmup_steps"] >= 1 and s["lr"]["min"] < s["lr"]["peak"]
    table = _run(base, "--seq-len", 256, "--out", out, "--dry-run")
    assert table.exit_code == 0 and "activation" in table.output and "SSM state" in table.output
    assert not out.exists()


@pytest.mark.parametrize("args, needles", [
    (["--seq-len", 64], ["must be above", "64"]),
    (["--seq-len", 128, "--mix", "corpus=0.5,needle=0.2"], ["sum to 1"]),
    (["--seq-len", 128, "--mix", "corpus=0.9,bogus=0.1"], ["unknown component"]),
    (["--seq-len", 128, "--data", "/nonexistent/corpus.txt"], ["not found"]),
    (["--seq-len", 128, "--rope-base", 5e5], ["NoPE"]),
    (["--seq-len", 10**9], ["does not fit"]),
    (["--seq-len", 128, "--short-fraction", 1.5], ["short_fraction"]),
])
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, args, needles):
    out = tmp_path / "run"
    _one_line_error(_run(base, "--out", out, *args), *needles)
    assert not out.exists()


def test_cannot_fit_says_what_would(base, tmp_path):
    r = _run(base, "--out", tmp_path / "r", "--seq-len", 10**9, "--dry-run")
    _one_line_error(r, "micro-batch 1 with activation checkpointing")


def test_unreadable_corpus(base, tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xff" * 100)
    _one_line_error(_run(base, "--out", tmp_path / "r", "--seq-len", 128, "--data", bad, "--dry-run"))
    assert not (tmp_path / "r").exists()


def test_parsers_and_ntk_rule():
    assert parse_mix("corpus=0.9, phonebook=0.05,needle=0.05") == {"corpus": 0.9, "phonebook": 0.05, "needle": 0.05}
    with pytest.raises(HybridctlError, match="sum to 1"):
        parse_mix("corpus=0.9")
    assert parse_lengths(None, 1024, 256) == [256, 512, 1024]
    with pytest.raises(HybridctlError):
        parse_lengths("128,2048", 1024, 256)
    # base' = base * s^(d/(d-2)): d = 64 rotated dims, 4x longer
    assert ntk_rope_base(10000.0, 4096, 16384, 64) == pytest.approx(10000 * 4 ** (64 / 62))


def test_rope_model_gets_the_ntk_base(tmp_path):
    d = tmp_path / "rope"
    r = runner.invoke(app, ["build", "--preset", "tiny", "--out", str(d), "--set", "attention.position=rope",
                            "--set", "max_seq_len=64"])
    assert r.exit_code == 0, r.output
    s = json.loads(_run(d, "--seq-len", 256, "--out", tmp_path / "r", "--dry-run", "--json").output)
    assert s["rope"]["old"] == 10000.0 and s["rope"]["new"] == pytest.approx(ntk_rope_base(1e4, 64, 256, 32))
    s = json.loads(_run(d, "--seq-len", 256, "--out", tmp_path / "r", "--dry-run", "--json",
                        "--rope-base", 5e5).output)
    assert s["rope"]["new"] == 5e5


# ---- the data mix ------------------------------------------------------------------------------------------------

MIX = dict(mix={"corpus": 0.6, "needle": 0.2, "phonebook": 0.2}, short_fraction=0.25, short_seq_len=64,
           min_doc_tokens=257)


def _loader(**kw):
    args = dict(source="builtin", tokenizer=build_tokenizer("byte"), seq_len=256, batch_size=4, **MIX)
    args.update(kw)
    return build_loader(**args)


def test_mixed_loader_resumes_and_shards_exactly():
    a = _loader()
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-safe, as DCP stores it
    want = [next(a) for _ in range(2)]
    b = _loader()
    b.load_state_dict(state)
    got = [next(b) for _ in range(2)]
    for w, g in zip(want, got):
        assert all(torch.equal(w[k], g[k]) for k in w)
    r0, r1 = _loader(batch_size=2, rank=0, world_size=2), _loader(batch_size=2, rank=1, world_size=2)
    one = _loader()
    for _ in range(2):
        x0, x1, full = next(r0), next(r1), next(one)
        assert torch.equal(torch.cat([x0["input_ids"], x1["input_ids"]]), full["input_ids"])
    with pytest.raises(HybridctlError, match="mix"):
        _loader(mix={"corpus": 1.0}).load_state_dict(state)


def test_mixed_rows_follow_the_weights_and_contract():
    L = _loader()
    names = [L.component(r) for r in range(4000)]
    freq = {n: names.count(n) / len(names) for n in set(names)}
    assert freq["short"] == pytest.approx(0.25, abs=0.03)
    assert freq["corpus"] == pytest.approx(0.6 * 0.75, abs=0.03)
    assert freq["needle"] == pytest.approx(0.2 * 0.75, abs=0.03)
    batch, rows = next(L), [L.component(r) for r in range(4)]
    for row, name in enumerate(rows):
        s = batch["seq_idx"][row]
        assert s[0] == 0 and bool((s[1:] >= s[:-1]).all())
        if name == "short":  # 4 sequences of 64 tokens, each its own document
            assert s.tolist() == [j // 64 for j in range(256)]
        if name == "corpus":  # one long document fills the row (documents of >= 257 tokens only)
            assert int(s.max()) == 0 and bool((batch["labels"][row] != IGNORE_INDEX).all())


def test_needle_training_task_targets_the_key():
    tok = build_tokenizer("byte")
    task = make_task("needle", tok, 300, 0, "train", {})
    doc = task.example(3)
    assert len(doc.ids) <= 301
    text = tok.decode(doc.ids[doc.targets].tolist())
    prompt = tok.decode(doc.ids[~doc.targets].tolist())
    assert text.strip().isdigit() and len(text.strip()) == 5 and f"The pass key is {text.strip()}." in prompt
    assert np.array_equal(make_task("needle", tok, 300, 0, "train", {}).example(3).ids, doc.ids)


def test_needle_min_context_len_packs_several_examples_per_row():
    """min_context_len: example lengths spread log-uniformly between it and the row; each is the evaluation's
    layout (the same prompt text needle_examples builds, up to the filler count) with only the key as a target."""
    from hybridctl.tasks import needle_examples

    tok = build_tokenizer("byte")
    task = make_task("needle", tok, 1024, 0, "train", {"min_context_len": 128})
    sizes = [len(task.example(i).ids) for i in range(200)]
    assert 100 <= min(sizes) <= 200 and max(sizes) > 800 and np.median(sizes) < 512
    doc = task.example(7)
    prompt = tok.decode(doc.ids[:int(np.flatnonzero(doc.targets)[0])].tolist())
    key = tok.decode(doc.ids[doc.targets].tolist()).strip()
    ref = needle_examples(tok, len(doc.ids), n=1, depth=0.0)[0].prompt_text
    assert prompt.endswith(ref[ref.index("\n"):]) and f"The pass key is {key}. Remember it." in prompt
    assert prompt.startswith("The grass is green.") or prompt.startswith("The pass key is")
    with pytest.raises(HybridctlError, match="min_context_len"):
        make_task("needle", tok, 256, 0, "train", {"min_context_len": 999})
    rows = build_loader(source="builtin", tokenizer=tok, seq_len=1024, batch_size=8, mix={"needle": 1.0},
                        task_options={"needle": {"min_context_len": 128}})
    b = next(rows)
    docs = [int(b["seq_idx"][r].max()) for r in range(8)]  # examples (+ padding) per row
    assert np.mean(docs) >= 1.5  # whole examples per row: about 2 (the rest padding)
    with pytest.raises(HybridctlError, match="maps a task"):
        build_loader(source="builtin", tokenizer=tok, seq_len=256, batch_size=1, mix={"corpus": 1.0},
                     task_options={"min_context_len": 128})


# ---- a shortened run ---------------------------------------------------------------------------------------------


def test_extend_run_mechanics(base, tmp_path):
    """64 → 320, 4 steps: recipe written and rerunnable by train, checkpoint resumed with --resume auto, the export
    records the trained length, the report is complete and the plots exist."""
    out = tmp_path / "run"
    r = _run(base, "--seq-len", 320, "--out", out, "--steps", 4, "--eval-examples", 1, "--eval-lengths", "320",
             "--set", "checkpoint.interval=2", "--set", "optim.global_batch=4", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["train"]["steps"] == 4
    rep = json.loads((out / "report.json").read_text())
    for when in ("before", "after"):
        ev = rep[when]
        assert ev["perplexity"]["buckets"] and ev["perplexity"]["ppl_beyond_base"] > 1
        assert {(x["length"], x["depth"]) for x in ev["needle"]} == {(320, d) for d in (0, .25, .5, .75, 1)}
        assert [x["length"] for x in ev["phonebook"]] == [320]
    assert set(rep["compare"]) == {"ppl_within_base", "ppl_beyond_base", "short_context_loss", "phonebook", "needle"}
    sc = rep["compare"]["short_context_loss"]
    assert sc["before"] == pytest.approx(np.log(rep["compare"]["ppl_within_base"]["before"]))
    assert sc["change"] == pytest.approx(sc["after"] / sc["before"] - 1)
    for png in ("accuracy_needle.png", "accuracy_phonebook.png", "needle_heatmap.png", "perplexity_by_position.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["model"]["max_seq_len"] == 320
    rec = load_recipe(out / "recipe.toml")
    assert (rec.model.init_from, rec.data.seq_len, rec.data.mix) == (str(base), 320, rep["plan"]["data"]["mix"])
    # train reruns the saved recipe, resuming the run's newest checkpoint
    r2 = runner.invoke(app, ["train", str(out / "recipe.toml"), "--set", "optim.steps=6", "--resume", "auto",
                             "--device", "cpu", "--json"])
    assert r2.exit_code == 0, r2.output
    t = json.loads(r2.output)
    assert t["resumed_from"] and t["resumed_from"].endswith("4") and t["steps"] == 6
