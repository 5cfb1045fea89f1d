"""bench (issue 16): task sweeps, plots, the speed grid on the decode runtime, the JSON schema, dry-run, bad input."""

from __future__ import annotations

import pytest
import torch

from hybridctl.config import HybridctlError, preset
from hybridctl.model import build_model, materialize
from hybridctl.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return materialize(build_model(preset("tiny")), "cpu", seed=0).eval()


def oracle(examples_by_prompt: dict, tok):
    """A GreedyFn that answers every known prompt correctly (the scorer's plumbing, not the model, is under test)."""
    def run(prompts, max_new_tokens):
        return [tok.encode(examples_by_prompt[tuple(p)], add_bos=False)[:max_new_tokens] for p in prompts]
    return run


# ---- task sweeps ----------------------------------------------------------------------------------------------------


def test_sweep_task_scores_through_exact_match_and_rows_are_well_formed(tiny):
    from hybridctl.tasks import needle_examples
    from hybridctl.task_eval import ROW_KEYS, sweep_task

    tok = ByteTokenizer()
    answers = {}
    for length in (160, 224):
        for d in (0.0, 1.0):
            for e in needle_examples(tok, length, n=2, depth=d, seed=3):
                answers[tuple(e.prompt)] = e.answer_text
    rows = sweep_task(tiny, tok, "needle", [160, 224], [0.0, 1.0], n=2, seed=3, generate=oracle(answers, tok),
                      records=True)
    assert [(r["length"], r["depth"]) for r in rows] == [(160, 0.0), (160, 1.0), (224, 0.0), (224, 1.0)]
    for r in rows:
        assert set(ROW_KEYS) <= set(r) and r["accuracy"] == 1.0 and r["correct"] == r["examples"] == 2
        assert r["prompt_tokens_max"] <= r["length"]
        assert all(rec["correct"] and "pass key" not in rec["output"] for rec in r["records"])
    wrong = sweep_task(tiny, tok, "needle", [160], [0.5], n=2, generate=lambda ps, k: [[65] * k for _ in ps])
    assert wrong[0]["accuracy"] == 0.0


def test_sweep_task_on_the_runtime_gives_an_accuracy(tiny, one_thread):
    from hybridctl.task_eval import sweep_task

    tok = ByteTokenizer()
    rows = sweep_task(tiny, tok, "copy", [48, 64], n=2)
    assert len(rows) == 2 and all(0.0 <= r["accuracy"] <= 1.0 and r["examples"] == 2 for r in rows)
    pb = sweep_task(tiny, tok, "phonebook", [600], [0.5], n=1, layouts=("standard", "reversed"))
    assert [r["layout"] for r in pb] == ["standard", "reversed"] and all(0 <= r["accuracy"] <= 1 for r in pb)


@pytest.mark.parametrize("args, match", [
    (("sudoku", [64]), "unknown task"),
    (("needle", [0]), "positive integers"),
    (("needle", [128], [1.5]), r"\[0, 1\]"),
    (("copy", [64], [0.5]), "no depth"),
])
def test_sweep_task_bad_input_is_one_clear_error(tiny, args, match):
    from hybridctl.task_eval import sweep_task

    with pytest.raises(HybridctlError, match=match):
        sweep_task(tiny, ByteTokenizer(), *args)


# ---- plots ----------------------------------------------------------------------------------------------------------


def _speed_rows():
    rows = []
    for model, scale in (("a", 1.0), ("b", 2.0)):
        for b in (1, 4):
            for L in (64, 256, 1024):
                rows.append({"model": model, "batch": b, "prompt_len": L, "status": "ok",
                             "decode_tokens_per_s": {"mean": scale * b * 1000 / L ** 0.3, "std": 3.0},
                             "peak_memory_bytes": 2**20 * b * L, "memory_estimate_bytes": 2**20 * b * L * 1.2})
    rows.append({"model": "a", "batch": 64, "prompt_len": 1024, "status": "oom", "decode_tokens_per_s": None,
                 "peak_memory_bytes": None, "memory_estimate_bytes": 2**40})
    return rows


