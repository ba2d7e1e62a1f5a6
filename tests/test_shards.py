"""Sharded banks: a directory of Parquet shards reads back equal to the single-file bank, an
interrupted sharded ingest resumes from the shards already written, lean banks keep identity."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from lvm_ray.config import CorpusConfig, EncoderConfig, SplitConfig
from lvm_ray.data import bankdir
from lvm_ray.data.bank import BankError, content_hash, load_bank, save_bank
from lvm_ray.data.encoders import HashingEncoder
from lvm_ray.data.ingest import BankConflict, ingest
from lvm_ray.data.shards import ingest_sharded

ENC = EncoderConfig(name="hashing-32")
SPLIT = SplitConfig()


class Counting:
    """encode_fn that counts calls and texts and can die on a given call."""

    def __init__(self, fail_on: int | None = None):
        self.calls, self.texts, self.fail_on = 0, 0, fail_on
        self.enc = HashingEncoder(32)

    def __call__(self, texts):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        self.texts += len(texts)
        return self.enc.encode(texts)


@pytest.fixture
def corpus(tmp_path):
    lines = [json.dumps({"id": f"d{i:03d}", "text": " ".join(
        f"Document {i} has sentence {j} about topic {(i * j) % 11}." for j in range(4 + i % 9))})
        for i in range(40)]
    lines.insert(7, "not json")
    lines.insert(20, json.dumps({"id": "d003", "text": "A repeated id. It is skipped."}))
    p = tmp_path / "corpus.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return CorpusConfig(source="jsonl", path=str(p), docs_per_shard=6)


def _same(a, b):
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.doc_ids.tolist() == b.doc_ids.tolist()
    assert a.positions.tolist() == b.positions.tolist()
    assert list(a.texts) == list(b.texts)
    assert a.splits.tolist() == b.splits.tolist()


def test_sharded_bank_reads_back_equal_to_the_single_file_bank(corpus, tmp_path):
    single = ingest(corpus, ENC, SPLIT, tmp_path / "one.parquet", show_progress=False)
    res = ingest_sharded(corpus, ENC, SPLIT, tmp_path / "sharded", show_progress=False)
    assert res.n_docs == single.n_docs == 40 and res.n_concepts == single.n_concepts
    assert sorted(s.where for s in res.skipped) == sorted(s.where for s in single.skipped)
    shards = sorted((tmp_path / "sharded").glob("part-*.parquet"))
    assert len(shards) == 7  # 42 lines, 6 per partition
    a, b = load_bank(single.bank_path), load_bank(res.bank_path)
    _same(a, b)
    # The same settings and fingerprint, and the same content hash, streamed shard by shard.
    assert {k: v for k, v in a.meta.items() if k != "format"} == \
        {k: v for k, v in b.meta.items() if k != "format"}
    assert b.content_hash() == a.content_hash() == content_hash(b)
    assert b.identity() == a.identity()
    # Each shard alone is a plain Parquet file of the bank schema with global concept ids.
    t = pq.read_table(shards[1])
    assert t.column("concept_id").to_pylist()[0] == pq.read_metadata(shards[0]).num_rows
    assert json.loads(t.schema.metadata[b"lvm_ray"])["encoder"] == "hashing-32"
    # The single-file path keeps working, and a sharded re-run reuses everything.
    again = Counting()
    assert ingest_sharded(corpus, ENC, SPLIT, tmp_path / "sharded", encode_fn=again,
                          show_progress=False).reused and again.calls == 0


def test_lean_bank_is_numeric_and_keeps_identity(corpus, tmp_path):
    res = ingest_sharded(corpus, ENC, SPLIT, tmp_path / "sharded", show_progress=False)
    full, lean = load_bank(res.bank_path), load_bank(res.bank_path, lean=True)
    assert lean.doc_ids.dtype == np.int32 and lean.splits.dtype.kind == "U"
    assert lean.texts is not None and not isinstance(lean.texts, np.ndarray)
    assert [lean.doc_id(i) for i in range(len(lean))] == full.doc_ids.tolist()
    assert lean.texts[5] == full.texts[5] and lean.texts[-1] == full.texts[-1]
    assert lean.identity() == full.identity()
    assert full.lean("float16").vectors.dtype == np.float16
    np.testing.assert_array_equal(full.lean().doc_ids, lean.doc_ids)


def test_interrupted_sharded_ingest_resumes_and_ends_equal(corpus, tmp_path):
    out = tmp_path / "sharded"
    crashing = Counting(fail_on=4)  # one shard per call: dies on the 4th shard
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest_sharded(corpus, ENC, SPLIT, out, encode_fn=crashing, show_progress=False)
    assert len(list(out.glob("part-*.parquet"))) == 3
    with pytest.raises(BankError, match="interrupted"):
        load_bank(out)  # no manifest yet: never read as a bank
    resumed = Counting()
    res = ingest_sharded(corpus, ENC, SPLIT, out, encode_fn=resumed, show_progress=False)
    done = [out / f"part-{i:05d}.parquet" for i in range(3)]
    assert resumed.calls == 4 and not res.reused
    assert res.reused_docs == sum(len(set(pq.read_table(f).column("doc_id").to_pylist()))
                                  for f in done)
    fresh = ingest_sharded(corpus, ENC, SPLIT, tmp_path / "fresh", show_progress=False)
    assert resumed.texts == res.n_concepts - sum(pq.read_metadata(f).num_rows for f in done)
    _same(load_bank(out), load_bank(fresh.bank_path))
    assert load_bank(out).content_hash() == load_bank(fresh.bank_path).content_hash()


def test_sharded_bank_from_other_settings_is_never_replaced(corpus, tmp_path):
    out = tmp_path / "sharded"
    ingest_sharded(corpus, ENC, SPLIT, out, show_progress=False)
    manifest = (out / bankdir.MANIFEST).read_text()
    other = CorpusConfig(source="jsonl", path=corpus.path, docs_per_shard=6,
                         sentences_per_chunk=2)
    with pytest.raises(BankConflict, match="--overwrite"):
        ingest_sharded(other, ENC, SPLIT, out, show_progress=False)
    assert (out / bankdir.MANIFEST).read_text() == manifest
    res = ingest_sharded(other, ENC, SPLIT, out, show_progress=False, overwrite=True)
    assert load_bank(out).meta["chunking"]["sentences_per_chunk"] == 2
    assert len(list(out.glob("part-*.parquet"))) == 7 and res.n_docs == 40
    # An unfinished ingest of other settings is refused too.
    (out / bankdir.MANIFEST).unlink()
    with pytest.raises(BankConflict, match="unfinished"):
        ingest_sharded(corpus, ENC, SPLIT, out, show_progress=False)
    # A single-file bank is replaced by a sharded one only on purpose.
    single = tmp_path / "one.parquet"
    save_bank(load_bank(ingest(corpus, ENC, SPLIT, tmp_path / "x.parquet",
                               show_progress=False).bank_path), single)
    with pytest.raises(BankConflict):
        ingest_sharded(other, ENC, SPLIT, single, show_progress=False)
    assert single.is_file()


def test_max_docs_reads_only_the_partitions_it_needs(corpus, tmp_path):
    cfg = CorpusConfig(source="jsonl", path=corpus.path, docs_per_shard=6, max_docs=10)
    res = ingest_sharded(cfg, ENC, SPLIT, tmp_path / "b", show_progress=False)
    bank = load_bank(res.bank_path)
    assert res.n_docs == 10 and bank.doc_order() == [f"d{i:03d}" for i in range(10)]
    single = ingest(cfg, ENC, SPLIT, tmp_path / "one.parquet", show_progress=False)
    _same(bank, load_bank(single.bank_path))


def test_pick_longest_takes_the_same_documents_sharded_and_single(corpus, tmp_path):
    import dataclasses

    longest = dataclasses.replace(corpus, max_docs=5, pick="longest")
    single = ingest(longest, ENC, SPLIT, tmp_path / "one.parquet", show_progress=False)
    res = ingest_sharded(longest, ENC, SPLIT, tmp_path / "sharded", show_progress=False)
    a, b = load_bank(single.bank_path), load_bank(res.bank_path)
    _same(a, b)
    # The 5 longest documents (4 + i % 9 sentences): the four with i % 9 == 8, then the earliest
    # of those with i % 9 == 7 (ties go to the earlier).
    assert sorted(set(a.doc_ids.tolist())) == ["d007", "d008", "d017", "d026", "d035"]
    assert a.meta["corpus"]["pick"] == "longest" == b.meta["corpus"]["pick"]
