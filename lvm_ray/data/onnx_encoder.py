"""A sentence-transformers model run by ONNX Runtime (fp32 or dynamically quantized int8) or
OpenVINO, exported from the local weights at first use. Same embeddings as the torch encoder
(mean cosine >= 0.99; tests/test_onnx_encoder.py), several times the chunks/s on a CPU
(BENCHMARKS.md, section ingest).

    enc = OnnxEncoder(minilm_path(), backend="onnx-int8", cache_root=Path(".bank_cache/encoders"))

The export: the model's transformer with its mean pooling and L2 normalisation, traced by
torch.onnx from the shipped weights (nothing is downloaded), then ONNX Runtime's transformer
fusions (attention, LayerNorm, GELU) and, for onnx-int8, dynamic int8 quantization of the weights
(activations quantized per call, no calibration data). It is cached under
<cache_root>/<model>-<backend>-<hash of the weights and the exporter>/, so a later run, or another
process, loads it in well under a second. OpenVINO compiles the same fp32 ONNX file.

Only models made of Transformer -> mean Pooling (-> Normalize) are exported, which is what
all-MiniLM-L6-v2 and most sentence-transformers models are; others raise EncoderError.
Needs the `fast-encoder` extra: pip install 'lvm_ray[fast-encoder]'.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

BACKENDS = ("onnx", "onnx-int8", "openvino")
# Part of the cache key: a change to how the export is made must not reuse an old file.
EXPORT_VERSION = "2"
OPSET = 17


class MissingExtra(ImportError):
    """The optional packages a backend needs are not installed."""


def _need(module: str, backend: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise MissingExtra(f"encoder.backend={backend!r} needs {module}: pip install "
                           "'lvm_ray[fast-encoder]' (onnx, onnxruntime, openvino), or use "
                           "encoder.backend=torch") from e


def weights_hash(model_dir: Path) -> str:
    """SHA-256 of a model directory's weight and config files (what the export depends on)."""
    h = hashlib.sha256(EXPORT_VERSION.encode())
    for f in sorted(model_dir.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt"):
            h.update(f.relative_to(model_dir).as_posix().encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _check_pipeline(model) -> None:
    names = [type(m).__name__ for m in model]
    mode = getattr(model[1], "pooling_mode", None) if len(model) > 1 else None
    if names[:2] != ["Transformer", "Pooling"] or mode != "mean" or \
            names[2:] not in ([], ["Normalize"]):
        raise ValueError(f"only Transformer -> mean Pooling (-> Normalize) models are exported "
                         f"to ONNX; this one is {' -> '.join(names)}")


def export_onnx(model_dir: Path, out: Path, int8: bool) -> None:
    """Export model_dir (a sentence-transformers directory) to `out` (an .onnx file)."""
    import torch
    from sentence_transformers import SentenceTransformer

    onnx = _need("onnx", "onnx")
    _need("onnxruntime", "onnx")
    from onnxruntime.transformers.optimizer import optimize_model

    st = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True,
                             model_kwargs={"attn_implementation": "eager"})  # traceable
    _check_pipeline(st)
    bert = st[0].auto_model.eval()

    class Embed(torch.nn.Module):  # the transformer + mean pooling + L2 normalisation
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state  # (B, S, H)
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=-1)  # (B, H)

    ex = st.tokenizer(["an example sentence", "another"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    args = tuple(ex.get(n, torch.zeros_like(ex["input_ids"])) for n in names)
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"embedding": {0: "batch"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notices about Python control flow
            torch.onnx.export(Embed().eval(), args, str(raw), input_names=names,
                              output_names=["embedding"], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
        cfg = bert.config
        fused = Path(tmp) / "fused.onnx"
        # Fuses attention, LayerNorm and GELU into ONNX Runtime's own kernels (as Optimum's O2).
        optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                       hidden_size=cfg.hidden_size, opt_level=1).save_model_to_file(str(fused))
        onnx.checker.check_model(str(fused))
        final = Path(tmp) / "final.onnx"
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # Per-channel int8 weights of the MatMuls only: per-tensor scales, or quantizing the
            # fused attention too, left the embeddings at a mean cosine of 0.95 to torch's;
            # this keeps 0.99+. The fused kernels are in ONNX Runtime's own domain, where shape
            # inference cannot type every tensor: they are float32.
            quantize_dynamic(str(fused), str(final), weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        else:
            final = fused
        os.replace(final, out)  # atomic: a concurrent reader sees no half-written file


class OnnxEncoder:
    """Encoder protocol (lvm_ray.data.encoders) on ONNX Runtime or OpenVINO."""

    def __init__(self, model_dir: str | Path, backend: str, cache_root: Path, name: str,
                 threads: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        model_dir = Path(model_dir)
        from transformers import AutoTokenizer

        self.name, self.backend = name, backend
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        st_cfg = model_dir / "sentence_bert_config.json"
        self.max_len = (json.loads(st_cfg.read_text()).get("max_seq_length", 256)
                        if st_cfg.is_file() else 256)
        self.dim = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
        onnx_backend = "onnx-int8" if backend == "onnx-int8" else "onnx"
        self.path = (Path(cache_root) / f"{name}-{onnx_backend}-"
                     f"{weights_hash(model_dir)}" / "model.onnx")
        if not self.path.is_file():
            export_onnx(model_dir, self.path, int8=backend == "onnx-int8")
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
        if backend == "openvino":
            ov = _need("openvino", backend)
            compiled = ov.Core().compile_model(str(self.path), "CPU", {
                "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
            self._run = lambda feeds: compiled(feeds)[0]
        else:
            ort = _need("onnxruntime", backend)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            self._run = lambda feeds: sess.run(None, feeds)[0]
        self.inputs = ("input_ids", "attention_mask", "token_type_ids")

    def encode(self, texts: list[str], batch_size: int = 64,
               show_progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Longest first in batches of similar length, as sentence-transformers does: padding,
        # not texts, is what a batch of mixed lengths spends its time on.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                 max_length=self.max_len, return_tensors="np")
            feeds = {n: enc[n].astype(np.int64) if n in enc else
                     np.zeros_like(enc["input_ids"], dtype=np.int64) for n in self.inputs}
            out[idx] = self._run(feeds)
        assert out.shape == (len(texts), self.dim), f"expected (N, {self.dim}), got {out.shape}"
        return out
