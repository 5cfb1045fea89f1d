"""Tokenizers: round trips, streaming decode, save/load by content, configuration honoured, clear errors."""

from __future__ import annotations

import io
import json

import pytest

from hybridctl.config import HybridctlError
from hybridctl.tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, build_tokenizer, decode_stream,
                                 load_tokenizer)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "héllo wörld — ünïcode façade",
         "日本語のテキストと絵文字 🙂👍", "Mamba-2 hybrids mix SSM, attention and MLP layers.",
         "price: 12 € or 10 £, naïve café"] * 20
SAMPLE = "héllo 日本 €uro 🙂 plain ascii"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE trained here, with a template that puts <s> in front (as Llama-3's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A tiny SentencePiece BPE (byte fallback) trained here from an in-memory iterator."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=model, vocab_size=340,
                                             model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                             minloglevel=2)
    d = tmp_path_factory.mktemp("sp")
    (d / "tokenizer.model").write_bytes(model.getvalue())
    return d


def all_tokenizers(hf_dir, sp_dir):
    return [ByteTokenizer(), load_tokenizer(hf_dir), load_tokenizer(sp_dir)]


def test_byte_round_trip_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.kind) == (259, 256, 257, 258, "byte")
    ids = tok.encode(SAMPLE)
    assert ids[0] == 256 and ids[1:] == list(SAMPLE.encode("utf-8"))
    assert tok.encode(SAMPLE, add_bos=False) == list(SAMPLE.encode("utf-8"))
    assert tok.decode(ids + [257, 258]) == SAMPLE
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # an incomplete character is replaced, not an error
    assert ByteTokenizer(add_bos=False).encode("a") == [97]


def test_byte_stream_decoder_holds_back_partial_characters():
    tok = ByteTokenizer()
    euro = list("€".encode())
    dec = tok.stream_decoder()
    assert [dec.push(b) for b in euro[:2]] == ["", ""]
    assert dec.push(euro[2]) == "€"
    assert dec.push(257) == ""
    dec.push(0xF0)
    assert dec.flush() == "\ufffd"  # an unfinished character at the end comes out replaced
    pieces = list(decode_stream(tok, tok.encode(SAMPLE)))
    assert "".join(pieces) == SAMPLE and not any("\ufffd" in p for p in pieces)


def test_round_trips_all_kinds(hf_dir, sp_dir):
    for tok in all_tokenizers(hf_dir, sp_dir):
        for text in (SAMPLE, TEXTS[2], ""):
            ids = tok.encode(text, add_bos=False)
            assert tok.decode(ids) == text, tok.kind
        assert tok.encode_batch(TEXTS[:3], add_bos=False) == [tok.encode(t, add_bos=False) for t in TEXTS[:3]]


def test_streaming_matches_decode_and_splits_multibyte(hf_dir, sp_dir):
    for tok in all_tokenizers(hf_dir, sp_dir):
        ids = tok.encode(SAMPLE)
        pieces = list(decode_stream(tok, ids))
        assert "".join(pieces) == SAMPLE, tok.kind
        assert not any("\ufffd" in p for p in pieces), (tok.kind, pieces)
    # 🚀 is not in the training text, so every tokenizer spells it with (at least three) byte-level tokens: the stream
    # must emit nothing of it until the last one.
    for tok in all_tokenizers(hf_dir, sp_dir):
        ids = tok.encode("ab 🚀", add_bos=False)
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids]
        assert pieces[-1].endswith("🚀") and pieces[-3:-1] == ["", ""], (tok.kind, pieces)
        assert "".join(pieces) + dec.flush() == "ab 🚀"


def test_stream_decoder_decodes_the_prefix_once_per_emission(hf_dir, sp_dir, monkeypatch):
    for tok in all_tokenizers(hf_dir, sp_dir):
        if tok.kind == "byte":
            continue  # exact incremental UTF-8 decoder, no window
        ids = tok.encode("ab 🚀", add_bos=False)  # the last three tokens emit nothing until the end
        calls = []
        real = tok.decode
        monkeypatch.setattr(tok, "decode", lambda xs, *a, **k: calls.append(list(xs)) or real(xs, *a, **k))
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids]
        assert "".join(pieces) + dec.flush() == "ab 🚀", tok.kind
        # one decode of the growing window per push, plus one of the prefix per window position (not per push)
        emissions = sum(1 for p in pieces if p)
        assert len(calls) <= len(ids) + emissions + 2, (tok.kind, len(calls), len(ids))
        monkeypatch.undo()


