"""Ray Data ingest: same bank as the plain loop, and a re-run encodes nothing."""

import json

import numpy as np
import pytest

from lvm_ray.config import load_config
from lvm_ray.data.bank import load_bank
from lvm_ray.data.ingest import ingest

pytestmark = pytest.mark.ray


def _corpus(tmp_path, n_docs=12):
    lines = []
    for d in range(n_docs):
        sents = [f"Document {d} talks about topic {d % 3} in sentence {i}." for i in range(5 + d)]
        lines.append(json.dumps({"id": f"doc{d}", "text": " ".join(sents)}))
    p = tmp_path / "corpus.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_ray_data_ingest_matches_plain_ingest(ray_session, tmp_path):
    from lvm_ray.distributed.data import ingest_with_ray

    cfg = load_config(overrides={"corpus": {"source": "jsonl", "path": str(_corpus(tmp_path))},
                                 "encoder": {"name": "hashing-64", "batch_size": 8}})
    plain = ingest(cfg.corpus, cfg.encoder, cfg.split, tmp_path / "plain" / "bank.parquet",
                   show_progress=False)
    res = ingest_with_ray(cfg, tmp_path / "ray" / "bank.parquet", num_encoders=2)
    assert not res.reused and res.n_concepts == plain.n_concepts
    a, b = load_bank(plain.bank_path), load_bank(res.bank_path)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    assert a.doc_ids.tolist() == b.doc_ids.tolist()
    assert a.splits.tolist() == b.splits.tolist()
    assert b.meta["encoder"] == "hashing-64"
    again = ingest_with_ray(cfg, tmp_path / "ray" / "bank.parquet")
    assert again.reused


def test_read_bank_with_ray_equals_pyarrow_read(ray_session, tmp_path, synthetic_bank):
    """Training's Ray Data read gives the same bank as the plain read, rows in concept_id order
    and metadata kept, even when the file has many row groups (many read tasks)."""
    import pyarrow.parquet as pq

    from lvm_ray.data.bank import to_table
    from lvm_ray.distributed.data import read_bank_with_ray

    path = tmp_path / "bank.parquet"
    pq.write_table(to_table(synthetic_bank), path, row_group_size=257)
    assert pq.ParquetFile(path).num_row_groups > 4
    a, b = load_bank(path), read_bank_with_ray(path)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.doc_ids.tolist() == b.doc_ids.tolist()
    assert a.positions.tolist() == b.positions.tolist()
    assert a.splits.tolist() == b.splits.tolist()
    assert a.meta == b.meta and b.meta


def test_read_bank_with_ray_refuses_bad_files(ray_session, tmp_path):
    from lvm_ray.data.bank import BankError
    from lvm_ray.distributed.data import read_bank_with_ray

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(BankError, match="not a readable Parquet"):
        read_bank_with_ray(bad)
    with pytest.raises(BankError, match="not a readable Parquet"):
        read_bank_with_ray(tmp_path / "missing.parquet")
