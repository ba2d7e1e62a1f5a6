"""Document splits and sequence windows, as ../shared/EVAL_PROTOCOL.md defines them.

A split is assigned per document before any window is cut. A window is (context = up to L
consecutive vectors, target = the next vector), stored as index ranges over one split's "stream"
(the split's bank rows in corpus order), never as copies of the vectors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from lvm_ray.config import SplitConfig, WindowConfig
from lvm_ray.data.bank import SPLITS, ConceptBank


class LeakageError(AssertionError):
    """A window or split mixes data that the protocol keeps apart."""


def assign_splits(doc_ids: list[str], cfg: SplitConfig) -> dict[str, str]:
    """doc_id -> split. Deterministic from the doc ids: documents are ranked by a salted hash
    and the first train-fraction go to train, the next val-fraction to val, the rest to test.
    With >= 3 documents every split with a non-zero fraction gets at least one."""
    unique = sorted(set(doc_ids))
    ranked = sorted(
        unique, key=lambda d: hashlib.sha256(f"{cfg.salt}:{d}".encode()).hexdigest()
    )
    n = len(ranked)
    n_val = int(round(cfg.val * n))
    n_test = int(round(cfg.test * n))
    if n >= 3:
        n_val = max(n_val, 1 if cfg.val > 0 else 0)
        n_test = max(n_test, 1 if cfg.test > 0 else 0)
    n_train = n - n_val - n_test
    out = {d: "train" for d in ranked[:n_train]}
    out.update({d: "val" for d in ranked[n_train : n_train + n_val]})
    out.update({d: "test" for d in ranked[n_train + n_val :]})
    return out


def check_split_disjoint(bank: ConceptBank) -> None:
    """Every document lies in exactly one split. Vectorised over rows (one pass of numpy, no
    Python loop over the bank)."""
    splits = np.asarray(bank.splits).astype(str)
    bad = ~np.isin(splits, SPLITS)
    if bad.any():
        i = int(np.argmax(bad))
        raise LeakageError(f"document {bank.doc_id(i)!r} has unknown split {str(splits[i])!r}")
    _, first, docs = np.unique(np.asarray(bank.doc_ids), return_index=True, return_inverse=True)
    docs = docs.reshape(-1)
    code = np.zeros(len(splits), dtype=np.int8)
    for k, name in enumerate(SPLITS):
        code[splits == name] = k
    clash = code != code[first][docs]  # a row whose split is not its document's first row's
    if clash.any():
        i = int(np.argmax(clash))
        j = int(first[docs[i]])
        raise LeakageError(f"document {bank.doc_id(i)!r} appears in splits {str(splits[j])!r} and "
                           f"{str(splits[i])!r}")


@dataclass(frozen=True)
class WindowSet:
    """Windows over one split. Window i has context rows rows[start[i]:end[i]] and target row
    rows[end[i]]; `rows` are bank row indices (== concept ids) of the split in corpus order."""

    split: str
    rows: np.ndarray  # (S,) int64 bank rows of this split, corpus order
    start: np.ndarray  # (M,) int64 index into rows
    end: np.ndarray  # (M,) int64 index into rows (exclusive); the target is rows[end]
    context: int  # L, the longest context
    policy: str

    def __len__(self) -> int:
        return len(self.end)

    @property
    def lengths(self) -> np.ndarray:
        return self.end - self.start

    @property
    def target_rows(self) -> np.ndarray:
        return self.rows[self.end]

    @property
    def last_rows(self) -> np.ndarray:
        return self.rows[self.end - 1]

    def context_rows(self, i: int) -> np.ndarray:
        return self.rows[self.start[i] : self.end[i]]

    def subset(self, idx: np.ndarray) -> "WindowSet":
        idx = np.asarray(idx, dtype=np.int64)
        return WindowSet(self.split, self.rows, self.start[idx], self.end[idx], self.context,
                         self.policy)

    def sample(self, n: int | None, seed: int) -> "WindowSet":
        """A fixed random subset of at most n windows, kept in order (cheap val/eval caps)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.subset(idx)


