"""Data: each source kind through the loader, packing with document ids, determinism/resume, sharding, held-out
split, tasks. The corpus formats on their own (readers, Megatron .bin/.idx) are tested in test_corpora.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zstandard

from hybridctl.config import HybridctlError
from hybridctl.corpora import builtin_documents, iter_documents, write_megatron_dataset
from hybridctl.data import IGNORE_INDEX, build_loader
from hybridctl.evaluation import task_accuracy
from hybridctl.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS, BOS = TOK.eos_id, TOK.bos_id
WORDS = "alpha beta gamma délta ëpsilon zeta eta thêta iota kappa lambda mu 日本 ✓".split()


def paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[i] for i in rng.integers(len(WORDS), size=int(rng.integers(3, 25)))) for _ in range(n)]


@pytest.fixture
def text_dir(tmp_path):
    """Three plain-text files, paragraphs separated by (sometimes several) blank lines."""
    docs = paragraphs(36)
    for f in range(3):
        (tmp_path / f"part{f}.txt").write_text("\n\n\n".join(docs[f * 12:(f + 1) * 12]) + "\n")
    return tmp_path, docs


def check_contract(batch: dict[str, torch.Tensor], batch_size: int, seq_len: int) -> None:
    """The batch contract: shapes/dtypes, seq_idx from 0 non-decreasing, no label across a document boundary."""
    x, y, s = batch["input_ids"], batch["labels"], batch["seq_idx"]
    assert (x.dtype, y.dtype, s.dtype) == (torch.int64, torch.int64, torch.int32)
    assert x.shape == y.shape == s.shape == (batch_size, seq_len)
    assert (s[:, 0] == 0).all() and ((s.diff(dim=1) == 0) | (s.diff(dim=1) == 1)).all()
    boundary = s[:, 1:] != s[:, :-1]
    assert (y[:, :-1][boundary] == IGNORE_INDEX).all()  # nothing predicts the next document's first token
    assert (x[:, :-1][boundary] == EOS).all()  # every document ends with EOS
    inside = y[:, :-1] != IGNORE_INDEX
    assert (y[:, :-1][inside] == x[:, 1:][inside]).all()  # labels are the next input


def token_stream(docs, add_bos: bool = True) -> list[int]:
    out: list[int] = []
    for d in docs:
        if isinstance(d, str):
            out += TOK.encode(d, add_bos=add_bos) + [EOS]
        else:
            out += list(map(int, d)) + ([] if len(d) and d[-1] == EOS else [EOS])
    return out


def assert_stream_packing(loader, expected: list[int], seq_len: int) -> None:
    """Rows are stride-T windows of the document stream: inputs concatenate to it; labels are the next token."""
    rows_x, rows_y = [], []
    for batch in loader:
        check_contract(batch, loader.config.batch_size, seq_len)
        rows_x += batch["input_ids"].tolist()
        rows_y += batch["labels"].tolist()
    flat = [t for r in rows_x for t in r]
    assert flat == expected[:len(flat)] and 0 <= len(expected) - len(flat) <= 2 * loader.config.batch_size * seq_len
    for i, labels in enumerate(rows_y):
        for t, lab in enumerate(labels):
            assert lab in (IGNORE_INDEX, expected[i * seq_len + t + 1])
            if lab == IGNORE_INDEX:  # masked only where the next token starts a document
                assert expected[i * seq_len + t] == EOS


def test_text_files_split_on_blank_lines_and_pack(text_dir):
    path, docs = text_dir
    got = list(iter_documents(str(path), seed=3, shuffle_buffer=4)) + list(iter_documents(str(path), split="eval"))
    assert sorted(got) == sorted(docs)
    loader = build_loader(source=str(path), tokenizer=TOK, seq_len=16, batch_size=2, seed=3, shuffle_buffer=4,
                          epochs=1)
    assert_stream_packing(loader, token_stream(iter_documents(str(path), seed=3, shuffle_buffer=4)), 16)


def test_jsonl_zst_glob_and_content_detection(tmp_path):
    docs = paragraphs(20, seed=1)
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:10]) + "\n")
    cctx = zstandard.ZstdCompressor()
    # Two zstd frames, under a name that says .txt: content (the magic bytes), not the name, decides.
    blob = cctx.compress("\n".join(lines[10:15]).encode() + b"\n") + cctx.compress("\n".join(lines[15:]).encode())
    (tmp_path / "b.txt").write_bytes(blob)
    (tmp_path / "c.txt.zst").write_bytes(cctx.compress(b"plain one\n\nplain two\n"))
    every = dict(text_field="body", eval_every=1000)  # eval_every large: (nearly) everything is train
    got = set()
    for source in ("*.txt", "a.jsonl", "c.txt.zst"):
        got |= set(iter_documents(str(tmp_path / source), **every))
    assert got == set(docs) | {"plain one", "plain two"}
    assert len(list(iter_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], **every))) == 20
    loader = build_loader(source=str(tmp_path / "[ab].*"), tokenizer=TOK, seq_len=32, batch_size=3, seed=0,
                          text_field="body", eval_every=1000, epochs=1)
    assert_stream_packing(loader, token_stream(iter_documents(str(tmp_path / "[ab].*"), **every)), 32)


def test_file_errors(tmp_path):
    def first(source, **kw):
        return next(build_loader(source=source, tokenizer=TOK, seq_len=8, batch_size=1, **kw))

    with pytest.raises(HybridctlError, match="data source not found"):
        first(str(tmp_path / "missing.jsonl"))
    with pytest.raises(HybridctlError, match="names no files"):
        first(str(tmp_path / "*.nothing"))
    (tmp_path / "one.txt").write_text("a single document\n")
    outcomes = []
    for split in ("train", "eval"):  # one document: exactly one split is empty, and says so
        try:
            first(str(tmp_path / "one.txt"), split=split)
            outcomes.append("ok")
        except HybridctlError as e:
            assert "no documents in the" in str(e)
            outcomes.append("empty")
    assert sorted(outcomes) == ["empty", "ok"]


def test_builtin_corpus_yields_text_and_heldout_is_disjoint():
    alldocs = builtin_documents()
    assert len(alldocs) > 50 and all(isinstance(d, str) and d for d in alldocs)
    train, held = list(iter_documents("builtin")), list(iter_documents("builtin", split="eval"))
    assert train and held and not set(train) & set(held)
    assert sorted(train + held) == sorted(alldocs)
    assert list(iter_documents("builtin", seed=5, split="eval")) != [] and \
        set(iter_documents("builtin", seed=5, split="eval")) == set(held)  # the split does not depend on the seed
    batch = next(build_loader(source="builtin", tokenizer=TOK, seq_len=64, batch_size=2, seed=0, split="eval"))
    check_contract(batch, 2, 64)
    assert TOK.decode(batch["input_ids"][0][1:40].tolist()) in "".join(held)


def test_deterministic_and_seed_dependent():
    def first_batches(seed):
        loader = build_loader(source="builtin", tokenizer=TOK, seq_len=32, batch_size=2, seed=seed)
        return [next(loader)["input_ids"] for _ in range(3)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def assert_resumes(make, skip: int, take: int = 4) -> None:
    """k batches, save state (through JSON), a new loader with that state yields the same next batches."""
    a = make()
    for _ in range(skip):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(take)]
    b = make()
    b.load_state_dict(state)
    for want, got in zip(expected, (next(b) for _ in range(take))):
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert b.state_dict() == a.state_dict()


def test_resume_files_across_epochs(text_dir):
    path, _ = text_dir
    make = lambda: build_loader(source=str(path), tokenizer=TOK, seq_len=16, batch_size=2, seed=7,  # noqa: E731
                                shuffle_buffer=3)
    loader = make()
    for _ in range(150):
        next(loader)
    assert loader.state_dict()["epoch"] >= 1  # the resume below starts after an epoch boundary
    assert_resumes(make, skip=150)
    assert_resumes(make, skip=5)


@pytest.mark.parametrize("source", ["builtin", "phonebook", "copy"])
def test_resume_builtin_and_tasks(source):
    make = lambda: build_loader(source=source, tokenizer=TOK, seq_len=64, batch_size=2, seed=3,  # noqa: E731
                                rank=1, world_size=2)
    assert_resumes(make, skip=3)


def test_state_mismatch_is_refused():
    a = build_loader(source="builtin", tokenizer=TOK, seq_len=32, batch_size=2, seed=1)
    b = build_loader(source="builtin", tokenizer=TOK, seq_len=64, batch_size=2, seed=1)
    with pytest.raises(HybridctlError, match="seq_len was 32"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(HybridctlError, match="unknown format"):
        b.load_state_dict({"format": "other"})


def test_state_of_an_older_version_still_loads():
    # earlier versions also wrote "batches" and "global_batch_size" (never read): such a state resumes the same
    make = lambda: build_loader(source="builtin", tokenizer=TOK, seq_len=32, batch_size=2, seed=1)  # noqa: E731
    a = make()
    next(a)
    old = {**a.state_dict(), "batches": 1, "global_batch_size": 2}
    assert "batches" not in a.state_dict() and "global_batch_size" not in a.state_dict()
    b = make()
    b.load_state_dict(old)
    assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


@pytest.mark.parametrize("source", ["builtin", "phonebook"])
def test_rank_sharding_unions_to_the_single_process_batch(source):
    single = build_loader(source=source, tokenizer=TOK, seq_len=96, batch_size=4, seed=2)
    ranks = [build_loader(source=source, tokenizer=TOK, seq_len=96, batch_size=2, seed=2, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3):
        whole = next(single)
        parts = [next(r) for r in ranks]
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        assert not torch.equal(parts[0]["input_ids"], parts[1]["input_ids"])
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()  # rank-independent


def test_megatron_loader_packs_resumes_and_checks_ids(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(1, 40, size=25)]
    docs[3] = docs[3] + [EOS]  # already ends with EOS: none is added
    prefix = tmp_path / "corpus_text_document"
    bin_path, _ = write_megatron_dataset(prefix, docs, dtype=np.uint16)
    loader = build_loader(source=str(prefix), tokenizer=TOK, seq_len=16, batch_size=2, seed=4, epochs=1)
    assert_stream_packing(loader, token_stream(iter_documents(str(prefix), seed=4)), 16)
    assert_resumes(lambda: build_loader(source=str(bin_path), tokenizer=TOK, seq_len=16, batch_size=2, seed=4),
                   skip=20)
    write_megatron_dataset(tmp_path / "wide", [[1, 2, 300]], dtype=np.int32)
    with pytest.raises(HybridctlError, match="outside the tokenizer's vocabulary"):
        next(build_loader(source=str(tmp_path / "wide"), tokenizer=TOK, seq_len=4, batch_size=1, eval_every=1000))


def answers(batch, row: int):
    """(prompt text, answer text) of each example in a row, from labels and seq_idx."""
    x, y, s = batch["input_ids"][row], batch["labels"][row], batch["seq_idx"][row]
    out = []
    for doc in s.unique().tolist():
        pos = ((s == doc) & (y != IGNORE_INDEX)).nonzero().flatten()
        if len(pos):
            assert (pos.diff() == 1).all()  # the answer is one contiguous span
            prompt = TOK.decode(x[(s == doc).nonzero().flatten()[0]:pos[0] + 1].tolist())
            out.append((prompt, TOK.decode(y[pos].tolist()), len(pos)))
    return out


def test_phonebook_answer_is_the_queried_number_and_mask_is_exact():
    loader = build_loader(source="phonebook", tokenizer=TOK, seq_len=256, batch_size=4, seed=0)
    batch = next(loader)
    check_contract(batch, 4, 256)
    for row in range(4):
        [(prompt, answer, n_answer_tokens)] = answers(batch, row)  # default: one example fills the context
        book, query = prompt.split("\n\n")
        entries = dict(line.split(": ") for line in book.split("\n"))
        assert len(entries) >= 5 and query.endswith(": ")
        assert answer == entries[query[:-2]]
        assert n_answer_tokens == len(answer.encode()) == 12  # the mask covers exactly the answer ("ddd-ddd-dddd")
    several = next(build_loader(source="phonebook", tokenizer=TOK, seq_len=512, batch_size=1, seed=0,
                                task_options={"n_entries": 4}))
    check_contract(several, 1, 512)
    found = answers(several, 0)
    assert len(found) >= 3  # whole examples packed into one row
    for prompt, answer, _ in found:
        book, query = prompt.split("\n\n")
        assert len(book.split("\n")) == 4 and dict(ln.split(": ") for ln in book.split("\n"))[query[:-2]] == answer
    with pytest.raises(HybridctlError, match="do not fit"):
        build_loader(source="phonebook", tokenizer=TOK, seq_len=64, batch_size=1, task_options={"n_entries": 50})
    with pytest.raises(HybridctlError, match="unknown option"):
        build_loader(source="phonebook", tokenizer=TOK, seq_len=64, batch_size=1, task_options={"entries": 5})


def test_copy_task_and_eval_stream_differs():
    kw = dict(source="copy", tokenizer=TOK, seq_len=64, batch_size=2, seed=0, task_options={"max_len": 12})
    batch = next(build_loader(**kw))
    check_contract(batch, 2, 64)
    for prompt, answer, _ in answers(batch, 0):
        assert prompt == answer + "\n" and 1 <= len(answer) <= 12
    held = next(build_loader(**kw, split="eval"))
    assert not torch.equal(batch["input_ids"], held["input_ids"])
    with pytest.raises(HybridctlError, match="max_len"):
        build_loader(**{**kw, "task_options": {"max_len": 100}})


def test_task_accuracy_counts_examples_and_tokens():
    batch = next(build_loader(source="phonebook", tokenizer=TOK, seq_len=512, batch_size=2, seed=1,
                              task_options={"n_entries": 3}))
    labels = batch["labels"]
    logits = torch.nn.functional.one_hot(labels.clamp(min=0), TOK.vocab_size).float()
    perfect = task_accuracy(logits, batch)
    n_examples = sum(len(answers(batch, r)) for r in range(2))
    assert (perfect.exact_match, perfect.token_accuracy, perfect.examples) == (1.0, 1.0, n_examples)
    assert perfect.tokens == 12 * n_examples
    wrong = labels.clone()
    first = (labels != IGNORE_INDEX).nonzero()[0]
    wrong[first[0], first[1]] = 0
    acc = task_accuracy(wrong, batch)
    assert acc.exact_match == pytest.approx((n_examples - 1) / n_examples)
    assert acc.token_accuracy == pytest.approx(1 - 1 / perfect.tokens)


def test_hf_tokenizer_adds_bos_per_document(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from hybridctl.tokenizer import load_tokenizer

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator(paragraphs(50), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 1, True)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in paragraphs(30, seed=2)))
    loader = build_loader(source=str(tmp_path / "c.jsonl"), tokenizer=tok, seq_len=24, batch_size=2, seed=0,
                          epochs=1)
    docs = list(iter_documents(str(tmp_path / "c.jsonl")))
    expected = [t for d in docs for t in tok.encode(d) + [1]]
    flat = [t for b in loader for row in b["input_ids"].tolist() for t in row]
    assert flat == expected[:len(flat)] and flat.count(0) >= 10


def test_config_errors():
    def make(**kw):
        return build_loader(**{"source": "builtin", "tokenizer": TOK, "seq_len": 8, "batch_size": 1, **kw})

    for kw, match in [({"seq_len": 0}, "data.seq_len"), ({"split": "test"}, "data.split"),
                      ({"rank": 2, "world_size": 2}, "rank < world_size"), ({"seed": -1}, "data.seed"),
                      ({"source": ["builtin", "x.txt"]}, "cannot be combined"), ({"source": []}, "data.source"),
                      ({"task_options": {"n_entries": 3}}, "only for the tasks"), ({"eval_every": 1}, "eval_every"),
                      ({"epochs": 0}, "data.epochs")]:
        with pytest.raises(HybridctlError, match=match):
            make(**kw)
