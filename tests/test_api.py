"""The Python API: lvm_ray.load(checkpoint, bank) -> predict, predict_texts, append; __version__."""

import tomllib
from pathlib import Path

import numpy as np
import pytest

import lvm_ray
from lvm_ray.predictor import PredictorInputError

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_package_version():
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert lvm_ray.__version__ == want


def test_load_predicts_from_vectors_texts_and_sessions(assets):
    p = lvm_ray.load(assets["paths"]["phase2"], assets["bank"], device="cpu")
    texts = ["speech a part 1 about topic 3", "speech b part 2 about topic 4"]
    vectors = assets["encoder"].encode(texts)  # hashing-32, the bank's encoder
    np.testing.assert_allclose(p.encode(texts), vectors, atol=1e-6)
    by_text, by_vec = p.predict_texts(texts, k=3), p.predict(vectors, k=3)
    np.testing.assert_allclose(by_text.vector, by_vec.vector, atol=1e-6)
    assert [n.concept_id for n in by_text.neighbors] == [n.concept_id for n in by_vec.neighbors]
    pred, state = p.append(vectors[:1])
    pred, state = p.append(vectors[1:], state)  # one vector at a time == the whole context
    np.testing.assert_allclose(pred.vector, by_vec.vector, atol=1e-5)
    with pytest.raises(PredictorInputError, match="non-empty list"):
        p.predict_texts("one string, not a list")


def test_load_refuses_a_bank_the_checkpoint_was_not_trained_on(tmp_path):
    from lvm_ray.config import ModelConfig
    from lvm_ray.data.bank import BankMismatch, save_bank
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.model import build_model
    from lvm_ray.train.checkpoint import save_checkpoint

    a, b = make_synthetic_bank(n_docs=4, seed=0), make_synthetic_bank(n_docs=4, seed=1)
    save_bank(a, tmp_path / "a.parquet")
    save_bank(b, tmp_path / "b.parquet")
    cfg = ModelConfig(d_in=a.dim, hidden=8, layers=1, slots=2)
    ck = save_checkpoint(tmp_path / "ck", build_model(cfg), cfg, epoch=0, metrics={},
                         data=a.identity())
    assert lvm_ray.load(ck, tmp_path / "a.parquet", device="cpu").dim == a.dim
    with pytest.raises(BankMismatch, match="b.parquet"):
        lvm_ray.load(ck, tmp_path / "b.parquet", device="cpu")
