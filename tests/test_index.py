"""Serving retrieval: ANN indexes find the exact top-1, index files are memory-mapped and shared,
and files built for another bank are refused or rebuilt, never used."""

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from lvm_ray.config import IndexConfig, ModelConfig
from lvm_ray.data.bank import save_bank
from lvm_ray.data.index import (IndexFileError, Retrieval, build_index, build_index_files,
                                index_dir, recall_at_k)
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.model import build_model
from lvm_ray.predictor import Predictor
from lvm_ray.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def bank():
    return make_synthetic_bank(n_docs=60, doc_len=(60, 100), dim=32, seed=1)  # ~4.7k vectors


def _queries(bank, n=300, seed=0):
    rng = np.random.default_rng(seed)
    q = bank.vectors[rng.choice(len(bank), n, replace=False)]
    q = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(bank.dim)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.mark.parametrize("factory,params", [("HNSW32", {"ef_search": 64}),
                                            ("IVF32,Flat", {"nprobe": 4})])
def test_ann_index_returns_the_exact_top1(tmp_path, bank, factory, params):
    save_bank(bank, tmp_path / "bank.parquet")
    build_index_files(tmp_path / "bank.parquet", IndexConfig(factory=factory, train_size=4000))
    r = Retrieval.open(tmp_path / "bank.parquet", factory)
    r.set_search_params(**params)  # what a model deployment's reconfigure does, live
    live = faiss.downcast_index(r.index)
    assert (live.hnsw.efSearch if "ef_search" in params else live.nprobe) == \
        next(iter(params.values()))
    q = _queries(bank)
    _, approx = r.search(q, 10)
    exact = np.argsort(-(q @ bank.vectors.T), axis=1)[:, :10]
    assert np.mean(approx[:, 0] == exact[:, 0]) >= 0.95
    assert recall_at_k(approx, exact, 10) >= 0.9
    with pytest.raises(ValueError, match="no search parameter"):
        r.set_search_params(**({"nprobe": 4} if "ef_search" in params else {"ef_search": 8}))


def _mappings(path: Path) -> int:
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_two_predictors_share_one_mapped_index(tmp_path, bank):
    cfg = ModelConfig(d_in=32, hidden=16, layers=1, slots=4)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", build_model(cfg), cfg, epoch=0, metrics={},
                    config={"window": {"context": 20}}, data=bank.identity())
    save_bank(bank, tmp_path / "bank.parquet")
    a = Predictor.from_paths(tmp_path / "ck", tmp_path / "bank.parquet", device="cpu")
    b = Predictor.from_paths(tmp_path / "ck", tmp_path / "bank.parquet", device="cpu")
    index_file = index_dir(tmp_path / "bank.parquet") / "Flat.faiss"
    lookup = index_dir(tmp_path / "bank.parquet") / "lookup.arrow"
    # Both read the same file-backed pages (the page cache's one copy), not a private read.
    assert a.retrieval.mapped and b.retrieval.mapped
    assert _mappings(index_file) >= 2 and _mappings(lookup) >= 2
    # And answer exactly like the in-memory exact index.
    ref = Predictor(load_checkpoint(tmp_path / "ck"), bank, device="cpu")
    ctx = bank.vectors[100:130]
    got, want = a.predict(ctx, k=5), ref.predict(ctx, k=5)
    assert [(n.concept_id, n.text, n.doc_id, n.position) for n in got.neighbors] == \
        [(n.concept_id, n.text, n.doc_id, n.position) for n in want.neighbors]
    np.testing.assert_allclose([n.score for n in got.neighbors],
                               [n.score for n in want.neighbors], rtol=1e-5)
    np.testing.assert_array_equal(b.vectors_for_ids([0, 7]), bank.vectors[[0, 7]])


