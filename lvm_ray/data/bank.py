"""The concept bank: one row per concept (text chunk) with its unit vector, stored as Parquet.

Rows are ordered by document (corpus order) then position, and `concept_id` equals the row index,
so windows can be plain index ranges over `vectors`. Vectors are a plain pyarrow
FixedSizeList<float32, D> so any Parquet reader gets the shape back. Encoder identity and chunking
settings live in the file's schema metadata under b"lvm_ray".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPLITS = ("train", "val", "test")
META_KEY = b"lvm_ray"
BANK_FORMAT = 1


class BankError(ValueError):
    """The bank file is missing, malformed or inconsistent."""


@dataclass
class ConceptBank:
    doc_ids: np.ndarray  # (N,) object[str]
    positions: np.ndarray  # (N,) int32, 0-based position of the concept in its document
    texts: np.ndarray  # (N,) object[str]
    vectors: np.ndarray  # (N, D) float32, unit norm
    splits: np.ndarray  # (N,) object[str] in SPLITS
    lanes: np.ndarray  # (N,) int16, -1 when unknown
    meta: dict[str, Any] = field(default_factory=dict)  # encoder, dim, corpus, chunking

    def __post_init__(self) -> None:
        n = len(self.doc_ids)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n:
            raise BankError(f"vectors must be (N={n}, D), got {self.vectors.shape}")
        for name in ("positions", "texts", "splits", "lanes"):
            if len(getattr(self, name)) != n:
                raise BankError(f"{name} has {len(getattr(self, name))} rows, expected {n}")
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)

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
        return [str(self.doc_ids[i]) for i in np.sort(first)]

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
    banks interchangeable for a model and its evaluation. About 1 s per GB of vectors."""
    h = hashlib.sha256()
    h.update(f"{len(bank)}x{bank.dim}".encode())
    h.update(np.ascontiguousarray(bank.vectors, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(bank.positions, dtype="<i4").tobytes())
    for column in (bank.doc_ids, bank.splits):
        h.update("\x1f".join(map(str, column.tolist())).encode())
    return h.hexdigest()


class BankMismatch(BankError):
    """A checkpoint is paired with a bank it was not trained on."""


def check_identity(recorded: dict[str, Any] | None, bank: ConceptBank, checkpoint: str,
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


def identity_mismatch(recorded: dict[str, Any], bank: ConceptBank) -> list[str]:
    """How `bank` differs from the identity a checkpoint recorded (empty: it is that bank).
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
    dim = bank.dim
    flat = pa.array(bank.vectors.reshape(-1), type=pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, dim)
    meta = dict(bank.meta, dim=dim, format=BANK_FORMAT, **{CONTENT_HASH: content_hash(bank)})
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(len(bank), dtype=np.int64)),
            pa.array(bank.doc_ids.tolist(), type=pa.string()),
            pa.array(bank.positions.astype(np.int32)),
            pa.array(bank.texts.tolist(), type=pa.string()),
            vectors,
            pa.array(bank.splits.tolist(), type=pa.string()),
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


def from_table(table: pa.Table) -> ConceptBank:
    check_schema(table.schema)
    missing = {"doc_id", "position", "text", "vector"} - set(table.column_names)
    if missing:
        raise BankError(f"bank is missing column(s) {sorted(missing)}")
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw_meta) if raw_meta else {}
    vec_col = table.column("vector").combine_chunks()
    if not pa.types.is_fixed_size_list(vec_col.type):
        raise BankError(f"column 'vector' must be FixedSizeList<float32>, got {vec_col.type}")
    dim = vec_col.type.list_size
    vectors = vec_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    n = len(table)
    if "concept_id" in table.column_names:
        ids = table.column("concept_id").to_numpy()
        if not np.array_equal(ids, np.arange(n)):
            raise BankError("concept_id must equal the row index (0..N-1); was the file re-sorted?")
    splits = (
        np.array(table.column("split").to_pylist(), dtype=object)
        if "split" in table.column_names
        else np.full(n, "", dtype=object)
    )
    lanes = (
        table.column("lane").to_numpy().astype(np.int16)
        if "lane" in table.column_names
        else np.full(n, -1, dtype=np.int16)
    )
    return ConceptBank(
        doc_ids=np.array(table.column("doc_id").to_pylist(), dtype=object),
        positions=table.column("position").to_numpy().astype(np.int32),
        texts=np.array(table.column("text").to_pylist(), dtype=object),
        vectors=vectors,
        splits=splits,
        lanes=lanes,
        meta=meta,
    )


def save_bank(bank: ConceptBank, path: str | Path) -> Path:
    """Write atomically: a reader never sees a half-written bank."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(to_table(bank), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_bank(path: str | Path) -> ConceptBank:
    path = Path(path)
    if not path.exists():
        raise BankError(f"concept bank not found: {path} (run `lvm ingest` first)")
    try:
        check_schema(pq.read_schema(path))
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BankError(f"{path}: not a readable Parquet concept bank: {e}") from e
    except BankError as e:
        raise BankError(f"{path}: {e}") from None
    return from_table(table)


def read_bank_meta(path: str | Path) -> dict[str, Any]:
    """The bank's metadata without reading its rows."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}
