"""The data a run needs: the concept bank (ingested if needed) and its leakage-checked windows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lvm_ray.config import Config
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank, load_bank
from lvm_ray.data.coherence import coherence_gate
from lvm_ray.data.ingest import ingest
from lvm_ray.data.windows import WindowSet, check_split_disjoint, check_windows, make_windows
from lvm_ray.distributed.data import ingest_with_ray, read_bank_with_ray


def ensure_bank(cfg: Config, use_ray: bool = False) -> ConceptBank:
    """Load cfg.bank_path, ingesting the corpus first if needed (cached, resumable). With use_ray,
    ingest embeds through Ray Data actors and the bank is read with ray.data.read_parquet."""
    bank_path = Path(cfg.bank_path)
    if cfg.corpus.source == "bank":
        # Someone else's bank: checked (finite unit vectors, splits, document order) before use.
        corpus = dataclasses.replace(cfg.corpus, path=cfg.corpus.path or cfg.bank_path)
        bank_path = ingest(corpus, cfg.encoder, cfg.split, bank_path).bank_path
    elif use_ray and cfg.corpus.source != "synthetic":
        res = ingest_with_ray(cfg, bank_path)
        say(f"bank {bank_path}: {res.n_concepts} concepts from {res.n_docs} documents "
            f"({'reused' if res.reused else 'built'} with Ray Data)")
    else:
        res = ingest(cfg.corpus, cfg.encoder, cfg.split, bank_path)
        say(f"bank {bank_path}: {res.n_concepts} concepts from {res.n_docs} documents "
            f"({'reused' if res.reused else 'built'})")
    bank = read_bank_with_ray(bank_path) if use_ray else load_bank(bank_path)
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
    gated, gate = coherence_gate(bank.vectors, train, cfg.window)
    say(f"windows (policy={cfg.window.policy}, L={cfg.window.context}, "
        f"stride={cfg.window.stride}): train {len(train)}, val {len(val)}, "
        f"test {len(test)}; leakage check passed")
    if gate is not None:
        say(gate.line())
    return Windows(gated, val, test, train)
