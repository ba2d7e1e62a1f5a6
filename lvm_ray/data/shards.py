"""Sharded ingest: corpus partitions -> Parquet shards of one bank directory, resumable.

Three steps, each a plain function so that the local loop (`ingest_sharded`) and the Ray Data
pipeline (lvm_ray.distributed.data) run the very same code:

    surveys = [survey(cfg, enc, part) for part in partitions(cfg.corpus, ...)]   # per partition
    plan = plan_shards(cfg..., out_dir, surveys)       # driver: counts, ids, splits, offsets
    write_shard(plan.corpus, plan.shards[i], plan.meta, out_dir, encode_fn)      # per shard
    finish_shards(plan)                                # driver: content hash, manifest

A survey reads and chunks one partition and returns per document only (id, chunk count, key);
the driver never holds a document's text. Shard i holds partition i's kept documents with their
global concept ids (offsets from the survey counts: ids stay dense and in corpus order) and
records a key (settings + documents + splits + offset) in its footer: a re-run keeps every shard
whose key matches, so an interrupted ingest resumes from the shards already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lvm_ray.config import CorpusConfig, EncoderConfig, SplitConfig
from lvm_ray.data import bankdir
from lvm_ray.data.bank import BANK_FORMAT, CONTENT_HASH, META_KEY, bank_schema
from lvm_ray.data.corpus import (CorpusError, Document, Partition, Skipped, duplicate,
                                 partitions, read_partition)
from lvm_ray.data.encoders import encoder_key, encoder_name
from lvm_ray.data.ingest import (BankConflict, EncodeFn, IngestError, IngestResult, cache_dir_for,
                                 chunks_of, describe, doc_key, plan_ingest, reuse_existing,
                                 settings_meta)
from lvm_ray.data.windows import assign_splits

log = logging.getLogger(__name__)


@dataclass
class Survey:
    """One partition, read and chunked: per item in corpus order, a document
    (doc_id, n_chunks, key) or a skipped item (where, reason)."""

    partition: Partition
    docs: list[tuple[int, str, int, str, str]]  # (item in the partition, id, chunks, key, where)
    skipped: list[Skipped]

    def to_dict(self) -> dict[str, Any]:
        return {"partition": self.partition.to_dict(), "docs": self.docs,
                "skipped": [[s.where, s.reason] for s in self.skipped]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Survey":
        return cls(Partition(**d["partition"]), [tuple(x) for x in d["docs"]],
                   [Skipped(*x) for x in d["skipped"]])


def survey(corpus: CorpusConfig, encoder: EncoderConfig, part: Partition) -> Survey:
    """Read and chunk one partition; keep only counts and keys."""
    enc_key = encoder_key(encoder)
    docs, skipped = [], []
    for i, item in enumerate(read_partition(corpus, part)):
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        chunks = chunks_of(item.text, corpus)
        if not chunks:
            skipped.append(Skipped(item.doc_id, "no chunks after chunking"))
            continue
        docs.append((i, item.doc_id, len(chunks), doc_key(enc_key, corpus, chunks),
                     item.where or item.doc_id))
    return Survey(part, docs, skipped)


@dataclass
class ShardPlan:
    index: int
    partition: Partition
    picks: list[int]  # item indices of the kept documents in read_partition's output
    doc_ids: list[str]
    n_chunks: list[int]
    keys: list[str]
    splits: list[str]
    first_concept: int
    key: str = ""  # settings + documents + splits + offset: a shard with this key is done

    @property
    def rows(self) -> int:
        return sum(self.n_chunks)

    @property
    def file(self) -> str:
        return bankdir.SHARD_FORMAT.format(self.index)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["partition"] = self.partition.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardPlan":
        return cls(**{**d, "partition": Partition(**d["partition"])})


@dataclass
class ShardedPlan:
    out_dir: Path
    corpus: CorpusConfig
    shards: list[ShardPlan]
    skipped: list[Skipped]
    meta: dict[str, Any]  # the bank's settings (dim and content hash are added at the end)
    reuse_bank: bool  # out_dir already holds exactly this bank
    done: set[int] = field(default_factory=set)  # shards already written with their key

    @property
    def todo(self) -> list[ShardPlan]:
        return [] if self.reuse_bank else [s for s in self.shards if s.index not in self.done]

    @property
    def n_docs(self) -> int:
        return sum(len(s.doc_ids) for s in self.shards)

    @property
    def n_concepts(self) -> int:
        return sum(s.rows for s in self.shards)


def plan_shards(corpus: CorpusConfig, encoder: EncoderConfig, split: SplitConfig,
                out_dir: str | Path, surveys: list[Survey],
                overwrite: bool = False) -> ShardedPlan:
    """Surveys (any order) -> shards: repeated ids and documents past max_docs dropped, splits
    assigned, concept ids offset in corpus order; shards already written are found. Raises
    BankConflict when out_dir holds a bank (or shards) built from other settings."""
    out_dir = Path(out_dir)
    seen: set[str] = set()
    skipped: list[Skipped] = []
    kept: list[tuple[Survey, list[tuple[int, str, int, str, str]]]] = []
    n_docs = 0
    chosen = _longest(surveys, corpus.max_docs) if corpus.pick == "longest" else None
    for sv in sorted(surveys, key=lambda s: s.partition.index):
        skipped += sv.skipped
        docs = []
        for item, doc_id, n, key, where in sv.docs:
            if chosen is not None and doc_id not in chosen:
                continue
            if corpus.max_docs is not None and n_docs >= corpus.max_docs:
                break
            if doc_id in seen:
                skipped.append(duplicate(Document(doc_id, "", where=where)))
                continue
            seen.add(doc_id)
            docs.append((item, doc_id, n, key, where))
            n_docs += 1
        if docs:
            kept.append((sv, docs))
    if not kept:
        raise CorpusError(f"corpus {corpus.source!r} ({corpus.path}) yielded no usable documents")
    all_ids = [d[1] for _, docs in kept for d in docs]
    split_of = assign_splits(all_ids, split)
    fingerprint = hashlib.sha256(
        json.dumps([[d[1], d[3]] for _, docs in kept for d in docs]).encode()).hexdigest()
    meta = {**settings_meta(corpus, encoder, split), "fingerprint": fingerprint}
    shards, offset = [], 0
    for i, (sv, docs) in enumerate(kept):
        s = ShardPlan(i, sv.partition, [d[0] for d in docs], [d[1] for d in docs],
                      [d[2] for d in docs], [d[3] for d in docs],
                      [split_of[d[1]] for d in docs], offset)
        settings = {k: v for k, v in meta.items() if k != "fingerprint"}
        s.key = hashlib.sha256(json.dumps([settings, s.doc_ids, s.keys, s.splits,
                                           s.first_concept]).encode()).hexdigest()
        shards.append(s)
        offset += s.rows
    plan = ShardedPlan(out_dir, corpus, shards, skipped, meta,
                       reuse_bank=_reuse(out_dir, meta, overwrite))
    if not plan.reuse_bank:
        plan.done = {s.index for s in shards if _shard_done(out_dir / s.file, s)}
    return plan


def _longest(surveys: list[Survey], max_docs: int | None) -> set[str] | None:
    """corpus.pick=longest: the ids of the max_docs documents with the most chunks (ties: the
    earlier in corpus order; a repeated id counts once, as its first occurrence)."""
    if max_docs is None:
        return None
    first: dict[str, int] = {}
    for sv in sorted(surveys, key=lambda s: s.partition.index):
        for _, doc_id, n, _, _ in sv.docs:
            first.setdefault(doc_id, n)
    ids, n = list(first), list(first.values())
    return {ids[i] for i in sorted(range(len(ids)), key=lambda i: -n[i])[:max_docs]}


def _reuse(out_dir: Path, meta: dict[str, Any], overwrite: bool) -> bool:
    """reuse_existing for a bank (file or directory) at out_dir; a directory of shards without
    a manifest (an ingest under way or interrupted) may be resumed only with the same settings."""
    if not (out_dir.is_dir() and not (out_dir / bankdir.MANIFEST).exists()):
        return reuse_existing(out_dir, meta, overwrite)
    settings = {k: v for k, v in meta.items() if k != "fingerprint"}
    for f in sorted(out_dir.glob("part-*.parquet")):
        try:
            theirs = bankdir.footer_meta(f)
        except Exception:  # noqa: BLE001  a foreign or broken file: replaced only on overwrite
            theirs = {}
        if any(theirs.get(k) != v for k, v in settings.items()) and not overwrite:
            raise BankConflict(
                f"{out_dir} holds shards of an unfinished ingest built from {describe(theirs)}; "
                f"this run asks for {describe(meta)}. Nothing was written. Run that ingest "
                "again to finish it, choose another bank_path, or start over with `lvm ingest "
                "... --overwrite`")
    return False


def _shard_done(path: Path, s: ShardPlan) -> bool:
    try:
        info = bankdir.footer_meta(path).get("shard") or {}
    except Exception:  # noqa: BLE001  missing, truncated or foreign: encode it again
        return False
    return info.get("key") == s.key and info.get("rows") == s.rows


def write_shard(corpus: CorpusConfig, s: ShardPlan, meta: dict[str, Any], out_dir: str | Path,
                encode_fn: EncodeFn) -> dict[str, Any]:
    """Read, chunk and encode one shard's documents and write its Parquet file atomically."""
    items = read_partition(corpus, s.partition)
    texts, doc_col, pos_col, split_col = [], [], [], []
    for item, doc_id, n, key, sp in zip(s.picks, s.doc_ids, s.n_chunks, s.keys, s.splits):
        doc = items[item] if item < len(items) else None
        chunks = chunks_of(doc.text, corpus) if isinstance(doc, Document) else []
        if not isinstance(doc, Document) or doc.doc_id != doc_id or len(chunks) != n:
            raise IngestError(f"shard {s.index}: document {doc_id!r} changed since the ingest was "
                              "planned; run the ingest again")
        texts += chunks
        doc_col += [doc_id] * n
        pos_col += range(n)
        split_col += [sp] * n
    vectors = np.asarray(encode_fn(texts), dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise IngestError(f"encode_fn must return (N={len(texts)}, D), got {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms == 0):
        raise IngestError(f"shard {s.index}: vectors must be finite, without zero rows")
    vectors = vectors / norms  # (rows, D) unit vectors whatever encode_fn returned
    dim = vectors.shape[1]
    table = pa.Table.from_arrays(
        [pa.array(np.arange(s.first_concept, s.first_concept + s.rows, dtype=np.int64)),
         pa.array(doc_col, pa.string()), pa.array(np.asarray(pos_col, dtype=np.int32)),
         pa.array(texts, pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
         pa.array(split_col, pa.string()), pa.array(np.full(s.rows, -1, dtype=np.int16))],
        schema=bank_schema(dim))
    footer = dict(meta, dim=dim, format=BANK_FORMAT,
                  shard={"index": s.index, "key": s.key, "rows": s.rows,
                         "first_concept": s.first_concept})
    table = table.replace_schema_metadata({META_KEY: json.dumps(footer).encode()})
    bankdir.write_parquet_atomic(table, Path(out_dir) / s.file)
    del table
    bankdir.release_arrow_memory()  # a long-lived encoder actor writes many shards
    return {"index": s.index, "rows": s.rows, "dim": dim}


def finish_shards(plan: ShardedPlan) -> IngestResult:
    """Check every shard, fingerprint the bank shard by shard and write the manifest (last)."""
    reused_docs = sum(len(s.doc_ids) for s in plan.shards if s.index in plan.done)
    if plan.reuse_bank:
        log.info("bank %s is up to date; nothing encoded", plan.out_dir)
        return IngestResult(plan.out_dir, plan.n_docs, plan.n_concepts, plan.skipped, True,
                            plan.n_docs)
    missing = [s.index for s in plan.shards if not _shard_done(plan.out_dir / s.file, s)]
    if missing:
        raise IngestError(f"{len(missing)} shard(s) are not written yet, e.g. {missing[:3]}")
    dims = {bankdir.footer_meta(plan.out_dir / s.file)["dim"] for s in plan.shards}
    if len(dims) != 1:
        raise IngestError(f"shards disagree on the vector dimension: {sorted(dims)}")
    wanted = {s.file for s in plan.shards}
    for stray in plan.out_dir.glob("part-*.parquet"):  # shards of an earlier, larger plan
        if stray.name not in wanted:
            stray.unlink()
    shards = [{"file": s.file, "rows": s.rows, "first_concept": s.first_concept, "key": s.key}
              for s in plan.shards]
    meta = dict(plan.meta, dim=dims.pop(), format=BANK_FORMAT)
    meta[CONTENT_HASH] = bankdir.stream_content_hash([plan.out_dir / s.file for s in plan.shards])
    bankdir.write_manifest(plan.out_dir, meta, shards)
    log.info("wrote %s: %d shards, %d docs, %d concepts (%d docs in shards already written)",
             plan.out_dir, len(plan.shards), plan.n_docs, plan.n_concepts, reused_docs)
    return IngestResult(plan.out_dir, plan.n_docs, plan.n_concepts, plan.skipped, False,
                        reused_docs)


def prepare_out_dir(plan: ShardedPlan) -> None:
    """Before the first shard is written: a bank being replaced (overwrite) stops being one, so
    no reader takes a half-rewritten directory (or the old single file) for the new bank."""
    if plan.out_dir.is_file():
        plan.out_dir.unlink()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / bankdir.MANIFEST).unlink(missing_ok=True)


def survey_corpus(corpus: CorpusConfig, parts: list[Partition],
                  survey_many: Callable[[list[Partition]], list[Survey]]) -> list[Survey]:
    """Survey the partitions a plan needs: all of them, or with max_docs only the first ones
    (a second wave when skipped or repeated documents left too few)."""
    if corpus.max_docs is None or corpus.pick == "longest":  # the longest may be anywhere
        return survey_many(parts)
    out: list[Survey] = []
    ids: set[str] = set()
    i = 0
    while i < len(parts) and len(ids) < corpus.max_docs:
        n = max(1, -(-(corpus.max_docs - len(ids)) // corpus.docs_per_shard))
        out += survey_many(parts[i : i + n])
        ids = {d[1] for sv in out for d in sv.docs}
        i += n
    return out


def ingest_sharded(corpus: CorpusConfig, encoder: EncoderConfig, split: SplitConfig,
                   out_dir: str | Path, encode_fn: EncodeFn | None = None,
                   overwrite: bool = False, show_progress: bool = True) -> IngestResult:
    """The sharded ingest in this process (lvm_ray.distributed.data runs it on Ray Data)."""
    from tqdm.auto import tqdm

    from lvm_ray.data.encoders import get_encoder

    parts = partitions(corpus, corpus.docs_per_shard)
    surveys = survey_corpus(corpus, parts,
                            lambda ps: [survey(corpus, encoder, p) for p in ps])
    plan = plan_shards(corpus, encoder, split, out_dir, surveys, overwrite)
    log_plan(plan)
    if plan.todo:
        prepare_out_dir(plan)
        if encode_fn is None:
            enc = get_encoder(encoder, export_root=cache_dir_for(out_dir) / "encoders")

            def encode_fn(texts: list[str]) -> np.ndarray:
                return enc.encode(texts, batch_size=encoder.batch_size)

    for s in tqdm(plan.todo, desc="shards", unit="shard", disable=not show_progress):
        write_shard(corpus, s, plan.meta, out_dir, encode_fn)
    return finish_shards(plan)


def log_plan(plan: ShardedPlan) -> None:
    todo = plan.todo
    log.info("ingest %s: %d documents, %d chunks in %d shards; %d shards (%d chunks) to encode",
             plan.out_dir, plan.n_docs, plan.n_concepts, len(plan.shards), len(todo),
             sum(s.rows for s in todo))
    for s in plan.skipped:
        log.warning("skipped %s: %s", s.where, s.reason)


def dry_run(corpus: CorpusConfig, encoder: EncoderConfig, split: SplitConfig,
            out_path: str | Path, sharded: bool, encoders: int = 1,
            sample: int = 256) -> dict[str, Any]:
    """What an ingest would do, without writing anything: documents and chunks, how many are
    already encoded (cache or shards), and the encoding time estimated from `sample` chunks
    encoded here (after the encoder loaded) spread over `encoders` parallel encoders."""
    import time

    from lvm_ray.data.encoders import get_encoder

    conflict = None
    if sharded:
        parts = partitions(corpus, corpus.docs_per_shard)
        try:
            plan = plan_shards(corpus, encoder, split, out_path, survey_corpus(
                corpus, parts, lambda ps: [survey(corpus, encoder, p) for p in ps]))
        except BankConflict as e:
            conflict = str(e)
            plan = plan_shards(corpus, encoder, split, out_path, survey_corpus(
                corpus, parts, lambda ps: [survey(corpus, encoder, p) for p in ps]),
                overwrite=True)
        n_docs, n_chunks = plan.n_docs, plan.n_concepts
        todo = sum(s.rows for s in plan.todo)
        texts: list[str] = []
        for s in plan.todo[:1]:
            items = read_partition(corpus, s.partition)
            texts = [c for i in s.picks for c in chunks_of(items[i].text, corpus)][:sample]
    else:
        try:
            p = plan_ingest(corpus, encoder, split, out_path)
        except BankConflict as e:
            conflict = str(e)
            p = plan_ingest(corpus, encoder, split, out_path, overwrite=True)
        n_docs, n_chunks = len(p.docs), sum(len(d.chunks) for d in p.docs)
        todo = sum(len(d.chunks) for d in p.todo)
        texts = [c for d in p.todo for c in d.chunks][:sample]
    out: dict[str, Any] = {"bank": str(out_path), "documents": n_docs, "chunks": n_chunks,
                           "chunks_to_encode": todo, "chunks_already_encoded": n_chunks - todo,
                           "encoder": encoder_name(encoder), "encoders": encoders}
    if conflict:
        out["refused"] = conflict
    if texts:
        t = time.perf_counter()
        enc = get_encoder(encoder)
        out["encoder_load_s"] = round(time.perf_counter() - t, 2)
        enc.encode(texts[:8], batch_size=encoder.batch_size)  # warm-up
        t = time.perf_counter()
        enc.encode(texts, batch_size=encoder.batch_size)
        rate = len(texts) / max(time.perf_counter() - t, 1e-9)
        out["chunks_per_s_per_encoder"] = round(rate, 1)
        out["estimated_encode_s"] = round(todo / (rate * max(1, encoders)), 1)
    else:
        out["estimated_encode_s"] = 0.0
    return out
