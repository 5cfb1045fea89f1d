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


def test_sweep_task_on_the_runtime_gives_an_accuracy(tiny):
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
