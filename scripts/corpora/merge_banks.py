"""Concept banks of one encoder -> one mixed bank, for a general model over several corpora
(issue 13): each document id is prefixed with its corpus's name ("kjv/Genesis"), so the bank knows
each concept's corpus; each concept keeps its split, so every corpus's test documents stay test
and a model of the mixed bank never trains on them; rows stay in input order (documents
contiguous, positions unchanged), as windows require.

    python scripts/corpora/merge_banks.py --out data/mixed_bank.parquet \\
        sotu=data/sotu_full_bank.parquet kjv=data/kjv_bank.parquet

Evaluate a mixed model on one corpus's own bank (its test split ranks only that corpus's test
concepts, as its own numbers do) with `lvm evaluate --allow-bank-mismatch`, or fine-tune it there
with `--set train.init_from=CHECKPOINT`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lvm_ray.data.bank import ConceptBank, load_bank, save_bank


def merge_banks(parts: dict[str, ConceptBank]) -> ConceptBank:
    """The banks' rows one after the other, document ids prefixed with '<name>/'."""
    if not parts:
        raise ValueError("give at least one NAME=BANK")
    first = next(iter(parts.values()))
    for name, b in parts.items():
        for key in ("encoder", "dim"):
            if b.meta.get(key) != first.meta.get(key):
                raise ValueError(f"bank {name!r} has {key} {b.meta.get(key)!r}, the first has "
                                 f"{first.meta.get(key)!r}: only banks of one encoder mix")
        if "/" in name or not name:
            raise ValueError(f"corpus name {name!r} must be non-empty and without '/'")
    doc_ids = np.concatenate([np.array([f"{name}/{d}" for d in np.asarray(b.doc_ids)],
                                       dtype=object) for name, b in parts.items()])
    meta = {k: v for k, v in first.meta.items()
            if k in ("encoder", "encoder_backend", "dim", "chunking", "split")}
    meta["corpus"] = {"source": "merged",
                      "parts": {name: {"rows": len(b), **(b.meta.get("corpus") or {})}
                                for name, b in parts.items()}}
    return ConceptBank(
        doc_ids=doc_ids,
        positions=np.concatenate([b.positions for b in parts.values()]).astype(np.int32),
        texts=np.concatenate([np.asarray(b.texts, dtype=object) for b in parts.values()]),
        vectors=np.concatenate([b.vectors for b in parts.values()]),
        splits=np.concatenate([np.asarray(b.splits, dtype=object) for b in parts.values()]),
        lanes=np.concatenate([b.lanes for b in parts.values()]).astype(np.int16),
        meta=meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+", metavar="NAME=BANK", help="a corpus name and its bank")
    ap.add_argument("--out", required=True, help="the mixed bank (one Parquet file)")
    args = ap.parse_args(argv)
    parts = {}
    for spec in args.parts:
        name, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"{spec!r}: expected NAME=BANK")
        parts[name] = load_bank(path)
    bank = merge_banks(parts)
    out = save_bank(bank, args.out)
    counts = ", ".join(f"{n} {len(b):,}" for n, b in parts.items())
    print(f"{out}: {len(bank):,} concepts ({counts}); splits kept: "
          + ", ".join(f"{s} {int((bank.splits == s).sum()):,}" for s in ("train", "val", "test")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
