"""Corpus -> chunks -> embeddings -> Parquet concept bank, resumable and idempotent.

Embeddings are cached per document under `<out dir>/.<bank stem>_cache/<key>.npy`, where the key
hashes the encoder, the chunking settings and the document's chunks. A cache file is written
atomically (tmp + os.replace), so an interrupted run loses at most the documents in flight and
the next run encodes only what is missing. If the bank already holds exactly this corpus, encoder,
chunking and split, nothing is encoded or written (`reused=True`).

Two ways in:
    ingest(corpus_cfg, encoder_cfg, split_cfg, out_path)      # local encoding, or encode_fn
    plan = plan_ingest(corpus_cfg, encoder_cfg, split_cfg, out_path)   # distributed encoding:
    cols = plan.pending_chunks()         # {"doc_id", "position", "text"} of uncached docs
    vecs = ...encode cols["text"] anywhere...                          # (N, D) rows in any order
    finish_ingest(plan, group_vectors(cols["doc_id"], cols["position"], vecs))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lvm_ray.config import CorpusConfig, EncoderConfig, SplitConfig
from lvm_ray.data.bank import SPLITS, BankError, ConceptBank, load_bank, read_bank_meta, save_bank
from lvm_ray.data.chunking import chunk_document
from lvm_ray.data.corpus import CorpusError, Skipped, load_documents
from lvm_ray.data.encoders import encoder_key, encoder_name, get_encoder
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.data.windows import assign_splits, check_split_disjoint

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]  # texts -> (N, D)


class IngestError(RuntimeError):
    """Vectors handed to finish_ingest do not match the plan."""


@dataclass(frozen=True)
class IngestResult:
    bank_path: Path
    n_docs: int
    n_concepts: int
    skipped: list[Skipped]
    reused: bool  # the bank already held exactly this data; nothing was encoded or written
    reused_docs: int  # documents whose vectors came from the cache (all of them when reused)


@dataclass
class DocPlan:
    doc_id: str
    chunks: list[str]
    key: str  # cache key: encoder + chunking settings + chunks
    cached: bool  # vectors are in the cache dir


@dataclass
class IngestPlan:
    """Everything finish_ingest needs; `todo` lists the documents still to encode."""

    out_path: Path
    cache_dir: Path
    docs: list[DocPlan]  # corpus order
    skipped: list[Skipped]
    split_cfg: SplitConfig
    meta: dict[str, Any]  # the bank's metadata (dim is added on save)
    reuse_bank: bool  # out_path already holds exactly this bank
    cache_hits: int
    _by_id: dict[str, DocPlan] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {d.doc_id: d for d in self.docs}

    @property
    def todo(self) -> list[DocPlan]:
        return [] if self.reuse_bank else [d for d in self.docs if not d.cached]

    def pending_chunks(self) -> dict[str, list]:
        """Columns {"doc_id", "position", "text"} of every chunk still to encode, in order."""
        cols: dict[str, list] = {"doc_id": [], "position": [], "text": []}
        for d in self.todo:
            cols["doc_id"] += [d.doc_id] * len(d.chunks)
            cols["position"] += list(range(len(d.chunks)))
            cols["text"] += d.chunks
        return cols

    def store(self, doc_id: str, vectors: np.ndarray) -> None:
        """Cache one document's (n_chunks, D) vectors atomically (L2-normalised here)."""
        d = self._by_id[doc_id]
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[0] != len(d.chunks):
            raise IngestError(
                f"{doc_id}: expected vectors (n_chunks={len(d.chunks)}, D), got {v.shape}"
            )
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        if not np.all(np.isfinite(v)) or np.any(norms == 0):
            raise IngestError(f"{doc_id}: vectors must be finite, without zero rows")
        v = v / norms  # the bank holds unit vectors whatever encode_fn returned
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{d.key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, v)
            os.replace(tmp, self.cache_dir / f"{d.key}.npy")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        d.cached = True