def test_stream_context_keeps_the_leading_space(hf_dir, sp_dir):
    for tok in all_tokenizers(hf_dir, sp_dir):
        prompt, generated = tok.encode("hello", add_bos=False), tok.encode("hello world", add_bos=False)
        assert generated[:len(prompt)] == prompt, tok.kind
        text = "".join(decode_stream(tok, generated[len(prompt):], context=prompt))
        assert text == " world", (tok.kind, text)


def test_hf_configuration_is_honoured(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf"
    # No tokenizer_config.json: BOS from the template, EOS from the tokenizer's own special tokens.
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 0, None, True)
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_bos=False)[0] != 1
    assert tok.encode("hi")[-1] != tok.eos_id  # prompts never get an EOS
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "eos_token": {"content": "<s>"}, "pad_token": "<pad>"}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")  # a direct file path reads the config beside it
    assert (tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, False)
    assert tok.encode("hi")[0] != 1


def test_sentencepiece_add_bos_follows_config(sp_dir, tmp_path):
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, None, False)
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos and tok.encode("x")[0] == 1


@pytest.mark.parametrize("kind", ["byte", "hf", "sentencepiece"])
def test_save_and_load_each_kind(kind, hf_dir, sp_dir, tmp_path):
    tok = {"byte": ByteTokenizer(add_bos=False), "hf": load_tokenizer(hf_dir),
           "sentencepiece": load_tokenizer(sp_dir)}[kind]
    written = tok.save(tmp_path / "ckpt")
    assert all(p.is_file() for p in written)
    assert json.loads((tmp_path / "ckpt" / "hybridctl_tokenizer.json").read_text())["kind"] == kind
    again = load_tokenizer(tmp_path / "ckpt")
    assert (again.kind, again.vocab_size, again.bos_id, again.eos_id, again.pad_id, again.add_bos) == \
        (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos)
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert build_tokenizer(str(tmp_path / "ckpt")).kind == kind


