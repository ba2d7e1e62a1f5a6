"""Corpus input at the edges (issue 17): Parquet corpora, the pluggable sentence splitter, and
`lvm ingest --dry-run`."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvm_ray.config import CorpusConfig, EncoderConfig, SplitConfig, load_config
from lvm_ray.data.bank import load_bank
from lvm_ray.data.chunking import chunk_document
from lvm_ray.data.corpus import CorpusError, load_documents
from lvm_ray.data.ingest import BankConflict, ingest
from lvm_ray.data.shards import ingest_sharded
from lvm_ray.workflows.prepare import ingest_dry_run

ENC = EncoderConfig(name="hashing-32")
SPLIT = SplitConfig()
TEXTS = [f"Row {i} opens here. It goes on about topic {i % 4}. Then it ends." for i in range(9)]


@pytest.fixture
def parquet_corpus(tmp_path):
    ids = [f"r{i}" for i in range(9)] + ["r2", "r9"]
    texts = TEXTS + ["A repeated id.", None]
    table = pa.table({"doc": ids, "body": texts, "other": list(range(11))})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=4)
    return CorpusConfig(source="parquet", path=str(tmp_path / "corpus.parquet"),
                        text_column="body", id_column="doc", docs_per_shard=3)


def test_parquet_corpus_reads_rows_in_order_and_skips_bad_ones(parquet_corpus, tmp_path):
    docs, skipped = load_documents(parquet_corpus)
    assert [d.doc_id for d in docs] == [f"r{i}" for i in range(9)]
    assert [d.text for d in docs] == TEXTS
    assert sorted(s.reason for s in skipped) == [
        "duplicate id 'r2' (first occurrence kept)", "id 'r9': empty or missing text"]
    single = ingest(parquet_corpus, ENC, SPLIT, tmp_path / "a.parquet", show_progress=False)
    sharded = ingest_sharded(parquet_corpus, ENC, SPLIT, tmp_path / "b", show_progress=False)
    a, b = load_bank(single.bank_path), load_bank(sharded.bank_path)
    assert a.doc_ids.tolist() == b.doc_ids.tolist() and a.texts.tolist() == b.texts.tolist()
    assert a.content_hash() == b.content_hash() and len(a) == 27
    # No id column: documents are numbered by row.
    no_ids = CorpusConfig(source="parquet", path=parquet_corpus.path, text_column="body",
                          id_column=None)
    assert [d.doc_id for d in load_documents(no_ids)[0]][:3] == ["0", "1", "2"]


def test_parquet_corpus_without_the_columns_is_a_clear_error(parquet_corpus):
    cfg = CorpusConfig(source="parquet", path=parquet_corpus.path)  # expects text / id
    with pytest.raises(CorpusError, match=r"no column\(s\) \['text', 'id'\].*doc.*body"):
        load_documents(cfg)


def test_sentence_splitter_is_pluggable_and_part_of_the_bank(tmp_path):
    pytest.importorskip("pysbd")
    text = "Call me at 5 a.m. Tomorrow is fine."
    assert chunk_document(text) == [text]  # the regex rules keep "a.m. Tomorrow" together
    assert chunk_document(text, splitter="pysbd") == ["Call me at 5 a.m.", "Tomorrow is fine."]
    with pytest.raises(ValueError, match="unknown sentence splitter"):
        chunk_document(text, splitter="nltk")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(text + " " + text)
    regex = CorpusConfig(source="folder", path=str(tmp_path / "c"))
    sbd = CorpusConfig(source="folder", path=str(tmp_path / "c"), splitter="pysbd")
    out = tmp_path / "bank.parquet"
    assert ingest(regex, ENC, SPLIT, out, show_progress=False).n_concepts == 2
    with pytest.raises(BankConflict, match="pysbd"):  # another splitter is another bank
        ingest(sbd, ENC, SPLIT, out, show_progress=False)
    res = ingest(sbd, ENC, SPLIT, tmp_path / "sbd.parquet", show_progress=False)
    assert res.n_concepts == 4
    assert load_bank(res.bank_path).meta["chunking"]["splitter"] == "pysbd"
    assert "splitter" not in load_bank(out).meta["chunking"]  # default: identity unchanged


@pytest.mark.parametrize("sharded", [False, True])
def test_dry_run_counts_what_ingest_encodes_and_writes_nothing(parquet_corpus, tmp_path,
                                                               sharded):
    bank = tmp_path / ("bank" if sharded else "bank.parquet")
    cfg = load_config(overrides={"corpus": json.loads(json.dumps(parquet_corpus.__dict__)),
                                 "encoder": {"name": "hashing-32"}, "bank_path": str(bank)})
    if sharded:
        bank.mkdir()
    plan = ingest_dry_run(cfg)
    assert not any(bank.iterdir()) if sharded else not bank.exists()
    assert plan["documents"] == 9 and plan["chunks"] == 27 and plan["chunks_to_encode"] == 27
    assert plan["estimated_encode_s"] >= 0 and plan["chunks_per_s_per_encoder"] > 0
    assert "9 documents, 27 chunks; 27 to encode" in plan["summary"]
    run = ingest_sharded if sharded else ingest
    res = run(cfg.corpus, cfg.encoder, cfg.split, bank, show_progress=False)
    assert (res.n_docs, res.n_concepts) == (plan["documents"], plan["chunks"])
    again = ingest_dry_run(cfg)
    assert again["chunks_to_encode"] == 0 and again["chunks_already_encoded"] == 27