def _cache_valid(path: Path, n_rows: int) -> bool:
    """A cheap header check (mmap), so a truncated or foreign file counts as a miss."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.dtype == np.float32 and arr.ndim == 2 and arr.shape[0] == n_rows


def doc_key(enc_key: str, corpus_cfg: CorpusConfig, chunks: list[str]) -> str:
    """A document's cache key: encoder, chunking settings and its chunks (the splitter only
    when it is not the default, so existing caches stay valid)."""
    settings = [enc_key, corpus_cfg.sentences_per_chunk, corpus_cfg.max_chunk_chars]
    if corpus_cfg.splitter != "regex":
        settings.append(corpus_cfg.splitter)
    blob = json.dumps(settings + [chunks], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def chunking_meta(cfg: CorpusConfig) -> dict[str, Any]:
    """The chunking settings a bank records. The splitter is named only when it is not the
    default, so banks built before it was configurable keep their identity."""
    meta: dict[str, Any] = {"sentences_per_chunk": cfg.sentences_per_chunk,
                            "max_chunk_chars": cfg.max_chunk_chars}
    if cfg.splitter != "regex":
        meta["splitter"] = cfg.splitter
    return meta


def chunks_of(text: str, cfg: CorpusConfig) -> list[str]:
    return chunk_document(text, cfg.sentences_per_chunk, cfg.max_chunk_chars, cfg.splitter)


def split_meta(split_cfg: SplitConfig) -> dict[str, Any]:
    return {"fractions": [split_cfg.train, split_cfg.val, split_cfg.test], "salt": split_cfg.salt}


def corpus_meta(cfg: CorpusConfig) -> dict[str, Any]:
    meta = {"source": cfg.source, "path": cfg.path, "max_docs": cfg.max_docs}
    if cfg.pick != "first":  # only when set: banks written before `pick` existed still match
        meta["pick"] = cfg.pick
    return meta


def settings_meta(corpus_cfg: CorpusConfig, encoder_cfg: EncoderConfig,
                  split_cfg: SplitConfig) -> dict[str, Any]:
    """The settings a bank records (and is reused for): encoder, corpus, chunking, split."""
    meta = {"encoder": encoder_name(encoder_cfg), "corpus": corpus_meta(corpus_cfg),
            "chunking": chunking_meta(corpus_cfg), "split": split_meta(split_cfg)}
    if encoder_cfg.backend != "torch":  # torch banks keep the metadata they always had
        meta["encoder_backend"] = encoder_cfg.backend
    return meta


class BankConflict(BankError):
    """bank_path holds a bank built from other settings or data; ingest never replaces it
    unless told to (overwrite)."""


def describe(meta: dict[str, Any]) -> str:
    """A bank's settings in one line, for messages that compare two banks."""
    corpus = meta.get("corpus") or {}
    parts = [f"encoder {meta.get('encoder')}",
             f"corpus {corpus.get('source')}"
             + (f" {corpus['path']}" if corpus.get("path") else "")
             + (f" (first {corpus['max_docs']} documents)" if corpus.get("max_docs") else ""),
             f"chunking {meta.get('chunking')}", f"split {meta.get('split')}"]
    return ", ".join(parts)


def reuse_existing(path: Path, meta: dict[str, Any], overwrite: bool = False) -> bool:
    """True when `path` already holds exactly the bank `meta` describes (nothing to do); False
    when there is none, or overwrite allows replacing it. Raises BankConflict otherwise, naming
    both, so a user's bank is never replaced by accident."""
    if not path.exists():
        return False
    try:
        existing = read_bank_meta(path)
    except Exception as e:  # noqa: BLE001  any unreadable footer: refuse below, never guess
        existing, unreadable = None, f"{type(e).__name__}: {e}"
    else:
        unreadable = None
    if existing is not None and all(existing.get(k) == v for k, v in meta.items()):
        return True
    if overwrite:
        log.warning("replacing %s (--overwrite)", path)
        return False
    what = (f"is not a readable concept bank ({unreadable})" if existing is None else
            f"holds a bank built from {describe(existing)}")
    if existing is not None and all(existing.get(k) == meta.get(k) for k in meta
                                    if k != "fingerprint"):
        what += " (the same settings, but the documents have changed since)"
    raise BankConflict(
        f"{path} {what}; this run asks for {describe(meta)}. Nothing was written. Use the "
        f"existing bank as it is with `--bank {path}` (corpus.source=bank), choose another "
        "bank_path, or rebuild it with `lvm ingest ... --overwrite`")


