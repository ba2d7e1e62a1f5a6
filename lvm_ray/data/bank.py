"""The concept bank: one row per concept (text chunk) with its unit vector, stored as Parquet.

Rows are ordered by document (corpus order) then position, and `concept_id` equals the row index,
so windows can be plain index ranges over `vectors`. Vectors are a plain pyarrow
FixedSizeList<float32, D> so any Parquet reader gets the shape back. Encoder identity and chunking
settings live in the file's schema metadata under b"lvm_ray". A bank is one Parquet file or a
directory of Parquet shards (lvm_ray.data.bankdir); both read the same.

A *lean* bank (`load_bank(path, lean=True)`, `bank.lean()`) is what training and evaluation hold:
document ids as int32 codes into `doc_names`, splits as fixed-width strings, texts read from the
file on demand: only numeric arrays, so Ray's object store shares them zero-copy between workers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvm_ray.data import bankdir
from lvm_ray.data.bankdir import META_KEY, BankError, BankTexts

SPLITS = ("train", "val", "test")
BANK_FORMAT = 1


@dataclass
class ConceptBank:
    doc_ids: np.ndarray  # (N,) object[str]; a lean bank: int32 codes into doc_names
    positions: np.ndarray  # (N,) int32, 0-based position of the concept in its document
    texts: np.ndarray | BankTexts | None  # (N,) object[str]; lean: read on demand (or None)
    vectors: np.ndarray  # (N, D) float32, unit norm (float16 only in a training copy)
    splits: np.ndarray  # (N,) str in SPLITS (object, or <U5 in a lean bank)
    lanes: np.ndarray  # (N,) int16, -1 when unknown
    meta: dict[str, Any] = field(default_factory=dict)  # encoder, dim, corpus, chunking
    doc_names: np.ndarray | None = None  # (n_docs,) object[str] when doc_ids are codes

    def __post_init__(self) -> None:
        n = len(self.doc_ids)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n:
            raise BankError(f"vectors must be (N={n}, D), got {self.vectors.shape}")
        for name in ("positions", "texts", "splits", "lanes"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise BankError(f"{name} has {len(getattr(self, name))} rows, expected {n}")
        keep = self.vectors.dtype if self.vectors.dtype in (np.float32, np.float16) else np.float32
        self.vectors = np.ascontiguousarray(self.vectors, dtype=keep)

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def concept_ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    def split_rows(self, split: str) -> np.ndarray:
        """Row indices of one split, in corpus order. (M,) int64."""
        if split not in SPLITS:
            raise BankError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(self.splits == split).astype(np.int64)

    def doc_order(self) -> list[str]:
        """Document ids in corpus order."""
        _, first = np.unique(self.doc_ids, return_index=True)
        return [self.doc_id(i) for i in np.sort(first)]

    def doc_names_of(self, rows: np.ndarray) -> np.ndarray:
        """The document ids (names, str) of these rows, whether doc_ids are names or codes."""
        d = self.doc_ids[rows]
        return (d if self.doc_names is None else self.doc_names[d]).astype(str)

    def doc_id(self, row: int) -> str:
        """The document id of one row, whether doc_ids are names or codes."""
        d = self.doc_ids[row]
        return str(d if self.doc_names is None else self.doc_names[d])

    def lean(self, vector_dtype: str = "float32") -> ConceptBank:
        """The numeric bank training and evaluation need (same vectors unless another dtype is
        asked for): document codes, fixed-width splits, texts only as a lazy file reader. Its
        recorded content hash is the full bank's, so its identity is unchanged."""
        meta = dict(self.meta)
        meta[CONTENT_HASH] = self.content_hash()
        if self.doc_names is None:
            doc_names, codes = _codes(self.doc_ids)
        else:
            doc_names, codes = self.doc_names, self.doc_ids
        return ConceptBank(
            doc_ids=codes, positions=self.positions,
            texts=self.texts if isinstance(self.texts, BankTexts) else None,
            vectors=self.vectors.astype(vector_dtype, copy=False),
            splits=np.asarray(self.splits, dtype="<U5"), lanes=self.lanes, meta=meta,
            doc_names=doc_names)

    def content_hash(self) -> str:
        """The bank's own fingerprint: recorded in its metadata when it was saved, else computed."""
        return self.meta.get(CONTENT_HASH) or content_hash(self)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records about the data it was trained on. `content` fingerprints
        the vectors, documents, positions and splits, so a bank rebuilt from other data (or
        another encoder) never passes for the one a model was trained on."""
        return {
            "encoder": self.meta.get("encoder"),
            "dim": self.dim,
            "corpus": self.meta.get("corpus"),
            "n_concepts": len(self),
            "n_docs": int(len(np.unique(self.doc_ids))),
            "content": self.content_hash(),
        }


CONTENT_HASH = "content_sha256"  # the bank metadata key of content_hash()


def content_hash(bank: ConceptBank) -> str:
    """SHA-256 of the vectors and of the rows' document, position and split: what makes two
    banks interchangeable for a model and its evaluation. About 1 s per GB of vectors.
    bankdir.stream_content_hash computes the same from the files, shard by shard."""
    h = hashlib.sha256()
    h.update(f"{len(bank)}x{bank.dim}".encode())
    h.update(np.ascontiguousarray(bank.vectors, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(bank.positions, dtype="<i4").tobytes())
    doc_ids = bank.doc_ids if bank.doc_names is None else bank.doc_names[bank.doc_ids]
    for column in (doc_ids, bank.splits):
        h.update("\x1f".join(map(str, column.tolist())).encode())
    return h.hexdigest()


def _codes(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(names in first-appearance order, (N,) int32 codes): documents are contiguous runs."""
    if len(doc_ids) == 0:
        return np.zeros(0, dtype=object), np.zeros(0, dtype=np.int32)
    new = np.r_[True, doc_ids[1:] != doc_ids[:-1]]
    run = np.cumsum(new) - 1  # run index of each row
    names, first = np.unique(doc_ids[new], return_index=True)
    if len(names) == int(new.sum()):  # the usual case: every document one contiguous run
        return np.asarray(doc_ids[new], dtype=object), run.astype(np.int32)
    order = np.argsort(first)  # a document split in several runs keeps one code
    code_of = np.empty(len(names), dtype=np.int32)
    code_of[order] = np.arange(len(names), dtype=np.int32)
    inverse = np.unique(doc_ids, return_inverse=True)[1].reshape(-1)
    return np.asarray(names[order], dtype=object), code_of[inverse]


