"""Ray Data ingest: the same sharded bank as the local loop and the single-file ingest; a re-run
encodes nothing; an interrupted run resumes."""

import json

import numpy as np
import pytest

from lvm_ray.config import load_config
from lvm_ray.data import bankdir
from lvm_ray.data.bank import load_bank
from lvm_ray.data.ingest import ingest
from lvm_ray.data.shards import ingest_sharded

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

    cfg = load_config(overrides={"corpus": {"source": "jsonl", "path": str(_corpus(tmp_path)),
                                            "docs_per_shard": 5},
                                 "encoder": {"name": "hashing-64", "batch_size": 8}})
    plain = ingest(cfg.corpus, cfg.encoder, cfg.split, tmp_path / "plain" / "bank.parquet",
                   show_progress=False)
    local = ingest_sharded(cfg.corpus, cfg.encoder, cfg.split, tmp_path / "local",
                           show_progress=False)
    res = ingest_with_ray(cfg, tmp_path / "ray" / "bank", num_encoders=2)
    assert not res.reused and res.n_concepts == plain.n_concepts == local.n_concepts
    assert len(list((tmp_path / "ray" / "bank").glob("part-*.parquet"))) == 3
    a, b = load_bank(plain.bank_path), load_bank(res.bank_path)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    assert a.doc_ids.tolist() == b.doc_ids.tolist()
    assert a.texts.tolist() == b.texts.tolist()
    assert a.splits.tolist() == b.splits.tolist()
    assert b.meta["encoder"] == "hashing-64"
    assert b.content_hash() == load_bank(local.bank_path).content_hash()
    again = ingest_with_ray(cfg, tmp_path / "ray" / "bank")
    assert again.reused
    # Interrupted after its shards were written but before the manifest: resumed, not redone.
    (tmp_path / "ray" / "bank" / bankdir.MANIFEST).unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "bank").glob("part-*")}
    resumed = ingest_with_ray(cfg, tmp_path / "ray" / "bank")
    assert not resumed.reused and resumed.reused_docs == 12
    assert {p.name: p.stat().st_mtime_ns
            for p in (tmp_path / "ray" / "bank").glob("part-*")} == mtimes
    assert load_bank(resumed.bank_path).content_hash() == b.content_hash()


def test_encoder_actor_prints_progress_inside_a_shard_and_encodes_the_same(tmp_path, capsys,
                                                                           monkeypatch):
    # A shard can take minutes on a CPU; the actor prints progress lines (Ray forwards them to
    # the driver) and slicing must not change a single vector.
    from lvm_ray.data.encoders import get_encoder
    from lvm_ray.distributed import data as dd

    cfg = load_config(overrides={"encoder": {"name": "hashing-64", "batch_size": 4}})
    monkeypatch.setattr(dd, "PROGRESS_SLICE", 8)
    monkeypatch.setattr(dd, "PROGRESS_SECONDS", 0.0)
    w = dd.ShardWriter(cfg.corpus, cfg.encoder, {}, str(tmp_path / "bank"))
    texts = [f"sentence number {i} of the shard" for i in range(30)]
    got = w.encode(texts)
    want = get_encoder(cfg.encoder).encode(texts, batch_size=4)
    np.testing.assert_allclose(got, want, atol=1e-7)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"shard -1: encoded {n} / 30 chunks" for n in (8, 16, 24)]
    assert w.encode([]).shape[0] == 0
