"""Document-aware attention for packed rows (kernels.document_layout / kernels.attention(layout=)) against the dense-mask
reference (ref.attention with seq_idx): values and gradients, GQA, ragged documents, documents that continue from the
previous row, a row that is one document; no attention across documents; packed loss == one document per row."""

from __future__ import annotations

import warnings

import pytest
import torch

from hybridctl import kernels, ref
from hybridctl.config import HybridctlError, ModelConfig
from hybridctl.model import build_model, materialize, training_memory
from hybridctl.train import lm_loss_sum


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _seq_idx(rows: list[list[int]]) -> torch.Tensor:
    """Document lengths per row → seq_idx [B,T] int32 (0, 1, ... per row)."""
    return torch.stack([torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(r)]) for r in rows])


# T = 300 (not a multiple of FlexAttention's 128 block): row 0 ragged, row 1 one document (e.g. the middle of a
# document longer than a row), row 2 a continued document then short ones, row 3 the same spans as row 0.
RAGGED = [[100, 30, 160, 10], [300], [5, 1, 1, 293], [100, 30, 160, 10]]


def _qkv(bsz: int, seqlen: int, heads: int, kv: int, dh: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, seqlen, n, dh, generator=g, requires_grad=True) for n in (heads, kv, kv)]


def _grads(out: torch.Tensor, inputs, seed: int = 1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("rows", [RAGGED, [[300], [300]], [[7] * 40 + [20]]])
def test_segments_path_matches_dense_reference_values_and_gradients(heads, kv, rows):
    seq_idx = _seq_idx(rows)
    q, k, v = _qkv(len(rows), seq_idx.shape[1], heads, kv)
    layout = kernels.document_layout(seq_idx)
    assert layout.kind == "segments"  # CPU: SDPA per document span
    got = kernels.attention(q, k, v, layout=layout)
    want = ref.attention(q, k, v, seq_idx=seq_idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for a, b, name in zip(_grads(got, (q, k, v)), _grads(want, (q, k, v)), "qkv"):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"d{name}")


def test_segments_batch_equal_spans_into_one_call():
    layout = kernels.document_layout(_seq_idx(RAGGED))
    spans = {(s, e): r.tolist() for s, e, r in layout.groups}
    assert spans[(0, 100)] == [0, 3] and spans[(0, 300)] == [1] and spans[(7, 300)] == [2]
    assert len(layout.groups) == 4 + 1 + 4  # rows 0 and 3 share their four spans: one call each


def test_no_attention_across_documents_gradient():
    """d out(document j) / d k,v,q(document i != j) is exactly zero; within a document it is not."""
    seq_idx = _seq_idx(RAGGED)
    q, k, v = _qkv(4, 300, 4, 2)
    out = kernels.attention(q, k, v, layout=kernels.document_layout(seq_idx))
    sel = torch.zeros(4, 300, dtype=torch.bool)
    sel[0, 130:290] = True  # row 0's third document
    sel[2, 7:] = True  # row 2's last document
    dq, dk, dv = torch.autograd.grad(out[sel].sum(), (q, k, v))
    for g in (dq, dk, dv):
        outside, inside = g[~sel].abs().max().item(), g[sel].abs().max().item()
        assert outside == 0.0 and inside > 0


def test_dense_kind_under_ref_backend_and_none_without_documents():
    assert kernels.document_layout(None) is None
    try:
        kernels.set_backend("ref")
        assert kernels.document_layout(_seq_idx([[3, 5]])).kind == "dense"
    finally:
        kernels.set_backend(None)
    with pytest.raises(HybridctlError, match="unknown"):
        kernels.document_layout(_seq_idx([[3, 5]]), kind="nope")


@pytest.mark.parametrize("rows", [RAGGED, [[512], [200, 312], [128, 128, 256]]])
def test_flex_block_mask_equals_flex_own_dense_construction(rows):
    """Our O((T/128)²) block mask == FlexAttention's create_block_mask over the materialised T×T document mask
    (partial and full block counts and their indices), and eager flex_attention with it gives the reference."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seq_idx = _seq_idx(rows)
    bsz, seqlen = seq_idx.shape
    ours = kernels.document_block_mask(seq_idx)
    theirs = create_block_mask(lambda b, h, q, kv: (q >= kv) & (seq_idx[b, q] == seq_idx[b, kv]), bsz, None,
                               seqlen, seqlen, device="cpu")
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        a, b = getattr(ours, num), getattr(theirs, num)
        assert torch.equal(a, b), num
        for bi in range(bsz):
            for qi in range(a.shape[-1]):
                n = int(a[bi, 0, qi])
                assert sorted(getattr(ours, idx)[bi, 0, qi, :n].tolist()) == \
                    sorted(getattr(theirs, idx)[bi, 0, qi, :n].tolist())
    assert int(ours.full_kv_num_blocks.sum()) > 0  # the test covers full (mask-free) blocks too
    if rows == RAGGED:
        assert int(ours.full_kv_num_blocks[..., -1].sum()) == 0  # T = 300: the last block is cut, so partial
    q, k, v = (t.detach() for t in _qkv(bsz, seqlen, 4, 2))
    with torch.no_grad(), warnings.catch_warnings():  # eager flex_attention warns (once) that it is unfused
        warnings.simplefilter("ignore", UserWarning)
        got = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=ours,
                             enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, ref.attention(q, k, v, seq_idx=seq_idx), rtol=0, atol=1e-5)


def test_flash_layout_cu_seqlens_over_flattened_rows():
    cu = kernels._cu_seqlens(_seq_idx([[3, 5], [8], [1, 1, 6]]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 8, 16, 17, 18, 24]


# ---- the whole model: packed rows == one document per row -------------------------------------------------------------

CFG = dict(vocab_size=64, d_model=32, pattern="M*-M*-",
           mamba=dict(d_state=8, headdim=16, ngroups=1, chunk_size=16),
           attention=dict(n_heads=4, n_kv_heads=2, head_dim=8), mlp=dict(hidden_size=64, activation="gelu"))


@pytest.mark.parametrize("position", ["none", "rope"])
def test_packed_loss_and_gradients_equal_one_document_per_row(position):
    """Sum of next-token losses of documents packed two rows of 48 (seq_idx, labels -100 at boundaries, the loader's
    contract) == the same documents each in its own row without seq_idx; gradients too (fp32)."""
    cfg = ModelConfig.from_dict({**CFG, "attention": {**CFG["attention"], "position": position}})
    model = materialize(build_model(cfg, dtype=torch.float32), "cpu", seed=0)
    rows = [[20, 5, 23], [48]]
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 64, (n,), generator=g) for r in rows for n in r]
    ids = torch.stack([torch.cat(docs[:3]), docs[3]])
    seq_idx = _seq_idx(rows)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[:, :-1][seq_idx[:, 1:] != seq_idx[:, :-1]] = -100
    packed = lm_loss_sum(model(ids, seq_idx=seq_idx), labels)
    g_packed = torch.autograd.grad(packed, list(model.parameters()))
    single = sum(lm_loss_sum(model(d[None]), torch.cat([d[1:], d.new_tensor([-100])])[None]) for d in docs)
    g_single = torch.autograd.grad(single, list(model.parameters()))
    torch.testing.assert_close(packed, single, rtol=1e-6, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), g_packed, g_single):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# ---- training memory: the estimate and the pre-flight check -----------------------------------------------------------

GIB = 2 ** 30


def test_training_memory_estimate_matches_measured_h100_peaks():
    """Against the peaks train_gpu.py measured on an H100 (bf16 autocast, fp32 AdamW, seq 4096, no checkpointing):
    within 10%."""
    import json
    from pathlib import Path

    from hybridctl.config import preset

    rows = json.loads((Path(__file__).parents[1] / "benchmarks" / "results_train_gpu_h100.json").read_text())
    measured = {r["model"]: r for r in rows["training"] if not r.get("error")}
    for name in ("hybrid-370m", "hybrid-1.3b"):
        r = measured[name]
        est = training_memory(preset(name), seq_len=4096, micro_batch=r["micro_batch"],
                              activation_checkpointing=r["activation_checkpointing"])["total"] / GIB
        assert abs(est - r["max_memory_gib"]) <= 0.1 * r["max_memory_gib"], (name, est, r["max_memory_gib"])


def test_training_memory_scales_with_tokens_and_checkpointing_and_fsdp():
    from hybridctl.config import preset

    cfg = preset("hybrid-1.3b")

    def est(**kw):
        return training_memory(cfg, **{"seq_len": 4096, "micro_batch": 1, "activation_checkpointing": False, **kw})

    one, two = est(), est(micro_batch=2)
    assert two["activations"] == pytest.approx(2 * one["activations"]) and two["params"] == one["params"]
    assert est(seq_len=8192)["activations"] == pytest.approx(2 * one["activations"])
    assert est(activation_checkpointing=True)["activations"] < 0.5 * one["activations"]
    assert est(world_size=8)["optimizer"] == pytest.approx(one["optimizer"] / 8)
    assert one["params"] == 4 * sum(__import__("hybridctl.model").model.param_counts(cfg).values())


def test_check_training_memory_says_what_fits():
    from hybridctl.config import preset
    from hybridctl.model import check_training_memory

    cfg = preset("hybrid-1.3b")
    kw = dict(world_size=1, compute_bytes=2, capacity_bytes=80 * GIB, device_name="NVIDIA H100")
    ok = check_training_memory(cfg, seq_len=4096, micro_batch=2, activation_checkpointing=False, **kw)
    assert ok["total"] < 0.9 * 80 * GIB
    with pytest.raises(HybridctlError, match=r"does not fit.*NVIDIA H100 has 80.0 GiB; optim.micro_batch=2 would"):
        check_training_memory(cfg, seq_len=4096, micro_batch=8, activation_checkpointing=False, **kw)
    with pytest.raises(HybridctlError, match="micro_batch=1 and parallel.activation_checkpointing=true would"):
        check_training_memory(cfg, seq_len=16384, micro_batch=1, activation_checkpointing=False, **kw)
    with pytest.raises(HybridctlError, match=r"FSDP over \d+ devices would fit"):
        check_training_memory(preset("hybrid-2.7b"), seq_len=1024, micro_batch=1, activation_checkpointing=True,
                              **{**kw, "capacity_bytes": 40 * GIB})
    with pytest.raises(HybridctlError, match="shorten data.seq_len"):
        check_training_memory(cfg, seq_len=1 << 20, micro_batch=1, activation_checkpointing=True, **kw)


def test_train_refuses_a_recipe_that_cannot_fit_before_writing_anything(tmp_path):
    from hybridctl.recipe import resolve_recipe
    from hybridctl.train import train

    r = resolve_recipe({"name": "t", "optim": {"steps": 2}, "checkpoint": {"dir": str(tmp_path / "run")}},
                       ["data.seq_len=4194304", "optim.micro_batch=64", "optim.global_batch=64"])
    with pytest.raises(HybridctlError, match="does not fit.*RAM"):
        train(recipe=r, progress=False)
    assert not (tmp_path / "run").exists()


def test_train_cli_refuses_a_recipe_that_cannot_fit_in_one_line(tmp_path):
    """Through the command users run: one line on stderr naming what would fit, exit 1, no run directory."""
    from typer.testing import CliRunner

    from hybridctl.cli import app

    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "t"\n[optim]\nsteps = 2\n')
    r = CliRunner().invoke(app, ["train", str(recipe), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                                 "--set", "data.seq_len=4194304", "--set", "optim.micro_batch=64",
                                 "--set", "optim.global_batch=64"])
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("hybridctl: error: ") and "does not fit" in r.stderr and "RAM" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["segments", "flex"])
def test_compiled_caller_does_not_recompile_per_batch(kind):
    """A torch.compile'd block gets a new layout every batch: after the first two batches (Dynamo's automatic
    dynamic shapes) no new graphs (backend="eager": Dynamo's guards without code generation)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda q, k, v, layout: kernels.attention(q * 2, k, v, layout=layout) + 1, backend="eager")
    graphs = []
    for i in range(5):
        g = torch.Generator().manual_seed(i)
        seq_idx = _seq_idx([[n, 256 - n] for n in torch.randint(1, 255, (2,), generator=g).tolist()])
        q, k, v = (t.detach() for t in _qkv(2, 256, 4, 2, seed=i))
        with torch.no_grad():
            got = fn(q, k, v, kernels.document_layout(seq_idx, kind=kind))
        torch.testing.assert_close(got, ref.attention(q * 2, k, v, seq_idx=seq_idx) + 1, rtol=0, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2:] == [graphs[1]] * 3, graphs
