"""Benchmarks stay importable and rest on shipped code: every script imports without running its main (and without
CUDA); generate_common's transformers peer is hybridctl's tested HF export (same logits); the decode byte count on
the model agrees with the real cache tensors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hybridctl.model import build_model, decode_bytes_per_step, materialize

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings (generate_common, probes)
    yield


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).stem}", BENCH / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_are_scripts():
    assert {"generate_common.py", "probes.py", "generate_cpu.py", "generate_gpu.py", "train_gpu.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, bench_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, "--definitely-not-an-option"])  # a main that ran would exit on this
    mod = load(name)
    if name not in ("generate_common.py", "probes.py"):
        assert callable(getattr(mod, "main", None)), f"{name}: no main()"
        assert 'if __name__ == "__main__":' in (BENCH / name).read_text(), f"{name}: main is not guarded"


def test_to_nemotron_h_is_the_tested_export(bench_path):
    transformers = pytest.importorskip("transformers")
    common = load("generate_common.py")
    cfg = tiny_config(pattern="M*-M-", vocab_size=260, d_model=64, tie_embeddings=True,
                      mamba=dict(d_state=8, headdim=8, ngroups=4, chunk_size=16),
                      attention=dict(n_heads=2, n_kv_heads=1, head_dim=40),
                      mlp=dict(hidden_size=80, activation="relu2"))
    model = materialize(build_model(cfg), "cpu", seed=0).eval()
    hf = common.to_nemotron_h(model)
    assert isinstance(hf, transformers.NemotronHForCausalLM) and hf.config.max_position_embeddings == 1 << 20
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_per_step_counts_weights_and_cache(tied):
    model = materialize(build_model(tiny_config(tie_embeddings=tied)), "cpu", seed=0)
    B, L = 3, 40
    cache = model.allocate_cache(B, L)
    state = sum(t.numel() * t.element_size() for st in cache.layers.values() if hasattr(st, "ssm")
                for t in (st.ssm, st.conv))
    kv = sum(t.numel() * t.element_size() for st in cache.layers.values() if hasattr(st, "k") for t in (st.k, st.v))
    emb = model.embed.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    gathered = B * emb.shape[1] * emb.element_size() + (emb.numel() * emb.element_size() if tied else 0)
    assert decode_bytes_per_step(model, B, L) == weights + gathered + 2 * state + kv
    bf16 = decode_bytes_per_step(model, B, L, state_bytes=2)
    ssm = sum(st.ssm.numel() for st in cache.layers.values() if hasattr(st, "ssm"))
    assert decode_bytes_per_step(model, B, L) - bf16 == 2 * ssm * 2  # read + write, 4 → 2 bytes


def test_phonebook_driver_curriculum_grows_the_books(bench_path):
    """paper_phonebook's producers: producer j's k-th batch is trained at step k*P + j, so books stay at the
    curriculum's size before its step and take the recipe's n_entries after; bad curricula are refused."""
    import re

    pb = load("paper_phonebook.py")
    assert pb.parse_curriculum("2:300,4:500") == [(2, 300), (4, 500)]
    for bad in ("2:500,4:300", "0:10", "2"):
        with pytest.raises(SystemExit):
            pb.parse_curriculum(bad)

    class _Enough(Exception):
        pass

    class Q:
        def __init__(self):
            self.got = []

        def put(self, arrays):
            self.got.append(arrays)
            if len(self.got) == 6:
                raise _Enough

    rec = pb.load("transformer", type("A", (), {"tiny": True, "set": ["optim.micro_batch=2"]})(), 10)
    q = Q()
    with pytest.raises(_Enough):
        pb._producer([q], 1, rec, [(1, 7)], 2)  # producer 1 of 2: its batches are steps 1, 3, 5, 7, 9, 11
    entry = re.compile(r"^(?!Answer)[^\n:]+: \d{3}-\d{3}-\d{4}$", re.M)  # book lines, not the shots' answers
    per_step = []
    for arrays in q.got:
        books = []
        for row in arrays["input_ids"]:
            text = bytes(int(t) for t in row if t < 256).decode("utf-8", "replace")
            books += [len(entry.findall(part)) for part in text.split("Here is the phonebook:")[1:]]
        per_step.append(max(books))
    assert per_step[:3] == [1, 1, 1]  # steps 1, 3, 5 < 7: one entry
    assert max(per_step[3:]) > 1      # steps 7, 9, 11: the recipe's books (up to 12 in the tiny variant)
