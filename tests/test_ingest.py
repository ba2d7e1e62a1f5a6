import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvm_ray.config import CorpusConfig, EncoderConfig, SplitConfig
from lvm_ray.data.bank import BankError, load_bank, save_bank
from lvm_ray.data.chunking import chunk_document
from lvm_ray.data.encoders import HashingEncoder
from lvm_ray.data.ingest import (
    BankConflict,
    IngestError,
    cache_dir_for,
    finish_ingest,
    group_vectors,
    ingest,
    plan_ingest,
)
from lvm_ray.data.windows import assign_splits, check_split_disjoint

ENC = EncoderConfig(name="hashing")
SPLIT = SplitConfig()
TEXTS = {
    f"doc{i:02d}.txt": " ".join(f"Document {i} sentence {j} talks about topic {i * j}."
                                for j in range(3 + i % 4))
    for i in range(8)
}


class CountingEncode:
    """encode_fn that records every text it encodes and can fail on a given call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.texts: list[str] = []
        self.fail_on_call = fail_on_call
        self.enc = HashingEncoder(64)

    def __call__(self, texts):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.texts += texts
        return self.enc.encode(texts)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in TEXTS.items():
        (root / name).write_text(text)
    (root / "zz_empty.txt").write_text("")
    return CorpusConfig(source="folder", path=str(root))


def run(corpus, out, fn=None, **kw):
    return ingest(corpus, ENC, SPLIT, out, encode_fn=fn, show_progress=False, **kw)


def test_round_trip_plain_pyarrow(corpus, tmp_path):
    out = tmp_path / "bank.parquet"
    res = run(corpus, out)
    assert res.bank_path == out and res.n_docs == 8 and not res.reused and res.reused_docs == 0
    assert [s.where for s in res.skipped] == ["zz_empty.txt"]

    table = pq.read_table(out)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 64)
    assert table.column("concept_id").to_pylist() == list(range(len(table)))
    meta = json.loads(table.schema.metadata[b"lvm_ray"])
    assert meta["encoder"] == "hashing-64" and meta["dim"] == 64
    assert meta["chunking"] == {"sentences_per_chunk": 1, "max_chunk_chars": 400}
    assert meta["corpus"]["source"] == "folder"

    # Rows: documents in corpus order, then position; vectors = the encoder's on those chunks.
    chunks = [(d, p, c) for d in sorted(TEXTS) for p, c in enumerate(chunk_document(TEXTS[d]))]
    assert len(table) == res.n_concepts == len(chunks)
    assert table.column("doc_id").to_pylist() == [d for d, _, _ in chunks]
    assert table.column("position").to_pylist() == [p for _, p, _ in chunks]
    assert table.column("text").to_pylist() == [c for _, _, c in chunks]
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(vectors, HashingEncoder(64).encode([c for *_, c in chunks]),
                               atol=1e-6)
    assert set(table.column("lane").to_pylist()) == {-1}


def test_every_document_in_exactly_one_split(corpus, tmp_path):
    bank = load_bank(run(corpus, tmp_path / "bank.parquet").bank_path)
    check_split_disjoint(bank)
    expected = assign_splits(sorted(TEXTS), SPLIT)
    got = {}
    for d, s in zip(bank.doc_ids, bank.splits):
        assert got.setdefault(d, s) == s
    assert got == expected
    assert set(got.values()) == {"train", "val", "test"}


def test_rerun_reuses_everything(corpus, tmp_path):
    out = tmp_path / "bank.parquet"
    first = CountingEncode()
    run(corpus, out, first)
    assert first.calls == 1 and len(first.texts) == run(corpus, out).n_concepts
    mtime = out.stat().st_mtime_ns

    again = CountingEncode()
    res = run(corpus, out, again)
    assert res.reused and res.reused_docs == 8 and again.calls == 0
    assert out.stat().st_mtime_ns == mtime  # not rewritten

    # Bank deleted, cache kept: rebuilt from the cache without encoding anything.
    before = load_bank(out)
    out.unlink()
    res = run(corpus, out, again)
    assert not res.reused and res.reused_docs == 8 and again.calls == 0
    np.testing.assert_array_equal(load_bank(out).vectors, before.vectors)


def test_a_bank_built_from_other_settings_is_never_replaced_silently(corpus, tmp_path):
    out = tmp_path / "bank.parquet"
    run(corpus, out, CountingEncode())
    before = out.read_bytes()
    enc = CountingEncode()
    other = CorpusConfig(source="folder", path=corpus.path, sentences_per_chunk=2)
    with pytest.raises(BankConflict) as e:
        ingest(other, ENC, SPLIT, out, encode_fn=enc, show_progress=False)
    msg = str(e.value)
    # Both sides are named, and the ways out.
    assert "'sentences_per_chunk': 1" in msg and "'sentences_per_chunk': 2" in msg
    assert "--bank" in msg and "--overwrite" in msg
    assert out.read_bytes() == before and enc.calls == 0  # nothing encoded, nothing written
    # Another encoder, another split, or a file that is no bank at all: refused the same way.
    with pytest.raises(BankConflict, match="hashing-32"):
        ingest(corpus, EncoderConfig(name="hashing-32"), SPLIT, out, show_progress=False)
    with pytest.raises(BankConflict, match="salt"):
        ingest(corpus, ENC, SplitConfig(salt="other"), out, encode_fn=enc, show_progress=False)
    junk = tmp_path / "notes.parquet"
    junk.write_text("my notes, not a bank")
    with pytest.raises(BankConflict, match="not a readable concept bank"):
        ingest(corpus, ENC, SPLIT, junk, encode_fn=enc, show_progress=False)
    assert junk.read_text() == "my notes, not a bank"


def test_changed_settings_rebuild_only_with_overwrite(corpus, tmp_path):
    out = tmp_path / "bank.parquet"
    run(corpus, out, CountingEncode())
    enc = CountingEncode()
    res = ingest(CorpusConfig(source="folder", path=corpus.path, sentences_per_chunk=2), ENC,
                 SPLIT, out, encode_fn=enc, show_progress=False, overwrite=True)
    assert not res.reused and enc.calls == 1
    assert load_bank(out).meta["chunking"]["sentences_per_chunk"] == 2
    # A different split salt re-splits but re-encodes nothing.
    enc = CountingEncode()
    res = ingest(CorpusConfig(source="folder", path=corpus.path, sentences_per_chunk=2), ENC,
                 SplitConfig(salt="other"), out, encode_fn=enc, show_progress=False,
                 overwrite=True)
    assert not res.reused and res.reused_docs == 8 and enc.calls == 0


def test_interrupted_run_resumes_with_only_the_remaining_docs(corpus, tmp_path):
    out = tmp_path / "bank.parquet"
    crashing = CountingEncode(fail_on_call=4)  # one document per call; dies on the 4th
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(corpus, out, crashing, chunks_per_call=1)
    assert not out.exists()
    assert len(list(cache_dir_for(out).glob("*.npy"))) == 3

    resumed = CountingEncode()
    res = run(corpus, out, resumed, chunks_per_call=1)
    remaining = [c for d in sorted(TEXTS)[3:] for c in chunk_document(TEXTS[d])]
    assert resumed.texts == remaining and resumed.calls == 5
    assert res.reused_docs == 3 and not res.reused

    fresh = run(corpus, tmp_path / "fresh.parquet")
    np.testing.assert_allclose(load_bank(out).vectors, load_bank(fresh.bank_path).vectors,
                               atol=1e-6)


def test_corrupt_cache_file_is_re_encoded(corpus, tmp_path):
    out = tmp_path / "bank.parquet"
    run(corpus, out)
    out.unlink()
    victim = sorted(cache_dir_for(out).glob("*.npy"))[0]
    victim.write_bytes(b"garbage")
    enc = CountingEncode()
    res = run(corpus, out, enc)
    assert enc.calls == 1 and res.reused_docs == 7


def test_plan_and_finish_with_external_encoding(corpus, tmp_path):
    """The path a distributed encoder takes: pending rows out, vectors back in any order."""
    plan = plan_ingest(corpus, ENC, SPLIT, tmp_path / "bank.parquet")
    cols = plan.pending_chunks()
    assert len(plan.todo) == 8 and len(cols["text"]) == sum(len(d.chunks) for d in plan.docs)
    order = list(range(len(cols["text"])))
    random.Random(0).shuffle(order)
    texts = [cols["text"][i] for i in order]
    vectors = HashingEncoder(64).encode(texts) * 3.0  # not unit: finish normalises
    by_doc = group_vectors([cols["doc_id"][i] for i in order],
                           [cols["position"][i] for i in order], vectors)
    res = finish_ingest(plan, by_doc)
    reference = run(corpus, tmp_path / "ref.parquet")
    assert res.n_concepts == reference.n_concepts
    np.testing.assert_allclose(load_bank(res.bank_path).vectors,
                               load_bank(reference.bank_path).vectors, atol=1e-6)


def test_finish_rejects_missing_or_misshapen_vectors(corpus, tmp_path):
    plan = plan_ingest(corpus, ENC, SPLIT, tmp_path / "bank.parquet")
    first = plan.todo[0]
    with pytest.raises(IngestError, match="no vectors yet"):
        finish_ingest(plan, {first.doc_id: np.ones((len(first.chunks), 4))})
    with pytest.raises(IngestError, match="n_chunks"):
        finish_ingest(plan, {first.doc_id: np.ones((len(first.chunks) + 1, 4))})
    with pytest.raises(IngestError, match="positions"):
        group_vectors(["a", "a"], [0, 2], np.ones((2, 4)))


def test_bank_source_validates_and_returns_existing(corpus, tmp_path):
    built = run(corpus, tmp_path / "bank.parquet")
    res = ingest(CorpusConfig(source="bank", path=str(built.bank_path)), ENC, SPLIT,
                 tmp_path / "unused.parquet", show_progress=False)
    assert res.reused and res.bank_path == built.bank_path and res.n_docs == 8
    assert res.n_concepts == built.n_concepts and not (tmp_path / "unused.parquet").exists()

    bank = load_bank(built.bank_path)
    bank.vectors = bank.vectors * 2
    save_bank(bank, tmp_path / "bad.parquet")
    with pytest.raises(BankError, match="unit norm"):
        ingest(CorpusConfig(source="bank", path=str(tmp_path / "bad.parquet")), ENC, SPLIT,
               tmp_path / "x.parquet", show_progress=False)
    with pytest.raises(BankError, match="not found"):
        ingest(CorpusConfig(source="bank", path=str(tmp_path / "none.parquet")), ENC, SPLIT,
               tmp_path / "x.parquet", show_progress=False)


def test_synthetic_source_writes_and_reuses(tmp_path):
    cfg = CorpusConfig(source="synthetic", max_docs=6)
    out = tmp_path / "syn.parquet"
    res = ingest(cfg, EncoderConfig(name="synthetic"), SPLIT, out, show_progress=False)
    bank = load_bank(out)
    assert res.n_docs == 6 and len(bank) == res.n_concepts and not res.reused
    assert bank.meta["encoder"] == "synthetic" and bank.dim == 32
    again = ingest(cfg, EncoderConfig(name="synthetic"), SPLIT, out, show_progress=False)
    assert again.reused
