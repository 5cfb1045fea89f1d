"""Corpora on their own: file-reader errors, the Megatron .bin/.idx format (write, read, header, corrupt files). Each source kind through the loader is tested in test_data.py."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from hybridctl.config import HybridctlError
from hybridctl.corpora import MegatronDataset, iter_documents, write_megatron_dataset


def test_file_reader_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok one"}\n{"text": "ok two"}\n{"text": broken\n')
    with pytest.raises(HybridctlError, match=r"bad.jsonl:3: not a JSON object"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    (tmp_path / "field.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(HybridctlError, match="no string field 'text'.*content"):
        list(iter_documents(str(tmp_path / "field.jsonl")))
    (tmp_path / "blob.dat").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(HybridctlError, match="binary data"):
        list(iter_documents(str(tmp_path / "blob.dat")))


def test_megatron_write_read_and_header(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(1, 40, size=25)]
    prefix = tmp_path / "corpus_text_document"
    bin_path, idx_path = write_megatron_dataset(prefix, docs, dtype=np.uint16)
    raw = idx_path.read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", raw[9:34]) == (1, 8, 25, 26)  # version, dtype code (uint16), sequences, doc index
    sizes = np.frombuffer(raw, "<i4", 25, 34)
    pointers = np.frombuffer(raw, "<i8", 25, 34 + 4 * 25)
    doc_idx = np.frombuffer(raw, "<i8", 26, 34 + 12 * 25)
    assert sizes.tolist() == [len(d) for d in docs] and doc_idx.tolist() == list(range(26))
    assert pointers.tolist() == (np.concatenate([[0], np.cumsum(sizes)[:-1]]) * 2).tolist()
    assert bin_path.stat().st_size == 2 * sum(map(len, docs))
    ds = MegatronDataset(prefix)
    assert len(ds) == 25 and all(ds.document(k).tolist() == d for k, d in enumerate(docs))
    for source in (str(prefix), str(idx_path)):  # the prefix, or the .idx itself
        got = list(iter_documents(source, eval_every=1000))
        assert sorted(map(tuple, map(np.ndarray.tolist, got))) == sorted(map(tuple, docs))
    write_megatron_dataset(tmp_path / "wide", [[1, 2, 300]], dtype=np.int32)
    assert MegatronDataset(tmp_path / "wide").document(0).tolist() == [1, 2, 300]


def test_megatron_bad_files(tmp_path):
    prefix = tmp_path / "d"
    write_megatron_dataset(prefix, [[1, 2, 3], [4, 5]])
    good = (tmp_path / "d.idx").read_bytes()

    def corrupt(data: bytes, match: str) -> None:
        (tmp_path / "d.idx").write_bytes(data)
        with pytest.raises(HybridctlError, match=match):
            MegatronDataset(prefix)

    corrupt(b"NOTANIDX" + good[8:], "not a Megatron index")
    corrupt(good[:9] + struct.pack("<Q", 2) + good[17:], "unsupported index version 2")
    corrupt(good[:17] + bytes([7]) + good[18:], "dtype code 7")
    corrupt(good[:-4], "truncated")
    (tmp_path / "d.idx").write_bytes(good)
    (tmp_path / "d.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(HybridctlError, match="d.bin: truncated"):
        MegatronDataset(prefix)
    (tmp_path / "d.bin").unlink()
    with pytest.raises(HybridctlError, match="index without its .bin"):
        list(iter_documents(str(tmp_path / "d.idx")))
    with pytest.raises(HybridctlError, match="must be one of"):
        write_megatron_dataset(tmp_path / "f", [[1]], dtype=np.float32)