def cache_dir_for(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.parent / f".{out_path.stem}_cache"


def plan_ingest(corpus_cfg: CorpusConfig, encoder_cfg: EncoderConfig, split_cfg: SplitConfig,
                out_path: str | Path, show_progress: bool = False,
                overwrite: bool = False) -> IngestPlan:
    """Load and chunk the corpus, and find which documents are already cached. Loads no model.
    Raises BankConflict when out_path holds another bank (unless overwrite)."""
    out_path = Path(out_path)
    docs, skipped = load_documents(corpus_cfg)
    enc_key = encoder_key(encoder_cfg)
    cache_dir = cache_dir_for(out_path)
    plans: list[DocPlan] = []
    for doc in tqdm(docs, desc="chunk", unit="doc", disable=not show_progress):
        chunks = chunks_of(doc.text, corpus_cfg)
        if not chunks:
            skipped.append(Skipped(doc.doc_id, "no chunks after chunking"))
            log.warning("skipped %s: no chunks after chunking", doc.doc_id)
            continue
        key = doc_key(enc_key, corpus_cfg, chunks)
        plans.append(DocPlan(doc.doc_id, chunks, key,
                             _cache_valid(cache_dir / f"{key}.npy", len(chunks))))
    if not plans:
        raise CorpusError("no document produced any chunk")
    fingerprint = hashlib.sha256(
        json.dumps([[d.doc_id, d.key] for d in plans]).encode()
    ).hexdigest()
    meta = {**settings_meta(corpus_cfg, encoder_cfg, split_cfg), "fingerprint": fingerprint}
    return IngestPlan(out_path=out_path, cache_dir=cache_dir, docs=plans, skipped=skipped,
                      split_cfg=split_cfg, meta=meta, reuse_bank=reuse_existing(out_path, meta, overwrite),
                      cache_hits=sum(d.cached for d in plans))


def group_vectors(doc_ids: list[str], positions: list[int],
                  vectors: np.ndarray) -> dict[str, np.ndarray]:
    """Rows (doc_id, position, vector) in any order -> doc_id -> (n_chunks, D) by position."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) != len(doc_ids) or len(positions) != len(doc_ids):
        raise IngestError(f"expected vectors (N={len(doc_ids)}, D), got {vectors.shape}")
    rows: dict[str, list[tuple[int, int]]] = {}
    for i, (d, p) in enumerate(zip(doc_ids, positions)):
        rows.setdefault(str(d), []).append((int(p), i))
    out = {}
    for d, pairs in rows.items():
        pairs.sort()
        if [p for p, _ in pairs] != list(range(len(pairs))):
            raise IngestError(f"{d}: positions are not 0..{len(pairs) - 1} exactly once")
        out[d] = vectors[[i for _, i in pairs]]
    return out


def finish_ingest(plan: IngestPlan,
                  new_vectors: Mapping[str, np.ndarray] | None = None) -> IngestResult:
    """Cache `new_vectors` (doc_id -> (n_chunks, D)) and write the bank from the cache."""
    n_concepts = sum(len(d.chunks) for d in plan.docs)
    if plan.reuse_bank:
        log.info("bank %s is up to date; nothing encoded", plan.out_path)
        return IngestResult(plan.out_path, len(plan.docs), n_concepts, plan.skipped, True,
                            len(plan.docs))
    for doc_id, v in (new_vectors or {}).items():
        if doc_id not in plan._by_id:
            raise IngestError(f"vectors given for unknown document {doc_id!r}")
        plan.store(doc_id, v)
    missing = [d.doc_id for d in plan.docs if not d.cached]
    if missing:
        raise IngestError(f"{len(missing)} document(s) have no vectors yet, e.g. {missing[:3]}")
    per_doc = [np.load(plan.cache_dir / f"{d.key}.npy") for d in plan.docs]
    dims = {v.shape[1] for v in per_doc}
    if len(dims) != 1:
        raise IngestError(f"cached vectors disagree on the dimension: {sorted(dims)}")
    split_of = assign_splits([d.doc_id for d in plan.docs], plan.split_cfg)
    bank = ConceptBank(
        doc_ids=np.array([d.doc_id for d in plan.docs for _ in d.chunks], dtype=object),
        positions=np.concatenate([np.arange(len(d.chunks), dtype=np.int32) for d in plan.docs]),
        texts=np.array([c for d in plan.docs for c in d.chunks], dtype=object),
        vectors=np.concatenate(per_doc),  # (N, D)
        splits=np.array([split_of[d.doc_id] for d in plan.docs for _ in d.chunks], dtype=object),
        lanes=np.full(n_concepts, -1, dtype=np.int16),
        meta=dict(plan.meta),
    )
    save_bank(bank, plan.out_path)
    log.info("wrote %s: %d docs, %d concepts, dim %d (%d docs from cache)", plan.out_path,
             len(plan.docs), n_concepts, bank.dim, plan.cache_hits)
    return IngestResult(plan.out_path, len(plan.docs), n_concepts, plan.skipped, False,
                        plan.cache_hits)


def ingest(corpus_cfg: CorpusConfig, encoder_cfg: EncoderConfig, split_cfg: SplitConfig,
           out_path: str | Path, encode_fn: EncodeFn | None = None, show_progress: bool = True,
           chunks_per_call: int = 1024, overwrite: bool = False) -> IngestResult:
    """Build (or reuse) the concept bank at out_path.

    encode_fn(texts) -> (N, D) replaces the local encoder; it is called on groups of whole
    documents of about `chunks_per_call` chunks, and each group is cached before the next, so an
    interrupted run resumes where it stopped. source 'bank' validates cfg.path and returns it
    (out_path is not written; read result.bank_path); 'synthetic' writes make_synthetic_bank.
    A bank at out_path built from other settings is never replaced unless overwrite."""
    if corpus_cfg.source == "bank":
        return _validate_bank(corpus_cfg)
    if corpus_cfg.source == "synthetic":
        return _ingest_synthetic(corpus_cfg, split_cfg, Path(out_path), overwrite)
    plan = plan_ingest(corpus_cfg, encoder_cfg, split_cfg, out_path, show_progress, overwrite)
    todo = plan.todo
    if todo and encode_fn is None:
        # Loaded only when something needs encoding; an exported backend's model is cached
        # beside the embeddings.
        encoder = get_encoder(encoder_cfg, export_root=plan.cache_dir / "encoders")

        def encode_fn(texts: list[str]) -> np.ndarray:
            return encoder.encode(texts, batch_size=encoder_cfg.batch_size)

    bar = tqdm(total=sum(len(d.chunks) for d in todo), desc="encode", unit="chunk",
               disable=not show_progress or not todo)
    with bar:
        group: list[DocPlan] = []
        for i, d in enumerate(todo):
            group.append(d)
            if sum(len(g.chunks) for g in group) >= chunks_per_call or i == len(todo) - 1:
                texts = [c for g in group for c in g.chunks]
                vectors = np.asarray(encode_fn(texts))
                if vectors.ndim != 2 or vectors.shape[0] != len(texts):
                    raise IngestError(
                        f"encode_fn must return (N={len(texts)}, D), got {vectors.shape}"
                    )
                offset = 0
                for g in group:
                    plan.store(g.doc_id, vectors[offset : offset + len(g.chunks)])
                    offset += len(g.chunks)
                bar.update(len(texts))
                group = []
    return finish_ingest(plan)


def _ingest_synthetic(cfg: CorpusConfig, split_cfg: SplitConfig, out_path: Path,
                      overwrite: bool = False) -> IngestResult:
    bank = make_synthetic_bank(n_docs=cfg.max_docs or 24, split_cfg=split_cfg)
    bank.meta["corpus"] = corpus_meta(cfg)
    n_docs = len(bank.doc_order())
    reused = reuse_existing(out_path, bank.meta, overwrite)
    if not reused:
        save_bank(bank, out_path)
    return IngestResult(out_path, n_docs, len(bank), [], reused, n_docs if reused else 0)


def _validate_bank(cfg: CorpusConfig) -> IngestResult:
    if not cfg.path:
        raise CorpusError("corpus.source 'bank' needs corpus.path (the Parquet concept bank)")
    path = Path(cfg.path)
    bank = load_bank(path)
    if len(bank) == 0:
        raise BankError(f"{path}: the bank has no rows")
    if not np.all(np.isfinite(bank.vectors)):
        raise BankError(f"{path}: vectors contain NaN or inf")
    norms = np.linalg.norm(bank.vectors, axis=1)
    if np.abs(norms - 1).max() > 1e-3:
        raise BankError(f"{path}: vectors must be unit norm (max |norm - 1| = "
                        f"{np.abs(norms - 1).max():.3g})")
    if not set(bank.splits.tolist()) <= set(SPLITS):
        raise BankError(f"{path}: column 'split' must hold only {SPLITS}")
    check_split_disjoint(bank)
    # Windows treat each document as one contiguous run with positions 0, 1, 2, ...
    new_doc = np.r_[True, bank.doc_ids[1:] != bank.doc_ids[:-1]]
    if new_doc.sum() != len(np.unique(bank.doc_ids)):
        raise BankError(f"{path}: rows of a document must be contiguous (order by doc, position)")
    starts = np.flatnonzero(new_doc)
    expected = np.arange(len(bank)) - np.repeat(starts, np.diff(np.r_[starts, len(bank)]))
    if not np.array_equal(bank.positions, expected):
        raise BankError(f"{path}: positions must run 0, 1, 2, ... within each document")
    n_docs = int(new_doc.sum())
    log.info("using existing bank %s: %d docs, %d concepts, encoder %s", path, n_docs, len(bank),
             bank.meta.get("encoder"))
    return IngestResult(path, n_docs, len(bank), [], True, n_docs)
