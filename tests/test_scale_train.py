"""Training at scale: workers get the lean bank (numeric arrays, no texts) from one object-store
copy that the driver maps too; bank negatives are gathered, not copied per worker."""

import numpy as np
import pytest
import torch

from lvm_ray.config import TrainConfig
from lvm_ray.train.loop import RowPool, training_bank


def test_row_pool_draws_what_a_copied_pool_would(synthetic_bank):
    rows = synthetic_bank.split_rows("train")
    pool = RowPool(synthetic_bank.vectors, rows, "cpu")
    copied = torch.from_numpy(synthetic_bank.vectors[rows])
    torch.manual_seed(3)
    c = torch.randint(len(pool), (64,))
    assert len(pool) == len(copied)
    torch.testing.assert_close(pool[c], copied[c])


def test_float16_training_copy(synthetic_bank):
    half = training_bank(synthetic_bank, TrainConfig(vector_dtype="float16"))
    assert half.vectors.dtype == np.float16 and synthetic_bank.vectors.dtype == np.float32
    assert training_bank(half, TrainConfig(vector_dtype="float16")) is half
    assert half.identity() == synthetic_bank.identity()  # the recorded content, not fp16's
    np.testing.assert_allclose(half.vectors, synthetic_bank.vectors, atol=1e-3)


@pytest.mark.ray
def test_shared_bank_is_lean_and_the_driver_keeps_no_second_copy(ray_session, synthetic_bank):
    import ray

    from lvm_ray.distributed.trainer import share_bank

    bank = synthetic_bank.lean()  # what ensure_bank returns; share_bank leans it again
    full = type(bank)(**{**bank.__dict__, "vectors": bank.vectors.copy()})
    ref, driver = share_bank(full)
    stored = ray.get(ref)
    assert stored.texts is None and stored.doc_ids.dtype == np.int32
    assert stored.splits.dtype.kind == "U" and stored.vectors.dtype == np.float32
    # Only the per-document names are Python objects: n_docs of them, not N.
    assert len(stored.doc_names) == len(np.unique(bank.doc_ids)) < len(bank) // 10
    assert stored.identity() == synthetic_bank.identity()
    # The driver's vectors are the object store's (read-only, same memory), not its own copy.
    assert not driver.vectors.flags.writeable
    assert np.shares_memory(driver.vectors, ray.get(ref).vectors)
    np.testing.assert_array_equal(driver.vectors, synthetic_bank.vectors)
    ref16, driver16 = share_bank(full, "float16")
    assert ray.get(ref16).vectors.dtype == np.float16 and driver16.vectors.dtype == np.float32


def test_training_on_float16_vectors_runs_and_records_the_banks_identity(tmp_path,
                                                                         synthetic_bank):
    from lvm_ray.config import load_config
    from lvm_ray.train.checkpoint import load_checkpoint
    from lvm_ray.train.loop import fit_local, with_bank_width
    from lvm_ray.workflows.prepare import prepare_windows

    cfg = with_bank_width(load_config(presets=["smoke"], overrides={
        "train": {"vector_dtype": "float16", "max_epochs": 1},
        "loss": {"negatives": "bank", "bank_negatives": 64}}), synthetic_bank)
    ws = prepare_windows(cfg, synthetic_bank)
    res = fit_local(cfg, synthetic_bank, ws.train, ws.val, tmp_path)
    assert np.isfinite(res["history"][0]["train_loss"]) and res["history"][0]["step_seconds"] > 0
    assert 0 < res["history"][0]["step_seconds_median"] < 60
    ck = load_checkpoint(res["best_checkpoint"])
    assert ck.meta["data"] == synthetic_bank.identity()  # not the float16 copy's fingerprint


def test_lazy_texts_of_a_relative_bank_path_read_from_another_directory(tmp_path, monkeypatch,
                                                                        synthetic_bank):
    """A lean bank loaded by a relative path pickles its lazy texts as an absolute path, so a copy
    unpickled elsewhere (a Ray worker's working directory) reads the same file (`make demo`
    failed on this)."""
    import pickle

    from lvm_ray.data.bank import load_bank, save_bank

    monkeypatch.chdir(tmp_path)
    save_bank(synthetic_bank, "data_bank.parquet")
    lean = load_bank("data_bank.parquet", lean=True)
    blob = pickle.dumps(lean.texts)
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    texts = pickle.loads(blob)
    assert [texts[i] for i in (0, 5)] == [str(synthetic_bank.texts[i]) for i in (0, 5)]


@pytest.mark.ray
def test_shared_file_bank_carries_no_texts(ray_session, tmp_path, synthetic_bank):
    import ray

    from lvm_ray.data.bank import load_bank, save_bank
    from lvm_ray.distributed.trainer import share_bank

    save_bank(synthetic_bank, tmp_path / "bank.parquet")
    bank = load_bank(tmp_path / "bank.parquet", lean=True)  # lazy texts, as ensure_bank gives
    assert bank.texts is not None
    ref, driver = share_bank(bank)
    assert ray.get(ref).texts is None and driver.texts is not None
