"""The phonebook training task in the paper's (= bench's evaluation) layout: examples are exactly the evaluation
prompts, the targets are exactly the answers (+ their terminators), sizes mix, bad options fail in one line."""

import numpy as np
import pytest

from hybridctl.config import HybridctlError
from hybridctl.data import IGNORE_INDEX, build_loader
from hybridctl.tasks import make_task, phonebook_examples
from hybridctl.tokenizer import ByteTokenizer

from test_evaluation import parse_phonebook

TOK = ByteTokenizer()


def docs(layout, n=40, **opts):
    task = make_task("phonebook", TOK, 1024, 0, "train", {"layout": layout, **opts})
    return [d for _, d in zip(range(n), (d for _, d in task.documents(0, 0)))]


@pytest.mark.parametrize("layout", ["standard", "reversed"])
def test_paper_layout_examples_are_eval_prompts_with_answer_targets(layout):
    for doc in docs(layout, n_entries=12, min_entries=1):
        assert doc.ids[0] == TOK.bos_id and doc.ids[-1] == TOK.eos_id and doc.targets[-1]
        last = np.flatnonzero(~doc.targets[:-1])[-1] + 1  # the query's answer: the last run of targets before EOS
        prompt = TOK.decode(doc.ids[:last].tolist())
        book, shots, name = parse_phonebook(prompt)  # the evaluation's own parser: the same layout
        phones = dict(book)
        assert 1 <= len(book) <= 12 and len(set(phones)) == len(book)
        assert TOK.decode(doc.ids[last:-1].tolist()) == " " + phones[name]
        assert len(shots) == min(2, len(book) - 1) and all(phones[n] == p for n, p in shots)
        assert prompt.startswith("Please find the phone number for ") == (layout == "reversed")
        # targets: each shot's " ddd-ddd-dddd\n", then the query's " ddd-ddd-dddd" + EOS; nothing else
        target_text = TOK.decode(doc.ids[doc.targets].tolist())
        assert target_text == "".join(f" {p}\n" for _, p in shots) + " " + phones[name]


def test_paper_layout_matches_phonebook_examples_text():
    """A book of the evaluation's size in the training stream has the evaluation's text layout, byte for byte."""
    [ex] = phonebook_examples(TOK, 700, depth=0.5, seed=1)
    book, shots, name = parse_phonebook(ex.prompt_text)
    lines = "".join(f"{n}: {p}\n" for n, p in book) + "\n"
    shot_text = "".join(f"What is the phone number for {n}?\nAnswer: {p}\n\n" for n, p in shots)
    assert ex.prompt_text == lines + shot_text + f"What is the phone number for {name}?\nAnswer:"
    doc = docs("standard", n=1, n_entries=len(book))[0]
    text = TOK.decode(doc.ids.tolist())
    assert text.count("\n\nWhat is the phone number for ") == 3 and len(parse_phonebook(
        text[:text.rindex("Answer:") + 7])[0]) == len(book)


def test_sizes_mix_fill_both_layouts_and_loader_contract():
    sizes = [len(parse_phonebook(TOK.decode(d.ids[:np.flatnonzero(~d.targets[:-1])[-1] + 1].tolist()))[0])
             for d in docs("standard", n=60, n_entries=6, min_entries=1)]
    assert set(sizes) == set(range(1, 7))  # uniform in [min_entries, n_entries]
    both = [TOK.decode(d.ids.tolist()).startswith("Please") for d in docs("both", n=30, n_entries=4)]
    assert 0 < sum(both) < 30
    full = docs("standard", n=3)  # no n_entries: as many as fit the row
    assert all(900 < len(d.ids) <= 1025 for d in full)
    b = next(build_loader(source="phonebook", tokenizer=TOK, seq_len=512, batch_size=2, seed=0,
                          task_options={"layout": "both", "n_entries": 8, "min_entries": 1}))
    y = b["labels"]
    assert y.shape == (2, 512) and (y != IGNORE_INDEX).any()
    assert TOK.decode(y[y != IGNORE_INDEX].tolist()).replace("\n", "").replace(" ", "").replace("-", "").isdigit()


def test_bad_options_one_line():
    kw = dict(source="phonebook", tokenizer=TOK, batch_size=1)
    with pytest.raises(HybridctlError, match="layout: must be one of"):
        build_loader(**kw, seq_len=512, task_options={"layout": "sideways"})
    with pytest.raises(HybridctlError, match="need layout"):
        build_loader(**kw, seq_len=512, task_options={"min_entries": 2})
    with pytest.raises(HybridctlError, match="exceeds n_entries"):
        build_loader(**kw, seq_len=512, task_options={"layout": "standard", "n_entries": 2, "min_entries": 3})
    with pytest.raises(HybridctlError, match="over 257"):
        build_loader(**kw, seq_len=256, task_options={"layout": "standard", "n_entries": 8})
    with pytest.raises(HybridctlError, match="shots"):
        build_loader(**kw, seq_len=512, task_options={"layout": "standard", "shots": -1})
