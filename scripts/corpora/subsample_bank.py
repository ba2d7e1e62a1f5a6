"""A concept bank -> the same bank with other training data: only a fraction of its training
documents, for the data-scaling curve (docs/results.md 10.6), or (--reversed) every training
document twice, forwards and backwards, a data augmentation that needs no new text (10.18).
Whole training documents are dropped (a seeded draw) or added; every val and test document is
kept with its rows unchanged, so a model trained on the new bank is scored on the same test
windows and the same test bank as one trained on the original.

    python scripts/corpora/subsample_bank.py --fraction 0.25 --out data/sotu_train25_bank.parquet \\
        data/sotu_full_bank.parquet
    lvm ablate --config configs/ablations/base.yaml --rows base --set corpus.source=bank \\
        --set bank_path=data/sotu_train25_bank.parquet --out runs/scaling/train25
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from lvm_ray.data.bank import ConceptBank, load_bank, save_bank


def _kept_meta(bank: ConceptBank) -> dict:
    """What still describes the new bank: its encoder, chunking and split rule."""
    return {k: v for k, v in bank.meta.items()
            if k in ("encoder", "encoder_backend", "dim", "chunking", "split")}


def subsample_train(bank: ConceptBank, fraction: float, seed: int = 0) -> ConceptBank:
    """The rows of every val and test document and of round(fraction * n) of the n training
    documents (at least one), drawn with seed; rows stay in input order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    doc_ids = np.asarray(bank.doc_ids)
    splits = np.asarray(bank.splits).astype(str)
    train_docs = list(dict.fromkeys(doc_ids[splits == "train"]))  # corpus order
    if not train_docs:
        raise ValueError("the bank has no training documents")
    n_keep = max(1, round(fraction * len(train_docs)))
    picked = np.random.default_rng(seed).choice(len(train_docs), size=n_keep, replace=False)
    keep = (splits != "train") | np.isin(doc_ids, [train_docs[i] for i in picked])
    meta = _kept_meta(bank)
    meta["corpus"] = {"source": "subsampled", "train_fraction": fraction, "seed": seed,
                      "train_documents": f"{n_keep} of {len(train_docs)}",
                      "of": bank.meta.get("corpus")}
    return ConceptBank(
        doc_ids=doc_ids[keep], positions=np.asarray(bank.positions)[keep],
        texts=np.asarray(bank.texts, dtype=object)[keep], vectors=bank.vectors[keep],
        splits=np.asarray(bank.splits, dtype=object)[keep],
        lanes=np.asarray(bank.lanes)[keep], meta=meta)


def with_reversed_train(bank: ConceptBank) -> ConceptBank:
    """The bank plus a reversed copy of each training document (id "rev:" + its id, its concepts
    last to first, positions 0..n-1 again), appended after every other row. The copies are
    training rows, so val and test windows never see them."""
    doc_ids = np.asarray(bank.doc_ids).astype(object)
    train = np.flatnonzero(np.asarray(bank.splits).astype(str) == "train")
    if not len(train):
        raise ValueError("the bank has no training documents")
    # One sort, no loop over documents: by document (in corpus order), then position descending.
    _, first, doc = np.unique(doc_ids[train], return_index=True, return_inverse=True)
    corpus_rank = np.argsort(np.argsort(first))  # each document's place in corpus order
    order = np.lexsort((-np.asarray(bank.positions)[train], corpus_rank[doc]))
    rev = train[order]
    sizes = np.bincount(corpus_rank[doc])  # rows per document, in corpus order
    pos = (np.arange(len(rev)) - np.repeat(np.cumsum(sizes) - sizes, sizes)).astype(np.int32)
    n_rev = np.array([f"rev:{d}" for d in doc_ids[rev]], dtype=object)
    meta = _kept_meta(bank)
    meta["corpus"] = {"source": "reversed_train",
                      "train_documents": f"{len(sizes)} + {len(sizes)} reversed",
                      "of": bank.meta.get("corpus")}

    def cat(a, b) -> np.ndarray:
        return np.concatenate([np.asarray(a, dtype=object), np.asarray(b, dtype=object)])

    return ConceptBank(
        doc_ids=cat(doc_ids, n_rev),
        positions=np.concatenate([np.asarray(bank.positions, dtype=np.int32), pos]),
        texts=cat(bank.texts, np.asarray(bank.texts, dtype=object)[rev]),
        vectors=np.concatenate([bank.vectors, bank.vectors[rev]]),
        splits=cat(bank.splits, np.full(len(rev), "train", dtype=object)),
        lanes=np.concatenate([np.asarray(bank.lanes), np.asarray(bank.lanes)[rev]]), meta=meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bank", help="the full bank")
    ap.add_argument("--fraction", type=float, default=1.0,
                    help="the share of training documents to keep, in (0, 1]")
    ap.add_argument("--reversed", action="store_true",
                    help="then add a reversed copy of each kept training document")
    ap.add_argument("--seed", type=int, default=0, help="which documents are drawn")
    ap.add_argument("--out", required=True, help="the new bank (one Parquet file)")
    args = ap.parse_args(argv)
    try:
        small = subsample_train(load_bank(args.bank), args.fraction, args.seed)
        if args.reversed:
            small = with_reversed_train(small)
    except ValueError as e:
        ap.error(str(e))
    out = save_bank(small, args.out)
    print(f"{out}: {len(small):,} concepts, {small.meta['corpus']['train_documents']} training "
          "documents; " + ", ".join(f"{s} {int((small.splits == s).sum()):,}"
                                    for s in ("train", "val", "test")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
