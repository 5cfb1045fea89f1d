"""evaluation + tasks: the eval-example generators (phonebook standard/reversed, needle, copy) against parsers of their
own text, exact-match scoring through greedy callables (an oracle, the reference greedy vs `generate`), perplexity by
position against an analytic model and an independent fp64 loop."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_config

from hybridctl.config import HybridctlError
from hybridctl.evaluation import (answer_matches, exact_match, greedy_forward, perplexity_by_position,
                                  position_buckets)
from hybridctl.model import build_model, materialize
from hybridctl.tasks import copy_examples, eval_examples, needle_examples, phonebook_examples
from hybridctl.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
LINE = re.compile(r"^([A-Z][a-z]+ [A-Z][a-z]+): (\d{3}-\d{3}-\d{4})$")


def parse_phonebook(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    """(book entries in order, shots (name, phone), queried name) from a prompt's text."""
    book = [m.groups() for ln in text.split("\n") if (m := LINE.match(ln))]
    shots = re.findall(r"What is the phone number for ([A-Za-z ]+)\?\nAnswer: (\d{3}-\d{3}-\d{4})", text)
    query = re.findall(r"What is the phone number for ([A-Za-z ]+)\?\nAnswer:$", text)
    assert len(query) == 1, text[-200:]
    return book, shots, query[0]


@pytest.mark.parametrize("layout", ["standard", "reversed"])
def test_phonebook_examples_answer_position_and_length(layout):
    target = 1200
    for depth in (0.0, 0.5, 1.0):
        [ex] = phonebook_examples(TOK, target, depth=depth, layout=layout, seed=3)
        assert ex.prompt == TOK.encode(ex.prompt_text) and ex.prompt[0] == TOK.bos_id
        assert target - 40 < len(ex.prompt) <= target  # as many entries as fit (an entry is < 40 bytes)
        book, shots, name = parse_phonebook(ex.prompt_text)
        names = [n for n, _ in book]
        assert len(set(names)) == len(names) == ex.meta["entries"]
        assert ex.answer_text == " " + dict(book)[name] and ex.answer == TOK.encode(ex.answer_text, add_bos=False)
        assert names.index(name) == ex.meta["position"] == round(depth * (len(book) - 1))
        assert len(shots) == 2 and all(dict(book)[n] == p and n != name for n, p in shots)
        named_first = ex.prompt_text.startswith(f"Please find the phone number for {name}. ")
        assert named_first == (layout == "reversed")  # reversed: the target is named before the book
    many = phonebook_examples(TOK, 600, n=6, seed=1)
    assert len({e.prompt_text for e in many}) == 6 and many == phonebook_examples(TOK, 600, n=6, seed=1)
    assert len({e.meta["position"] for e in many}) > 1  # depth=None: random placement


def test_needle_and_copy_examples():
    for depth in (0.0, 0.5, 1.0):
        [ex] = needle_examples(TOK, 2000, depth=depth, seed=2)
        assert 1900 < len(ex.prompt) <= 2000 and ex.prompt_text.endswith("What is the pass key? The pass key is")
        key = ex.answer_text.strip()
        assert re.fullmatch(r"\d{5}", key) and ex.prompt_text.count(f"The pass key is {key}.") == 1
        at = ex.prompt_text.index(f"The pass key is {key}.") / len(ex.prompt_text)
        assert abs(at - depth) < 0.05
    for target in (16, 257):
        for ex in copy_examples(TOK, target, n=3):
            assert ex.prompt_text == ex.answer_text + "\n" and re.fullmatch("[a-z]+", ex.answer_text)
            assert target - 2 <= len(ex.prompt) + len(ex.answer) <= target
    with pytest.raises(HybridctlError, match="depth"):
        needle_examples(TOK, 100, depth=1.5)
    with pytest.raises(HybridctlError, match="raise target_len"):
        phonebook_examples(TOK, 50)
    with pytest.raises(HybridctlError, match="unknown evaluation task"):
        eval_examples("passkey", TOK, 100)
    with pytest.raises(HybridctlError, match="layout"):
        eval_examples("phonebook", TOK, 800, layout="sideways")


def oracle(examples_by_prompt: dict, wrong: set[int] = frozenset()):
    """A GreedyFn that solves phonebook prompts by reading the book (or answers nonsense for ids in ``wrong``)."""
    def run(prompts, max_new_tokens):
        out = []
        for p in prompts:
            book, _, name = parse_phonebook(TOK.decode(p))
            text = " 000-000-0000\n" if examples_by_prompt[tuple(p)] in wrong else f" {dict(book)[name]}\nWhat"
            out.append(TOK.encode(text, add_bos=False)[:max_new_tokens])
        return out
    return run