class BankMismatch(BankError):
    """A checkpoint is paired with a bank it was not trained on."""


def check_identity(recorded: dict[str, Any] | None, bank: Any, checkpoint: str,
                   bank_path: str, allow: bool = False) -> list[str]:
    """Refuse a checkpoint / bank pair that do not belong together (BankMismatch naming both),
    unless `allow`; returns the differences (empty when they match or nothing was recorded)."""
    diffs = identity_mismatch(recorded or {}, bank)
    if diffs and not allow:
        raise BankMismatch(
            f"checkpoint {checkpoint} was not trained on the bank {bank_path}: "
            + "; ".join(diffs) + ". Use the bank it was trained on (its config's bank_path), "
            "or allow the pair explicitly (lvm evaluate --allow-bank-mismatch; Serve args "
            "allow_bank_mismatch: true)")
    return diffs


def identity_mismatch(recorded: dict[str, Any], bank: Any) -> list[str]:
    """How `bank` (anything with `identity()`: a ConceptBank, a serving Retrieval) differs from
    the identity a checkpoint recorded (empty: it is that bank).
    Only recorded fields are compared: an older checkpoint without `content` is checked on the
    rest."""
    current = bank.identity()
    return [f"{k}: trained on {recorded[k]!r}, this bank has {current[k]!r}"
            for k in ("content", "dim", "n_concepts", "encoder")
            if k in recorded and recorded[k] is not None and recorded[k] != current[k]]


def bank_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("concept_id", pa.int64()),
            ("doc_id", pa.string()),
            ("position", pa.int32()),
            ("text", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
            ("split", pa.string()),
            ("lane", pa.int16()),
        ]
    )


def to_table(bank: ConceptBank) -> pa.Table:
    if bank.texts is None:
        raise BankError("this bank holds no texts (a lean copy); save the bank it came from")
    dim = bank.dim
    flat = pa.array(bank.vectors.astype(np.float32, copy=False).reshape(-1), type=pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, dim)
    meta = dict(bank.meta, dim=dim, format=BANK_FORMAT, **{CONTENT_HASH: content_hash(bank)})
    doc_ids = bank.doc_ids if bank.doc_names is None else bank.doc_names[bank.doc_ids]
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(len(bank), dtype=np.int64)),
            pa.array(doc_ids.tolist(), type=pa.string()),
            pa.array(bank.positions.astype(np.int32)),
            pa.array(bank.texts.tolist(), type=pa.string()),
            vectors,
            pa.array(np.asarray(bank.splits).tolist(), type=pa.string()),
            pa.array(bank.lanes.astype(np.int16)),
        ],
        schema=bank_schema(dim),
    )
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_vector(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


COLUMN_TYPES = {"concept_id": (pa.types.is_integer, "an integer"), "doc_id": (_is_text, "a string"),
                "position": (pa.types.is_integer, "an integer"), "text": (_is_text, "a string"),
                "vector": (_is_vector, "FixedSizeList<float32>"),
                "split": (_is_text, "a string"), "lane": (pa.types.is_integer, "an integer")}


def _has_extension(t: pa.DataType) -> bool:
    if isinstance(t, pa.BaseExtensionType):
        return True
    if pa.types.is_dictionary(t):
        return _has_extension(t.value_type)
    return any(_has_extension(t.field(i).type) for i in range(t.num_fields))


def check_schema(schema: pa.Schema) -> None:
    """Plain Arrow types only. An extension type is rebuilt by whatever code registered its
    name: Ray Data's `ray.data.arrow_pickled_object` unpickles each value it is asked for, so a
    bank with such a column would run the pickle's payload on load. Refused before any value is
    read."""
    for f in schema:
        if _has_extension(f.type):
            raise BankError(f"column {f.name!r} has the extension type {f.type}; a concept bank "
                            "holds plain Arrow types only (refusing to deserialize Python "
                            "objects from a file)")
        check, what = COLUMN_TYPES.get(f.name, (None, ""))
        if check is not None and not check(f.type):
            raise BankError(f"column {f.name!r} must be {what}, got {f.type}")
    missing = {"doc_id", "position", "text", "vector"} - set(schema.names)
    if missing:
        raise BankError(f"bank is missing column(s) {sorted(missing)}")


def from_table(table: pa.Table) -> ConceptBank:
    """A bank held as one Arrow table (its schema metadata included)."""
    check_schema(table.schema)
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw_meta) if raw_meta else {}
    batches = table.combine_chunks().to_batches() or [pa.RecordBatch.from_pylist(
        [], schema=table.schema)]
    return _assemble(batches, table.schema, len(table), meta, lean=False, texts=None)