def test_missing_or_stale_index_is_refused_or_rebuilt_never_used(tmp_path, bank):
    path = tmp_path / "bank.parquet"
    save_bank(bank, path)
    with pytest.raises(IndexFileError, match="missing.*lvm index"):
        Retrieval.open(path, "Flat")
    build_index_files(path, IndexConfig(factory="Flat"))
    assert len(Retrieval.open(path, "Flat")) == len(bank)
    # The bank at the same path is replaced by another one: its old index files are stale.
    other = make_synthetic_bank(n_docs=60, doc_len=(60, 100), dim=32, seed=2)
    save_bank(other, path)
    with pytest.raises(IndexFileError, match="for another bank"):
        Retrieval.open(path, "Flat")
    cfg = ModelConfig(d_in=32, hidden=16, layers=1, slots=4)
    save_checkpoint(tmp_path / "ck", build_model(cfg), cfg, epoch=0, metrics={},
                    config={"window": {"context": 20}}, data=other.identity())
    with pytest.raises(IndexFileError, match="for another bank"):
        Predictor.from_paths(tmp_path / "ck", path, device="cpu", build_index=False)
    rebuilt = Retrieval.open(path, "Flat", build=True)
    assert rebuilt.identity() == other.identity()
    _, ids = rebuilt.search(other.vectors[:50], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(50))


def test_in_memory_index_matches_brute_force(bank):
    index = build_index(bank.vectors, "Flat")
    q = _queries(bank, 50)
    _, ids = index.search(q, 5)
    np.testing.assert_array_equal(ids, np.argsort(-(q @ bank.vectors.T), axis=1)[:, :5])


def _resident(path: Path) -> int:
    """Bytes of this process's mappings of `path` that are in its page tables (smaps Rss)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            current = len(parts) == 6 and parts[5] == str(path.resolve())
        elif current and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_populate_fills_the_page_tables_of_the_mapped_files(tmp_path, factory):
    # 256-d: the lookup file's vectors (4.7 MB) dwarf the pages the kernel maps around each
    # populated range (fault-around, up to 64 kB each side), so "not the vectors" is testable.
    bank = make_synthetic_bank(n_docs=60, doc_len=(60, 100), dim=256, seed=1)
    save_bank(bank, tmp_path / "bank.parquet")
    r = Retrieval.open(tmp_path / "bank.parquet", factory, build=True)
    assert r.mapped and len(r.files) == 2
    index_file = r.files[0]
    before = _resident(index_file)
    if factory == "Flat":  # nothing read yet: a fresh mapping is absent from the page tables
        assert before < index_file.stat().st_size / 2  # (HNSW's reader walks its graph)
    assert r.populate(max_fraction=0.0) == 0  # larger than the allowed memory: skipped
    assert _resident(index_file) == before
    lookup_before = _resident(r.files[1])
    small = sum(n for _, n in r.columns.small_ranges())  # text, doc id, position buffers
    assert 0 < small < r.files[1].stat().st_size / 4
    assert r.populate() >= index_file.stat().st_size + small
    assert _resident(index_file) >= index_file.stat().st_size - 4096
    # The lookup file: its small columns are resident now (some of their pages may have been
    # already: opening reads the file's metadata), not its vectors (one copy: the index's,
    # which is where `vectors` reads them from).
    after = _resident(r.files[1])
    around = 2 * 65536 * len(r.columns.small_ranges())  # fault-around at both ends of a range
    assert small - 4096 <= after <= lookup_before + small + around
    assert after < r.files[1].stat().st_size / 2
    np.testing.assert_array_equal(r.search(bank.vectors[:3], 1)[1][:, 0], [0, 1, 2])


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,PQ8np"])
def test_vectors_by_id_are_the_banks_whatever_the_index(tmp_path, bank, factory):
    """Read from the index where it stores them exactly (Flat, HNSW over Flat), from the lookup
    file where its codes are lossy (PQ): the bank's vectors either way."""
    save_bank(bank, tmp_path / "bank.parquet")
    r = Retrieval.open(tmp_path / "bank.parquet", factory, build=True,
                       cfg=IndexConfig(factory=factory, train_size=len(bank.vectors)))
    assert r._exact_storage == ("PQ" not in factory)
    ids = np.array([5, 0, len(bank.vectors) - 1, 5])
    np.testing.assert_array_equal(r.vectors(ids), bank.vectors[ids].astype(np.float32))
