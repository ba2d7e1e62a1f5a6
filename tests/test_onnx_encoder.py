"""The exported encoder backends (lvm_ray.data.onnx_encoder): the same embeddings as torch on a
fixed set of sentences (mean cosine >= 0.99), exported once from the shipped weights and then
loaded from the cache, a cache key per backend, and a clear error without the extra."""

import builtins
import os

import numpy as np
import pytest

from lvm_ray.config import EncoderConfig
from lvm_ray.data.encoders import EncoderError, encoder_key, get_encoder

SENTENCES = [
    "We must rebuild our economy.",
    "Our workers deserve better wages and safer jobs.",
    "The state of the union is strong.",
    "Tonight I ask the Congress to pass a balanced budget.",
    "Education is the key to opportunity for every child in this country.",
    "Our troops have served with honour and we owe them our gratitude.",
    "Health care costs are rising faster than wages.",
    "We will secure our borders and reform our immigration system.",
    "A short one.",
    "Energy independence means jobs at home and security abroad, and it starts with innovation "
    "in wind, solar, nuclear power and the fuels of the future.",
] * 3


def have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def torch_vectors():
    return get_encoder(EncoderConfig(name="minilm", device="cpu")).encode(SENTENCES)


@pytest.mark.slow
@pytest.mark.parametrize("backend,module", [("onnx", "onnxruntime"), ("onnx-int8", "onnxruntime"),
                                            ("openvino", "openvino")])
def test_backend_agrees_with_torch(backend, module, torch_vectors, tmp_path_factory):
    if not have(module):
        pytest.skip(f"{module} not installed (the fast-encoder extra)")
    root = tmp_path_factory.mktemp(f"enc-{backend}")
    enc = get_encoder(EncoderConfig(name="minilm", device="cpu", backend=backend),
                      export_root=root)
    assert enc.name == "all-MiniLM-L6-v2" and enc.dim == 384
    vecs = enc.encode(SENTENCES, batch_size=8)
    assert vecs.shape == (len(SENTENCES), 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    cos = np.sum(vecs * torch_vectors, axis=1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.98, (cos.mean(), cos.min())
    if backend != "onnx-int8":
        assert cos.min() >= 0.9999, cos.min()  # fp32: the same function
    # Order and batching barely change a text's vector. int8 quantizes activations with one scale
    # per call, so a text's vector depends a little on the batch it is in.
    other = enc.encode(SENTENCES[::-1], batch_size=3)[::-1]
    if backend == "onnx-int8":
        agree = np.sum(other * vecs, axis=1)
        assert agree.mean() >= 0.99 and agree.min() >= 0.98, (agree.mean(), agree.min())
    else:
        np.testing.assert_allclose(other, vecs, atol=1e-3)
    # Exported once, into <root>/<model>-<backend>-<hash>/; a second load reuses the file.
    (export,) = root.glob("all-MiniLM-L6-v2-onnx*/model.onnx")
    mtime = os.stat(export).st_mtime_ns
    from lvm_ray.data.onnx_encoder import OnnxEncoder
    from lvm_ray.data.encoders import minilm_path

    again = OnnxEncoder(minilm_path(), backend, root, "all-MiniLM-L6-v2", threads=1)
    assert os.stat(again.path).st_mtime_ns == mtime and again.path == export


def test_each_backend_has_its_own_cache_key():
    keys = {b: encoder_key(EncoderConfig(name="minilm", backend=b))
            for b in ("torch", "onnx", "onnx-int8", "openvino")}
    assert keys["torch"] == "all-MiniLM-L6-v2"  # banks cached before backends existed still match
    assert len(set(keys.values())) == 4


def test_a_missing_extra_is_a_clear_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name in ("onnxruntime", "onnx") or name.startswith("onnxruntime."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(EncoderError, match=r"fast-encoder.*backend=torch"):
        get_encoder(EncoderConfig(name="minilm", device="cpu", backend="onnx",
                                  batch_size=7),  # a fresh cache entry of get_encoder
                    export_root=tmp_path)


def test_an_unknown_backend_is_a_config_error():
    from lvm_ray.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="backend"):
        from_dict(EncoderConfig, {"backend": "tensorrt"}, "encoder")
