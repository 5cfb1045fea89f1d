"""The lm-evaluation-harness adapter (hybridctl/lm_eval_model.py) run by lm-eval itself, offline, on local task YAMLs
(tests/data/lm_eval: a multiple-choice, a perplexity and a generation task over JSONL files shipped here), on a tiny
checkpoint; every number lm-eval reports is recomputed with hybridctl's own model forward / generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config

lm_eval = pytest.importorskip("lm_eval")  # the optional extra; .ci/run installs it (so CI never skips this)

DATA = Path(__file__).parent / "data" / "lm_eval"
TASKS = ["hybridctl_mc", "hybridctl_ppl", "hybridctl_gen"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hybridctl.checkpoint.native import save_model
    from hybridctl.model import build_model, materialize
    from hybridctl.tokenizer import ByteTokenizer

    model = materialize(build_model(tiny_config()), "cpu", seed=3)
    with torch.no_grad():  # sharper logits than the 0.02-std init: greedy choices are not near-ties
        model.norm_f.weight.mul_(10.0)
    out = tmp_path_factory.mktemp("lm_eval") / "tiny"
    save_model(model, out, tokenizer=ByteTokenizer())
    return out


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache),
           "HF_DATASETS_CACHE": str(cache / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def results(ckpt, offline_env):
    """One lm-eval run of the three tasks through the Python API (batch 4, samples logged)."""
    import hybridctl.lm_eval_model  # noqa: F401  (registers the model)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cwd, threads = os.getcwd(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster, and robust on a busy 2-core CI machine
    os.chdir(DATA)  # the YAMLs name their JSONL files relative to this folder
    try:
        return simple_evaluate(model="hybridctl", model_args=f"pretrained={ckpt},device=cpu,compile=false",
                               batch_size=4, tasks=TASKS, task_manager=TaskManager(include_path=str(DATA), include_defaults=False),
                               log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def direct(ckpt):
    from hybridctl.checkpoint import load_model, load_tokenizer_for

    model, src = load_model(ckpt, dtype=torch.float32)
    return model, load_tokenizer_for(src)


def _continuation_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(ids[:, :-1])[0].double()
    logp = torch.log_softmax(logits, -1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _args(sample) -> list[tuple[str, str]]:
    return [tuple(a) for a in sample["arguments"]]


def test_multiple_choice_loglikelihoods_equal_our_forward(results, direct):
    model, tok = direct
    samples = results["samples"]["hybridctl_mc"]
    assert len(samples) == 5
    n_checked = 0
    for s in samples:
        doc = s["doc"]
        for (ctx_text, cont_text), resp in zip(_args(s), s["resps"]):
            ll, greedy = resp[0]
            ctx, cont = tok.encode(ctx_text, add_bos=False), tok.encode(cont_text, add_bos=False)
            ref_ll, ref_greedy = _continuation_logprob(model, ctx, cont)
            assert abs(float(ll) - ref_ll) <= 1e-5 * max(1.0, abs(ref_ll)), (doc["question"], cont_text)
            assert bool(greedy) == ref_greedy
            n_checked += 1
        # acc: the gold choice has the highest loglikelihood (lm-eval's own metric over our numbers)
        lls = [float(r[0][0]) for r in s["resps"]]
        assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"])
    assert n_checked == 3 + 2 + 4 + 3 + 2
    assert 0.0 <= results["results"]["hybridctl_mc"]["acc,none"] <= 1.0


def test_rolling_loglikelihood_equals_our_token_loss_sum(results, direct):
    from hybridctl.evaluation import lm_loss_sum

    model, tok = direct
    samples = results["samples"]["hybridctl_ppl"]
    total_ll, total_bytes = 0.0, 0
    for s in samples:
        text = s["doc"]["text"]
        ids = torch.tensor([[tok.bos_id, *tok.encode(text, add_bos=False)]])  # the prefix token conditions the first
        with torch.no_grad():
            ref = -float(lm_loss_sum(model(ids[:, :-1]), ids[:, 1:]))
        got = float(s["resps"][0][0])
        assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref)), text
        total_ll, total_bytes = total_ll + ref, total_bytes + len(text.encode())
    bpb = results["results"]["hybridctl_ppl"]["bits_per_byte,none"]
    assert bpb == pytest.approx(-total_ll / total_bytes / torch.log(torch.tensor(2.0)).item(), rel=1e-6)


def test_rolling_windows_longer_than_max_length(ckpt, direct):
    """A text longer than max_length is scored in lm-eval's disjoint windows, each one our forward."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from hybridctl.lm_eval_model import HybridctlLM

    model, tok = direct
    lm = HybridctlLM(pretrained=str(ckpt), batch_size="3", max_length="16", dtype="float32")
    text = "A hybrid keeps a few attention layers; the rest are Mamba-2 and MLP layers."
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (got,) = lm.loglikelihood_rolling([req])
    ref = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tok.encode(text, add_bos=False),
                                                                         tok.bos_id, 16, 1)):
        ref += _continuation_logprob(model, ctx, cont)[0]
    assert len(tok.encode(text, add_bos=False)) > 4 * 16
    assert got == pytest.approx(ref, abs=1e-4)


