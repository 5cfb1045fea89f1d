"""The chunked LM loss (long rows: the [B,T,V] logits never held whole) equals the plain loss, values and gradients,
and train_step and training_memory use it above the threshold."""

import torch

from hybridctl import model as model_mod
from hybridctl.config import preset
from hybridctl.evaluation import chunked_lm_loss_sum, lm_loss_sum
from hybridctl.model import build_model, loss_chunk_tokens, materialize, training_memory


def _model():
    return materialize(build_model(preset("tiny"), dtype=torch.float32), "cpu", seed=0)


def test_chunked_loss_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 53, bias=False).double()
    h = torch.randn(3, 37, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 53, (3, 37))
    y[0, :5] = -100  # ignored positions
    ref = lm_loss_sum(head(h), y)
    g_ref = torch.autograd.grad(ref, [h, head.weight])
    for chunk in (1, 10, 37, 64, 1000):  # ragged last chunk, exact, one chunk
        out = chunked_lm_loss_sum(head, h, y, chunk)
        g = torch.autograd.grad(out, [h, head.weight])
        torch.testing.assert_close(out.double(), ref.double(), rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


def test_chunked_loss_through_the_model_head_fp32():
    m = _model()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 24))
    ref = lm_loss_sum(m(ids), ids)
    g_ref = torch.autograd.grad(ref, list(m.parameters()), allow_unused=True)
    m.zero_grad()
    out = chunked_lm_loss_sum(m.logits, m(ids, return_hidden=True), ids, 7)
    g = torch.autograd.grad(out, list(m.parameters()), allow_unused=True)
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for a, b in zip(g, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_loss_chunking_threshold_and_memory_accounting():
    cfg = preset("hybrid-1.3b")
    assert loss_chunk_tokens(4 * 4096, cfg.vocab_size) is None  # 4×4K: the plain loss, as before
    assert loss_chunk_tokens(131072, cfg.vocab_size) == model_mod.LOSS_CHUNK_TOKENS
    est = training_memory(cfg, seq_len=131072, micro_batch=1, activation_checkpointing=True)
    head_plain = 131072 * cfg.vocab_size * (2 + 12)
    assert est["activations"] < head_plain  # the full logits are no longer counted
    small = training_memory(cfg, seq_len=4096, micro_batch=1, activation_checkpointing=True)
    assert small["activations"] >= 4096 * cfg.vocab_size * (2 + 12)  # unchunked: the logits are counted


def test_train_step_takes_the_chunked_loss_above_the_threshold(monkeypatch):
    """One optimizer step on the tiny recipe with the chunked loss forced on equals the plain step (loss, grad norm,
    the (clipped) gradients the optimizer steps on)."""
    from pathlib import Path

    from hybridctl import parallel
    from hybridctl.recipe import load_recipe
    from hybridctl.train import build_optimizer, build_training_model, train_step

    root = Path(__file__).resolve().parent.parent
    r = load_recipe(root / "recipes" / "tiny.toml", ["data.seq_len=32", "optim.micro_batch=2",
                                                     "optim.global_batch=2", "precision.dtype=float32"])
    info = parallel.DistInfo(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    ids = torch.randint(0, r.model_config().vocab_size, (2, 32))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "seq_idx": None}
    import hybridctl.train as train_mod

    calls = []
    real = train_mod.chunked_lm_loss_sum
    monkeypatch.setattr(train_mod, "chunked_lm_loss_sum", lambda *a: calls.append(a[3]) or real(*a))
    out = []
    for above in (model_mod.LOSS_CHUNK_ABOVE_BYTES, -1):
        monkeypatch.setattr(model_mod, "LOSS_CHUNK_ABOVE_BYTES", above)
        monkeypatch.setattr(model_mod, "LOSS_CHUNK_TOKENS", 9)
        torch.manual_seed(0)
        m, no_decay = build_training_model(r.model_config(), r, None, info)
        opt = build_optimizer(m, no_decay, r, torch.device("cpu"))
        grads, step = [], opt.step
        opt.step = lambda *a, **k: (grads.extend(p.grad.clone() for p in m.parameters()), step(*a, **k))[1]
        loss, norm = train_step(m, opt, [batch], r, info)
        out.append((loss, norm, grads))
    assert calls == [9]  # the plain step first, then the chunked one
    assert abs(out[0][0] - out[1][0]) <= 1e-5 * abs(out[0][0]) and abs(out[0][1] - out[1][1]) <= 1e-5 * out[0][1]
    for a, b in zip(out[0][2], out[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