def test_exact_match_drives_the_generator():
    exs = phonebook_examples(TOK, 800, n=5, layout="reversed") + phonebook_examples(TOK, 500, n=5, seed=9)
    index = {tuple(e.prompt): i for i, e in enumerate(exs)}
    # budget: answer + 2 tokens -> the oracle's "\nWhat" is cut after the newline; the first line is compared
    perfect = exact_match(exs, oracle(index), TOK, batch_size=3)
    assert (perfect.accuracy, perfect.correct, perfect.examples) == (1.0, 10, 10)
    half = exact_match(exs, oracle(index, wrong={0, 2, 4, 6, 8}), TOK)
    assert half.accuracy == 0.5 and [r["correct"] for r in half.records] == [i % 2 == 1 for i in range(10)]
    assert half.records[0]["layout"] == "reversed" and half.records[0]["output"] == " 000-000-0000\n"
    assert answer_matches(" 123-456-7890\n\nWhat", " 123-456-7890")
    assert not answer_matches(" 123-456-78901", " 123-456-7890") and not answer_matches("\n123-456-7890", "123")
    with pytest.raises(HybridctlError, match="returned 0"):
        exact_match(exs, lambda p, n: [], TOK)


def test_greedy_forward_matches_generate():
    from hybridctl.generate import generate

    model = materialize(build_model(tiny_config()), "cpu", seed=0).eval()
    exs = copy_examples(TOK, 16, n=2, seed=4)
    fn = greedy_forward(model)
    got = fn([e.prompt for e in exs], 4)
    assert got == generate(model, [e.prompt for e in exs], max_new_tokens=4, use_eos=False).tokens
    res = exact_match(exs, greedy_forward(model, vocab_size=TOK.vocab_size, eos_id=TOK.eos_id), TOK,
                      max_new_tokens=3)
    assert res.examples == 2 and res.accuracy == 0.0 and all(len(r["output"]) <= 3 for r in res.records)


class _PositionLM(torch.nn.Module):
    """Predicts (x + 1) mod V with logit 5 from position ``k`` on; a uniform distribution before it."""

    def __init__(self, vocab: int, k: int) -> None:
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab, dtype=torch.float64)
        sure = 5.0 * torch.nn.functional.one_hot((x + 1) % self.vocab, self.vocab).double()
        logits[:, self.k:] = sure[:, self.k:]
        return logits


def test_perplexity_by_position_analytic():
    V, k, window = 7, 5, 16
    stream = torch.arange(200) % V
    rows = perplexity_by_position(_PositionLM(V, k), stream, window=window, stride=3, edges=[0, k, window],
                                  device="cpu", batch_size=4)
    n_windows = len(range(0, 200 - window, 3))
    assert [(r["lo"], r["hi"], r["tokens"]) for r in rows] == [(0, k, k * n_windows),
                                                             (k, window, (window - k) * n_windows)]
    assert rows[0]["loss"] == pytest.approx(math.log(V))
    assert rows[1]["loss"] == pytest.approx(math.log(1 + (V - 1) * math.exp(-5.0)))
    assert rows[1]["ppl"] == pytest.approx(math.exp(rows[1]["loss"]))
    assert position_buckets(16) == [0, 1, 2, 4, 8, 16] and position_buckets(12) == [0, 1, 2, 4, 8, 12]
    with pytest.raises(HybridctlError, match="fewer than"):
        perplexity_by_position(_PositionLM(V, k), stream[:10], window=16, device="cpu")
    with pytest.raises(HybridctlError, match="edges"):
        perplexity_by_position(_PositionLM(V, k), stream, window=16, edges=[0, 8], device="cpu")


def test_perplexity_by_position_matches_a_plain_loop():
    model = materialize(build_model(tiny_config()), "cpu", seed=1).double().eval()
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 256, (100,), generator=g)
    window, stride = 32, 20
    rows = perplexity_by_position(model, stream, window=window, stride=stride, batch_size=3)
    sums, counts = [0.0] * 6, [0] * 6
    edges = [0, 1, 2, 4, 8, 16, 32]
    for s in range(0, len(stream) - window, stride):
        x = stream[s:s + window + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(x[None, :-1])[0].double(), -1)
        for p in range(window):
            b = max(i for i in range(6) if edges[i] <= p)
            sums[b] -= float(logp[p, x[p + 1]])
            counts[b] += 1
    assert [r["tokens"] for r in rows] == counts
    for r, s_, c in zip(rows, sums, counts):
        assert r["loss"] == pytest.approx(s_ / c, rel=1e-9)