def test_write_plots_draws_every_plot_as_a_real_png(tmp_path):
    from hybridctl.plots import write_plots

    acc = [{"model": m, "task": "needle", "layout": None, "length": L, "depth": d, "examples": 4,
            "accuracy": (i % 5) / 4} for m in ("a", "b") for i, (L, d) in enumerate(
                (L, d) for L in (128, 512, 2048) for d in (0.0, 0.5, 1.0))]
    acc += [{"model": "a", "task": "phonebook", "layout": lay, "length": L, "depth": None, "examples": 2,
             "accuracy": 0.5} for lay in ("standard", "reversed") for L in (256, 512)]
    paths = write_plots(tmp_path / "plots", speed=_speed_rows(), tasks=acc)
    names = sorted(p.name for p in paths)
    assert names == ["accuracy_needle.png", "accuracy_phonebook.png", "decode_vs_batch.png",
                     "decode_vs_context.png", "memory_vs_context.png", "needle_heatmap.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p  # a drawn figure, not an empty canvas
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temp file left


def test_plots_refuse_empty_input_in_one_line(tmp_path):
    from hybridctl.plots import accuracy_vs_length, decode_vs_context

    with pytest.raises(HybridctlError, match="no rows"):
        accuracy_vs_length([], tmp_path / "a.png")
    with pytest.raises(HybridctlError, match="no measured rows"):
        decode_vs_context([r for r in _speed_rows() if r["status"] == "oom"], tmp_path / "b.png")
    assert not list(tmp_path.iterdir())


# ---- speed rows, ratios, OOM, schema --------------------------------------------------------------------------------

from typer.testing import CliRunner  # noqa: E402

runner = CliRunner()
SMALL = dict(batch=[1, 2], prompt_len=[12], new_tokens=4, reps=2, warmup=0, bandwidth_gbps=10.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hybridctl.build import build

    out = tmp_path_factory.mktemp("bench") / "tiny-ckpt"
    build(preset="tiny", out=out, seed=1)
    return out


def cli(*args):
    from hybridctl.cli import app

    return runner.invoke(app, ["bench", *map(str, args)])


def one_line_error(r, match):
    assert r.exit_code != 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hybridctl: error: ") and match in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_speed_rows_on_a_checkpoint_and_a_preset_with_ratios_to_the_baseline(ckpt, one_thread):
    from hybridctl.bench import bench
    from hybridctl.bench_report import format_report, validate
    from hybridctl.model import decode_bytes_per_step

    res = bench(checkpoints=[ckpt], presets=["tiny"], **SMALL)
    assert [m["name"] for m in res["models"]] == ["tiny-ckpt", "tiny"] and res["models"][0]["baseline"]
    rows = res["speed"]
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny-ckpt", 1), ("tiny-ckpt", 2), ("tiny", 1), ("tiny", 2)]
    base = {r["batch"]: r for r in rows if r["model"] == "tiny-ckpt"}
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None
        d = r["decode_tokens_per_s"]
        assert len(d["reps"]) == 2 and d["mean"] > 0 and d["std"] >= 0
        assert r["decode_steps"] == 3 and r["plan"]["batch"] == r["batch"] and r["plan"]["mode"].startswith("cpu")
        assert r["step_time_s"]["p50"] <= r["step_time_s"]["p99"]
        assert r["ttft_s"]["mean"] > 0 and r["prefill_tokens_per_s"]["mean"] > 0 and r["peak_memory_bytes"] > 0
        b = base[r["batch"]]
        assert r["ratio_to_baseline"]["decode"] == pytest.approx(d["mean"] / b["decode_tokens_per_s"]["mean"])
        want = decode_bytes_per_step(materialize(build_model(preset("tiny")), "cpu"), r["batch"], 12 + 2)
        assert r["decode_bytes_per_step"] == want
        assert r["roofline_fraction"] == pytest.approx(want * d["mean"] / r["batch"] / 10e9)
    assert all(r["ratio_to_baseline"]["decode"] == 1.0 for r in base.values())
    assert validate({"hybridctl_version": "0", "device": "cpu", "dtype": "float32", **res}) == []
    table = format_report(res)
    assert "tiny-ckpt" in table and "decode tok/s" in table and "±" in table


def test_state_and_kv_bytes_are_the_caches_real_sizes():
    from hybridctl.bench import ModelSpec, memory_estimate

    cfg = preset("tiny")
    model = materialize(build_model(cfg), "cpu")
    spec = ModelSpec("t", "preset", "tiny", cfg, 0, 0, "float32")
    est = memory_estimate(spec, batch=3, prompt_len=20, new_tokens=5, state_dtype="float32")
    cache = model.allocate_cache(3, 25)
    from hybridctl.blocks import MambaState

    mamba = sum(t.numel() * t.element_size() for s in cache.layers.values() if isinstance(s, MambaState)
                for t in (s.conv, s.ssm))
    assert est["ssm_state"] == mamba and est["ssm_state"] + est["kv_cache"] == cache.nbytes()


def test_a_row_over_the_memory_limit_is_out_of_memory_and_the_rest_runs(one_thread):
    from hybridctl.bench import ModelSpec, bench, memory_estimate

    cfg = preset("tiny")
    spec = ModelSpec("tiny", "preset", "tiny", cfg, sum(p.numel() * 4 for p in build_model(cfg).parameters()), 0,
                     "float32")
    small, big = (memory_estimate(spec, batch=1, prompt_len=L, new_tokens=4, state_dtype="float32")["total"]
                  for L in (12, 4096))
    res = bench(presets=["tiny"], batch=[1], prompt_len=[12, 4096], new_tokens=4, reps=1, warmup=0,
                bandwidth_gbps=10.0, memory_limit_gib=(small + big) / 2 / 2**30)
    ok, oom = res["speed"]
    assert ok["status"] == "ok" and ok["decode_tokens_per_s"]["mean"] > 0
    assert oom["status"] == "oom" and oom["error"].startswith("out of memory") and "GiB" in oom["error"]
    assert oom["decode_tokens_per_s"] is None and oom["memory_estimate_bytes"] == big
    assert oom["ratio_to_baseline"] == {"decode": None, "prefill": None}
    from hybridctl.bench_report import format_report

    assert "out of memory" in format_report(res)


def test_running_out_of_memory_mid_row_is_that_rows_result(monkeypatch, one_thread):
    from hybridctl import bench as bench_mod

    real = bench_mod.measure_speed

    def flaky(model, **kw):
        if kw["batch"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, **kw)

    monkeypatch.setattr(bench_mod, "measure_speed", flaky)
    res = bench_mod.bench(presets=["tiny"], **SMALL)
    assert [r["status"] for r in res["speed"]] == ["ok", "oom"]
    assert "out of memory while running" in res["speed"][1]["error"]

    def broken(model, **kw):
        raise ValueError("a real bug")

    monkeypatch.setattr(bench_mod, "measure_speed", broken)
    with pytest.raises(ValueError, match="a real bug"):  # only memory exhaustion becomes a row
        bench_mod.bench(presets=["tiny"], **SMALL)


def test_json_is_one_object_that_matches_the_schema(tmp_path, one_thread):
    import json

    from hybridctl.bench_report import SCHEMA, validate

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    r = cli("--preset", "tiny", "--batch", "1", "--prompt-len", "8", "--new-tokens", "3", "--reps", "2", "--warmup",
            "0", "--bandwidth", "5", "--ppl", text, "--lengths", "64", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert validate(obj) == [], validate(obj)
    assert obj["environment"]["decode_plan"] == obj["speed"][0]["plan"]
    p = obj["quality"]["ppl"][0]
    assert p["window"] == 64 and p["predicted"] == sum(b["tokens"] for b in p["buckets"]) and p["ppl"] > 1
    # the validator is not a rubber stamp
    bad = json.loads(r.stdout)
    del bad["speed"][0]["ttft_s"]
    bad["grid"]["batch"] = ["1"]
    bad["models"][0]["params"] = 1.5
    errs = validate(bad, SCHEMA)
    assert any("ttft_s" in e for e in errs) and any("grid.batch[0]" in e for e in errs) \
        and any("models[0].params" in e for e in errs)


def test_dry_run_prints_the_grid_and_estimates_and_writes_nothing(tmp_path, monkeypatch, ckpt):
    import json

    from hybridctl import bench as bench_mod
    from hybridctl.bench_report import validate

    monkeypatch.setattr(bench_mod, "load", lambda *a, **k: pytest.fail("a dry run loaded a model"))
    monkeypatch.setattr(bench_mod, "measure_speed", lambda *a, **k: pytest.fail("a dry run measured"))
    plots = tmp_path / "plots"
    r = cli(ckpt, "--preset", "hybrid-8b", "--batch", "1,64", "--prompt-len", "1024,131072", "--dry-run",
            "--plot", plots, "--memory-limit", "140")
    assert r.exit_code == 0, r.output
    assert "estimate" in r.stdout and "out of memory" in r.stdout and "hybrid-8b" in r.stdout
    assert not plots.exists()
    r = cli("--preset", "hybrid-8b", "--batch", "1,64", "--prompt-len", "1024,131072", "--dry-run", "--json",
            "--memory-limit", "140")
    obj = json.loads(r.stdout)
    assert validate(obj) == [] and obj["dry_run"]
    rows = {(x["batch"], x["prompt_len"]): x for x in obj["speed"]}
    assert rows[(1, 1024)]["status"] == "planned" and rows[(64, 131072)]["status"] == "oom"
    m = obj["models"][0]
    assert m["dtype"] == "float32" and 8e9 < m["params"] < 9e9  # presets run in float32 on the CPU
    assert rows[(1, 1024)]["memory_estimate"]["weights"] == m["weights_bytes"] == 4 * m["params"]


def test_cli_defaults_are_the_librarys():
    import inspect

    from hybridctl import cli
    from hybridctl.bench import bench, parse_ints

    ours = {n: p.default for n, p in inspect.signature(cli.bench).parameters.items()}
    lib = {n: p.default for n, p in inspect.signature(bench).parameters.items()}
    for name in ("batch", "prompt_len", "lengths"):
        assert parse_ints(ours[name], name) == list(lib[name]), name
    for name in ("new_tokens", "reps", "warmup", "device", "dtype", "state_dtype", "backend", "speed", "ppl", "task",
                 "samples", "plot", "dry_run", "seed", "threads"):
        assert ours[name] == lib[name], name
    assert ours["memory_limit"] == lib["memory_limit_gib"] and ours["bandwidth"] == lib["bandwidth_gbps"]


@pytest.mark.parametrize("args, match", [
    (("--preset", "tiny", "--batch", "1,x"), "--batch 1,x: 'x' is not an integer"),
    (("--preset", "tiny", "--batch", "0"), "--batch 0: 0 is outside"),
    (("--preset", "tiny", "--prompt-len", "-3"), "--prompt-len -3"),
    (("--preset", "tiny", "--lengths", ""), "--lengths"),
    (("--preset", "tiny", "--ppl", "/nonexistent/held_out.txt"), "no such file"),
    (("--preset", "tiny", "--task", "sudoku"), "unknown task"),
    (("--preset", "gpt-17"), "preset 'gpt-17' is unknown"),
    (("--preset", "tiny", "--task", "needle", "--depths", "0,150%"), "outside [0, 1]"),
    (("--preset", "tiny", "--task", "copy", "--depths", "0.5"), "copy task has no depth"),
    (("--preset", "tiny", "--reps", "0"), "--reps 0: must be >= 1"),
    (("--preset", "tiny", "--dtype", "float13"), "float13"),
    (("/nonexistent/ckpt",), "no such checkpoint"),
    ((), "nothing to bench"),
    (("--preset", "tiny", "--no-speed"), "nothing to measure"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(args, match, tmp_path):
    one_line_error(cli(*args, "--dry-run", "--plot", tmp_path / "p"), match)
    assert not (tmp_path / "p").exists()


def test_quality_tasks_and_plots_through_the_cli(tmp_path, ckpt, one_thread):
    import json

    plots = tmp_path / "plots"
    r = cli(ckpt, "--preset", "tiny", "--no-speed", "--task", "needle", "--lengths", "112,160", "--depths", "0,100%",
            "--samples", "1", "--plot", plots, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    tasks = obj["quality"]["tasks"]
    assert obj["speed"] == [] and len(tasks) == 2 * 2 * 2  # models × lengths × depths
    assert {t["model"] for t in tasks} == {"tiny-ckpt", "tiny"} and all(0 <= t["accuracy"] <= 1 for t in tasks)
    assert sorted(p.name for p in plots.iterdir()) == ["accuracy_needle.png", "needle_heatmap.png"]
    assert all(p.stat().st_size > 10_000 for p in plots.iterdir())
    assert sorted(obj["plots"]) == sorted(str(p) for p in plots.iterdir())
    r = cli(ckpt, "--no-speed", "--task", "copy", "--lengths", "40", "--samples", "2")
    assert r.exit_code == 0, r.output
    assert "task copy: exact-match accuracy" in r.stdout and "tiny-ckpt" in r.stdout


def test_bench_and_generate_time_the_same_runtime(ckpt, one_thread):
    """Same plan dict, and decode tok/s within a loose bound (a busy 2-core CPU; the 5% check runs on the GPU)."""
    import json

    from hybridctl.bench import bench
    from hybridctl.cli import app

    r = runner.invoke(app, ["generate", str(ckpt), "--prompt", "The quick brown fox", "--max-new-tokens", "24",
                            "--ignore-eos", "--json"])
    assert r.exit_code == 0, r.output
    gen = json.loads(r.stdout)
    res = bench(checkpoints=[ckpt], batch=[1], prompt_len=[gen["prompt_tokens"]], new_tokens=24, reps=3, warmup=1,
                bandwidth_gbps=10.0)
    row = res["speed"][0]
    assert row["plan"] == gen["decode_plan"]
    assert row["decode_steps"] == gen["decode_steps"] == 23
    ratio = row["decode_tokens_per_s"]["mean"] / gen["decode_tokens_per_s"]
    assert 0.2 < ratio < 5, (row["decode_tokens_per_s"], gen["decode_tokens_per_s"])


def test_plots_without_matplotlib_are_one_line_before_any_work(monkeypatch, tmp_path):
    import sys

    from hybridctl import bench as bench_mod

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    monkeypatch.setattr(bench_mod, "load", lambda *a, **k: pytest.fail("ran before checking matplotlib"))
    one_line_error(cli("--preset", "tiny", "--plot", tmp_path / "p"), "pip install 'hybridctl[plot]'")


def test_the_swept_prompts_are_well_formed_at_every_cell():
    """What sweep_task feeds the model: the answer is in the prompt (retrievable), the prompt ends with the question,
    fits the target length, and the target sits where the depth says."""
    from hybridctl.tasks import eval_examples

    tok = ByteTokenizer()
    for layout in ("standard", "reversed"):
        for depth in (0.0, 1.0):
            (e,) = eval_examples("phonebook", tok, 900, n=1, depth=depth, layout=layout, seed=0)
            lines = [ln for ln in e.prompt_text.split("\n") if ln.endswith(e.answer_text.strip())]
            assert lines == [f"{e.meta['name']}: {e.answer_text.strip()}"], lines  # one book line holds it
            assert e.prompt_text.endswith(f"What is the phone number for {e.meta['name']}?\nAnswer:")
            assert len(e.prompt) <= 900 and e.meta["depth"] == depth
    at = []
    for depth in (0.0, 0.5, 1.0):
        (e,) = eval_examples("needle", tok, 400, n=1, depth=depth, seed=0)
        needle = f"The pass key is {e.answer_text.strip()}. Remember it. {e.answer_text.strip()} is the pass key. "
        at.append(e.prompt_text.index(needle))
        assert e.prompt_text.endswith("\nWhat is the pass key? The pass key is") and len(e.prompt) <= 400
        if depth == 1.0:
            assert e.prompt_text[at[-1] + len(needle):].startswith("\nWhat is the pass key?")  # after all filler
    assert at[0] == 0 and at[0] < at[1] < at[2]
    (e,) = eval_examples("copy", tok, 64, n=1, seed=0)
    assert e.prompt_text == e.answer_text + "\n" and len(e.prompt) + len(e.answer) <= 64 + 1