def make_windows(bank: ConceptBank, split: str, cfg: WindowConfig) -> WindowSet:
    """Cut the windows of one split under cfg.policy."""
    rows = bank.split_rows(split)
    if len(rows) == 0:
        return WindowSet(split, rows, np.zeros(0, np.int64), np.zeros(0, np.int64), cfg.context,
                         cfg.policy)
    docs = bank.doc_ids[rows]
    # First index (into rows) of each row's document: documents are contiguous runs.
    new_doc = np.ones(len(rows), dtype=bool)
    new_doc[1:] = docs[1:] != docs[:-1]
    doc_start = np.maximum.accumulate(np.where(new_doc, np.arange(len(rows)), 0))
    t = np.arange(len(rows), dtype=np.int64)
    if cfg.policy == "document":
        start = np.maximum(doc_start, t - cfg.context)
        ok = (t - start) >= cfg.min_context
        # Stride counts positions inside each document so every document starts the same way.
        pos_in_doc = t - doc_start
        ok &= (pos_in_doc - cfg.min_context) % cfg.stride == 0
    elif cfg.policy == "stream":
        start = np.maximum(0, t - cfg.context)
        ok = (t - start) >= cfg.min_context
        ok &= (t - cfg.min_context) % cfg.stride == 0
    else:
        raise ValueError(f"unknown window policy {cfg.policy!r}; use 'document' or 'stream'")
    end = t[ok]
    return WindowSet(split, rows, start[ok], end, cfg.context, cfg.policy)


def document_ends(bank: ConceptBank, rows: np.ndarray) -> np.ndarray:
    """For each position t of a split's rows, the end (exclusive, an index into rows) of t's
    document: positions t+1 .. end-1 are the concepts that follow t in its own document.
    (S,) int64."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    docs = bank.doc_ids[rows]
    last = np.ones(len(rows), dtype=bool)  # t is the last row of its document
    last[:-1] = docs[1:] != docs[:-1]
    ends = np.where(last, np.arange(1, len(rows) + 1), len(rows))
    return np.minimum.accumulate(ends[::-1])[::-1].astype(np.int64)


def short_documents(bank: ConceptBank, cfg: WindowConfig) -> tuple[int, int]:
    """(documents, concepts) that give no window under the `document` policy: documents of at
    most min_context concepts have no target after a long enough context. (0, 0) for `stream`,
    whose windows run across documents."""
    if cfg.policy != "document" or len(bank) == 0:
        return 0, 0
    new_doc = np.r_[True, bank.doc_ids[1:] != bank.doc_ids[:-1]]
    lengths = np.diff(np.r_[np.flatnonzero(new_doc), len(bank)])
    short = lengths <= cfg.min_context
    return int(short.sum()), int(lengths[short].sum())


def check_windows(bank: ConceptBank, ws: WindowSet) -> None:
    """Fail loudly if any window reaches outside its split or (document policy) its document,
    or holds more than L context vectors. Vectorised: O(M) whatever L is."""
    if len(ws) == 0:
        return
    if np.any(bank.splits[ws.rows] != ws.split):
        raise LeakageError(f"window rows of split {ws.split!r} include rows of another split")
    if np.any(ws.start < 0) or np.any(ws.end >= len(ws.rows)) or np.any(ws.end <= ws.start):
        raise LeakageError("window index out of range or empty context")
    if np.any(ws.lengths > ws.context):
        raise LeakageError(f"a window holds more than L={ws.context} context vectors")
    # rows must be exactly this split's rows in corpus order (start/end index into them).
    if not np.array_equal(ws.rows, bank.split_rows(ws.split)):
        raise LeakageError("window rows are not the split's rows in corpus order")
    if ws.policy == "document":
        first_doc = bank.doc_ids[ws.rows[ws.start]]
        target_doc = bank.doc_ids[ws.target_rows]
        if np.any(first_doc != target_doc):
            raise LeakageError("a document-policy window crosses a document boundary")


def gather_batch(vectors: np.ndarray, ws: WindowSet, idx: np.ndarray,
                 max_len: int | None = None):
    """Materialise windows idx as a right-padded batch.

    Returns ctx (B, T, D) float32 (zeros after each length), lengths (B,) int64, target (B, D),
    last (B, D). T = the longest context in the batch (capped by max_len, keeping the latest)."""
    idx = np.asarray(idx, dtype=np.int64)
    start, end = ws.start[idx], ws.end[idx]
    if max_len is not None:
        start = np.maximum(start, end - max_len)
    lengths = end - start
    b, t, d = len(idx), int(lengths.max()), vectors.shape[1]
    offs = np.arange(t)
    pos = start[:, None] + offs[None, :]  # (B, T) index into ws.rows
    valid = offs[None, :] < lengths[:, None]
    rows = ws.rows[np.where(valid, pos, start[:, None])]
    ctx = vectors[rows].astype(np.float32, copy=False)  # (B, T, D); float16 banks widen here
    ctx[~valid] = 0.0
    target = vectors[ws.rows[end]].astype(np.float32, copy=False)
    last = vectors[ws.rows[end - 1]].astype(np.float32, copy=False)
    assert ctx.shape == (b, t, d), f"expected ctx (B={b}, T={t}, D={d}), got {ctx.shape}"
    return ctx, lengths, target, last
