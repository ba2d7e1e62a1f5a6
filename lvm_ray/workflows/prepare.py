"""The data a run needs: the concept bank (ingested if needed) and its leakage-checked windows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lvm_ray.config import Config
from lvm_ray.console import say
from lvm_ray.data.bank import BankError, ConceptBank, load_bank
from lvm_ray.data.coherence import coherence_gate
from lvm_ray.data.ingest import ingest
from lvm_ray.data.windows import (WindowSet, check_split_disjoint, check_windows, make_windows,
                                  short_documents)
from lvm_ray.data.shards import dry_run, ingest_sharded
from lvm_ray.distributed.data import ingest_with_ray


def ensure_bank(cfg: Config, use_ray: bool = False, overwrite: bool = False,
                lean: bool = True) -> ConceptBank:
    """Load cfg.bank_path, ingesting the corpus first if needed (cached, resumable). With use_ray,
    ingest writes a sharded bank through Ray Data (lvm_ray.distributed.data), as does a local
    ingest whose bank_path is a directory. A bank at bank_path built from other settings is
    refused, never replaced, unless overwrite (ingest.reuse_existing). The bank comes back lean
    (numeric arrays, texts read on demand: what training and evaluation need) unless lean=False."""
    bank_path = Path(cfg.bank_path)
    if cfg.corpus.source == "bank":
        # Someone else's bank: checked (finite unit vectors, splits, document order) before use.
        corpus = dataclasses.replace(cfg.corpus, path=cfg.corpus.path or cfg.bank_path)
        bank_path = ingest(corpus, cfg.encoder, cfg.split, bank_path).bank_path
    elif use_ray and cfg.corpus.source != "synthetic":
        res = ingest_with_ray(cfg, bank_path, overwrite=overwrite)
        say(f"bank {bank_path}: {res.n_concepts} concepts from {res.n_docs} documents "
            f"({'reused' if res.reused else 'built'} with Ray Data)")
    elif bank_path.is_dir() and cfg.corpus.source != "synthetic":
        res = ingest_sharded(cfg.corpus, cfg.encoder, cfg.split, bank_path, overwrite=overwrite)
        say(f"bank {bank_path}: {res.n_concepts} concepts from {res.n_docs} documents "
            f"({'reused' if res.reused else 'built'}, sharded)")
    else:
        res = ingest(cfg.corpus, cfg.encoder, cfg.split, bank_path, overwrite=overwrite)
        say(f"bank {bank_path}: {res.n_concepts} concepts from {res.n_docs} documents "
            f"({'reused' if res.reused else 'built'})")
    bank = load_bank(bank_path, lean=lean)
    check_split_disjoint(bank)
    return bank


def say_short_documents(cfg: Config, bank: ConceptBank) -> None:
    docs, concepts = short_documents(bank, cfg.window)
    if docs:
        say(f"{docs} document(s), {concepts} concept(s) in all, have at most "
            f"window.min_context={cfg.window.min_context} concepts: they give no window and take "
            "no part in training or evaluation")


def ingest_dry_run(cfg: Config, use_ray: bool = False) -> dict:
    """`lvm ingest --dry-run`: what the ingest would encode and about how long it would take
    (encoders: the CPUs Ray would use, up to 8, with --ray; one otherwise). Writes nothing."""
    import os

    sharded = use_ray or Path(cfg.bank_path).is_dir()
    encoders = max(1, min(os.cpu_count() or 1, 8)) if use_ray else 1
    out = dry_run(cfg.corpus, cfg.encoder, cfg.split, cfg.bank_path, sharded, encoders)
    out["summary"] = (
        f"ingest {cfg.bank_path}: {out['documents']} documents, {out['chunks']} chunks; "
        f"{out['chunks_to_encode']} to encode with {out['encoder']} "
        f"({out['chunks_already_encoded']} already encoded): about "
        f"{out['estimated_encode_s']:.0f} s on {encoders} encoder(s)"
        + (f" (measured {out['chunks_per_s_per_encoder']} chunks/s each, plus "
           f"{out['encoder_load_s']} s to load the encoder)" if "encoder_load_s" in out else "")
        + (f". It would be refused: {out['refused']}" if "refused" in out else ""))
    return out


def read_bank(cfg: Config) -> ConceptBank:
    """The bank at cfg.bank_path as it is (checked when corpus.source is 'bank'); never ingests.
    For commands that use an existing bank: evaluate."""
    path = Path(cfg.corpus.path if cfg.corpus.source == "bank" and cfg.corpus.path
                else cfg.bank_path)
    if cfg.corpus.source == "bank":
        ingest(dataclasses.replace(cfg.corpus, path=str(path)), cfg.encoder, cfg.split, path)
    elif not path.exists():
        raise BankError(f"concept bank {path} not found; build it with `lvm ingest` or point to "
                        "another with --bank PATH")
    bank = load_bank(path, lean=True)
    check_split_disjoint(bank)
    return bank


@dataclass
class Windows:
    train: WindowSet  # what the model trains on: after the coherence gate, if one is set
    val: WindowSet
    test: WindowSet
    # Every training window, before the gate: the baselines fit on these, so a gated run is
    # compared with the same baselines as an ungated one.
    train_all: WindowSet | None = None

    @property
    def baseline_train(self) -> WindowSet:
        return self.train if self.train_all is None else self.train_all


def prepare_windows(cfg: Config, bank: ConceptBank) -> Windows:
    """Cut and leakage-check the windows of every split; gate the training windows."""
    train, val, test = (make_windows(bank, s, cfg.window) for s in ("train", "val", "test"))
    for w in (train, val, test):
        check_windows(bank, w)
    say_short_documents(cfg, bank)
    gated, gate = coherence_gate(bank.vectors, train, cfg.window)
    say(f"windows (policy={cfg.window.policy}, L={cfg.window.context}, "
        f"stride={cfg.window.stride}): train {len(train)}, val {len(val)}, "
        f"test {len(test)}; leakage check passed")
    if gate is not None:
        say(gate.line())
    return Windows(gated, val, test, train)