def test_directory_detection_precedence(hf_dir, sp_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert load_tokenizer(tmp_path).kind == "hf"  # a foreign HF directory: the fast tokenizer wins
    load_tokenizer(sp_dir).save(tmp_path)  # saving writes the marker, which then decides
    assert load_tokenizer(tmp_path).kind == "sentencepiece"
    ByteTokenizer().save(tmp_path)
    assert load_tokenizer(tmp_path).kind == "byte"
    assert build_tokenizer("byte").kind == "byte"


def test_bad_input_errors(tmp_path, hf_dir):
    with pytest.raises(HybridctlError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(HybridctlError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(HybridctlError, match="not readable JSON|cannot load"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(HybridctlError, match="cannot load Hugging Face tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.model").write_bytes(b"\x0agarbage protobuf")
    with pytest.raises(HybridctlError, match="cannot load SentencePiece model"):
        load_tokenizer(tmp_path / "x.model")
    (tmp_path / "m.json").write_text('{"kind": "tiktoken"}')
    with pytest.raises(HybridctlError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path / "m.json")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "cfg" / "tokenizer_config.json").write_text('{"bos_token": "<not-a-token>"}')
    with pytest.raises(HybridctlError, match="not in the vocabulary"):
        load_tokenizer(tmp_path / "cfg")
    with pytest.raises(HybridctlError, match="expected 'byte' or a path"):
        build_tokenizer("  ")
    with pytest.raises(HybridctlError, match="outside the tokenizer's vocabulary"):
        ByteTokenizer().decode([65, 300])


def test_encode_with_bos_requires_a_bos(sp_dir, tmp_path):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=model, vocab_size=70,
                                             bos_id=-1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None and not tok.add_bos
    with pytest.raises(HybridctlError, match="no BOS token"):
        tok.encode("a", add_bos=True)


# ---- detection by content (the paper's Megatron releases: mt_nlg_plus_…_256k.model) ----------------------------

ODD_SP_NAME = "mt_nlg_plus_multilingual_ja_zh_the_stack_frac_015_256k.model"


def test_tokenizer_files_are_found_by_content(hf_dir, sp_dir, tmp_path, caplog):
    from hybridctl.tokenizer import find_tokenizer, tokenizer_file_kind

    d = tmp_path / "release"
    d.mkdir()
    (d / "config.json").write_text('{"model": {"vocab": 1}, "added_tokens": []}')  # never a tokenizer, by name
    (d / "latest_checkpointed_iteration.txt").write_text("release")
    (d / "junk.model").write_bytes(b"\x0a\x05\x0a\x01a" + b"\xff" * 40)  # protobuf-looking, not SentencePiece
    (d / "other.json").write_text('{"model": "x"}')
    assert find_tokenizer(d) is None and tokenizer_file_kind(d / "junk.model") is None
    (d / ODD_SP_NAME).write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert tokenizer_file_kind(d / ODD_SP_NAME) == "sentencepiece"
    assert find_tokenizer(d) == d / ODD_SP_NAME
    tok = load_tokenizer(d)
    assert tok.kind == "sentencepiece" and tok.encode(SAMPLE) == load_tokenizer(sp_dir).encode(SAMPLE)
    # two candidates: the tokenizers JSON wins and the choice is said
    (d / "vocab_v2.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    with caplog.at_level("WARNING", logger="hybridctl.tokenizer"):
        assert find_tokenizer(d) == d / "vocab_v2.json"
    assert f"several tokenizer files ({ODD_SP_NAME}, vocab_v2.json); using vocab_v2.json" in caplog.text.replace(
        f"vocab_v2.json, {ODD_SP_NAME}", f"{ODD_SP_NAME}, vocab_v2.json")
    assert load_tokenizer(d).kind == "hf"
    # a standard name still wins, without a search
    (d / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert find_tokenizer(d) == d


def _odd_named_checkpoints(tmp_path, sp_model: bytes):
    """A Megatron legacy dir and an HF NemotronH dir written from one tiny model, each carrying only the SentencePiece
    model under the Megatron releases' name."""
    from conftest import tiny_config

    from hybridctl.checkpoint.native import save_model
    from hybridctl.convert import convert
    from hybridctl.model import build_model, materialize

    cfg = tiny_config(pattern="M*-", vocab_size=384, d_model=64, mamba=dict(d_state=8, headdim=16, ngroups=2),
                      attention=dict(n_heads=2, n_kv_heads=1, head_dim=32), mlp=dict(hidden_size=64))
    save_model(materialize(build_model(cfg), "cpu", seed=0), tmp_path / "native", tokenizer=None)
    dirs = {}
    for to in ("megatron-legacy", "hf"):
        out = tmp_path / to
        res = convert(src=tmp_path / "native", to=to, out=out, progress=False)
        assert res.tokenizer is None  # the no-tokenizer case is said, not silent
        (out / ODD_SP_NAME).write_bytes(sp_model)
        dirs[to] = out
    return dirs


def test_odd_named_sentencepiece_generates_and_converts(sp_dir, tmp_path):
    """Defect 5: generate on such a directory stopped with "carries no tokenizer"; convert wrote none, silently."""
    import sentencepiece
    from typer.testing import CliRunner

    from hybridctl.cli import app
    from hybridctl.convert import convert
    from hybridctl.generate import generate

    proto = (sp_dir / "tokenizer.model").read_bytes()  # trained at test time (the sp_dir fixture), 340 pieces
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    dirs = _odd_named_checkpoints(tmp_path, proto)
    for to, d in dirs.items():
        res = generate(d, "quick brown", max_new_tokens=4)
        assert res.prompt_tokens[0] == len(sp.encode("quick brown"))  # SentencePiece ids, no BOS (no config)
        assert 0 < len(res.tokens[0]) <= 4 and res.texts[0] == sp.decode(res.tokens[0])
        out = tmp_path / f"{to}-native"
        conv = convert(src=d, to="native", out=out, progress=False)
        assert conv.tokenizer is not None and conv.tokenizer.endswith(ODD_SP_NAME)
        carried = load_tokenizer(out)
        assert carried.kind == "sentencepiece" and carried.encode(SAMPLE) == sp.encode(SAMPLE)
    # the CLI summary says where the tokenizer came from, and says when there is none
    r = CliRunner().invoke(app, ["convert", str(dirs["hf"]), "--to", "native", "--out", str(tmp_path / "x"),
                                 "--dry-run"])
    assert r.exit_code == 0 and ODD_SP_NAME in r.stdout, r.output
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "native"), "--to", "hf", "--out", str(tmp_path / "y"),
                                 "--dry-run"])
    assert r.exit_code == 0 and "none found in the source: none written" in r.stdout, r.output