def test_generate_until_equals_hybridctl_generate(results, direct, one_thread):
    from hybridctl.evaluation import greedy_forward
    from hybridctl.generate import generate

    model, tok = direct
    samples = results["samples"]["hybridctl_gen"]
    assert len(samples) == 5
    ref_fn = greedy_forward(model, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
    for s in samples:
        prompt = s["doc"]["prompt"]
        got = s["resps"][0][0]
        ref = generate(model, [tok.encode(prompt, add_bos=False)], tokenizer=tok, max_new_tokens=12, stop=["\n"],
                       compile=False).texts[0]
        assert got == ref, prompt
        # and the plain full-forward argmax agrees (cut at the stop string / EOS as generate does)
        new = ref_fn([tok.encode(prompt, add_bos=False)], 12)[0]
        text = tok.decode([t for t in new if t != tok.eos_id])
        assert got == text.split("\n")[0], prompt
    assert "exact_match,none" in results["results"]["hybridctl_gen"]


def test_cli_wrapper_runs_lm_eval(ckpt, offline_env, tmp_path):
    """`python -m hybridctl.lm_eval_model` is lm-eval's own CLI with the model registered (every lm-eval flag); with
    no --device it picks cuda when there is one, else cpu (lm-eval's own default is cuda:0)."""
    env = {**os.environ, **offline_env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "hybridctl.lm_eval_model", "--model", "hybridctl", "--model_args",
           f"pretrained={ckpt},compile=false", "--batch_size", "2", "--tasks", "hybridctl_mc",
           "--include_path", str(DATA), "--output_path", str(out)]
    p = subprocess.run(cmd, cwd=DATA, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (res,) = list(out.rglob("results_*.json"))
    assert json.loads(res.read_text())["results"]["hybridctl_mc"]["acc,none"] >= 0.0


def test_bad_model_args_are_one_clear_error(ckpt):
    from hybridctl.config import HybridctlError
    from hybridctl.lm_eval_model import HybridctlLM

    with pytest.raises(HybridctlError, match="pretrained=CHECKPOINT"):
        HybridctlLM.create_from_arg_string("device=cpu")
    with pytest.raises(HybridctlError, match="batch_size"):
        HybridctlLM.create_from_arg_string(f"pretrained={ckpt}", {"batch_size": "auto"})
    with pytest.raises(HybridctlError):
        HybridctlLM.create_from_arg_string(f"pretrained={ckpt.parent / 'missing'}")


def test_the_model_is_registered_beside_lm_evals_own():
    import hybridctl.lm_eval_model as m
    from lm_eval.api.registry import get_model

    assert get_model("hybridctl") is m.HybridctlLM
    assert get_model("dummy").__name__ == "DummyLM"  # the built-in models are still there


def test_generation_kwargs_follow_lm_evals_hf_model(ckpt):
    from hybridctl.lm_eval_model import HybridctlLM

    lm = HybridctlLM(pretrained=str(ckpt))
    assert lm._gen_settings({"until": "\n\n", "do_sample": False, "temperature": 0.7}) == (["\n\n"], 256, 0.0, 1.0, 0)
    assert lm._gen_settings({"do_sample": True, "max_gen_toks": 5, "top_p": 0.9}) == ([], 5, 1.0, 0.9, 0)
    assert lm._gen_settings(None) == ([], 256, 0.0, 1.0, 0)