def save_bank(bank: ConceptBank, path: str | Path) -> Path:
    """Write one Parquet file atomically: a reader never sees a half-written bank."""
    return bankdir.write_parquet_atomic(to_table(bank), Path(path))


def load_bank(path: str | Path, lean: bool = False) -> ConceptBank:
    """The bank at `path` (a Parquet file or a sharded directory), read batch by batch into
    preallocated arrays. lean=True: document codes and no texts in memory (ConceptBank.lean)."""
    path = Path(path)
    try:
        files = bankdir.bank_files(path)
        for f in files:  # every file's types, before any value is read
            check_schema(pq.read_schema(f))
        schema = pq.read_schema(files[0])
        meta = bankdir.read_meta(path)
        n = bankdir.n_rows(path)
        columns = [c for c in schema.names if c in COLUMN_TYPES and not (lean and c == "text")]
        batches = bankdir.iter_batches(path, columns)
        bank = _assemble(batches, schema, n, meta, lean, BankTexts(path) if lean else None)
        bankdir.release_arrow_memory()
        return bank
    except (pa.ArrowInvalid, OSError) as e:
        raise BankError(f"{path}: not a readable Parquet concept bank: {e}") from e
    except BankError as e:
        raise BankError(e if str(path) in str(e) else f"{path}: {e}") from None


def _assemble(batches, schema: pa.Schema, n: int, meta: dict[str, Any], lean: bool,
              texts: BankTexts | None) -> ConceptBank:
    """Fill the bank's arrays from record batches in concept order (one batch in flight)."""
    dim = schema.field("vector").type.list_size
    vectors = np.empty((n, dim), dtype=np.float32)
    positions = np.empty(n, dtype=np.int32)
    lanes = np.full(n, -1, dtype=np.int16)
    splits = np.full(n, "", dtype="<U5" if lean else object)
    doc_ids = np.empty(n, dtype=np.int32 if lean else object)
    text_list: list[str] = []
    names: list[str] = []
    row = 0
    for b in batches:
        cols = dict(zip(b.schema.names, b.columns))
        m = b.num_rows
        if row + m > n:
            raise BankError(f"the bank has more rows than its metadata says ({n})")
        if "concept_id" in cols and not np.array_equal(cols["concept_id"].to_numpy(),
                                                       np.arange(row, row + m)):
            raise BankError("concept_id must equal the row index (0..N-1); was the file "
                            "re-sorted?")
        vectors[row : row + m] = bankdir.vectors_of(b)
        positions[row : row + m] = cols["position"].to_numpy(zero_copy_only=False)
        if "lane" in cols:
            lanes[row : row + m] = cols["lane"].to_numpy(zero_copy_only=False)
        if "split" in cols:
            splits[row : row + m] = cols["split"].to_pylist()
        ids = np.array(cols["doc_id"].to_pylist(), dtype=object)
        if lean and m:
            # Documents are contiguous runs: a new code where the id differs from the row before.
            new = np.r_[not names or names[-1] != ids[0], ids[1:] != ids[:-1]]
            doc_ids[row : row + m] = len(names) - 1 + np.cumsum(new)
            names += ids[new].tolist()
        elif not lean:
            doc_ids[row : row + m] = ids
            text_list += cols["text"].to_pylist()
        row += m
    if row != n:
        raise BankError(f"the bank has {row} rows but its metadata says {n}")
    bank = ConceptBank(doc_ids=doc_ids, positions=positions,
                       texts=texts if lean else np.array(text_list, dtype=object),
                       vectors=vectors, splits=splits, lanes=lanes, meta=meta,
                       doc_names=np.array(names, dtype=object) if lean else None)
    if lean and len(set(names)) != len(names):
        # A document in several runs (a bank not in document order): codes by name instead.
        bank.doc_names, bank.doc_ids = _codes(np.array(names, dtype=object)[doc_ids])
    if CONTENT_HASH not in meta:  # an older bank: fingerprint it once, here
        meta[CONTENT_HASH] = content_hash(bank)
    return bank


def read_bank_meta(path: str | Path) -> dict[str, Any]:
    """The bank's metadata without reading its rows."""
    return bankdir.read_meta(path)
