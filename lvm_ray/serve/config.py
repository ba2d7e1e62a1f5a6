"""What the Serve app is told: its `args` (paths) and the live `user_config` of each deployment.

Typed the same way as every lvm_ray config (frozen dataclasses, unknown keys are errors, values
checked in __post_init__), so `from_dict(RouterUserConfig, user_config)` in `reconfigure` refuses
a bad config with a message that names the key. Each field is declared once: the routing policy
(lvm_ray.serve.routing) reads its fields straight from RouterUserConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lvm_ray.config import require


@dataclass(frozen=True)
class ServedBankArgs:
    """What every app that serves a model reads: the bank, its index and the session key."""

    bank: str = "data/sotu_demo_bank.parquet"
    # HMAC key of session tokens; LVM_SESSION_KEY in the replicas' environment wins. Without
    # either, each deploy makes a new key and earlier sessions stop verifying.
    session_key: str | None = None
    device: str = "cpu"
    # A checkpoint is served only with the bank it was trained on (its recorded identity);
    # true serves the pair anyway, and /v1/models then lists the differences.
    allow_bank_mismatch: bool = False
    # The kNN index the model deployments search: a FAISS index_factory string whose files
    # `lvm index` wrote beside the bank (lvm_ray.data.index). Every replica memory-maps them, so
    # replicas on a node share one copy. "Flat" is exact; "HNSW32" or "IVF4096,Flat" for millions.
    index: str = "Flat"
    # Build the index files (once, before any replica starts) when missing or built for another
    # bank; false refuses to start instead (large indexes: build them with `lvm index` first).
    build_index: bool = True

    def __post_init__(self) -> None:
        require(bool(self.index.strip()), "index must be a FAISS index_factory string")


@dataclass(frozen=True)
class AppArgs(ServedBankArgs):
    """`args` of the app (serve config or `serve run ... key=value`)."""

    phase2_checkpoint: str = "runs/demo/phase2/best"
    phase3_checkpoint: str = "runs/demo/phase3/best"
    # A local sentence-transformers directory, when the bank's encoder is not one lvm_ray knows.
    encoder: str | None = None
    # None: the models are deployments of this app (every request goes through the router).
    # "<prefix>": each model is its own application "<prefix>phase2" / "<prefix>phase3" (route
    # prefix /<its name>, built by lvm_ray.serve.app:build_model_app) whose ingress also serves
    # its sessions' appends, so appends skip the router. Needs a shared session key.
    model_apps: str | None = None


@dataclass(frozen=True)
class ModelAppArgs(ServedBankArgs):
    """`args` of one model's own application (lvm_ray.serve.app:build_model_app); its
    session_key must be the router app's (or LVM_SESSION_KEY)."""

    model: Literal["phase2", "phase3"] = "phase2"
    checkpoint: str = "runs/demo/phase2/best"


@dataclass(frozen=True)
class RequestLimits:
    """Caps on one request, wherever a request is parsed: the Router, and each model
    deployment's own session-append endpoint (so both are set in their user_config)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_context_vectors: int = 4096
    max_k: int = 50
    # Text input costs encoder time per character: 1,000 texts or one 1 MB text take seconds.
    max_text_chars: int = 100_000
    session_ttl_s: float = 3600.0

    def __post_init__(self) -> None:
        # A cap cannot be switched off by a tiny value.
        require(self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024")
        require(min(self.max_context_vectors, self.max_k, self.max_text_chars) >= 1,
                "max_context_vectors, max_k and max_text_chars must be >= 1")
        require(self.session_ttl_s > 0, "session_ttl_s must be > 0")


@dataclass(frozen=True)
class ModelUserConfig(RequestLimits):
    """user_config of Phase2Model / Phase3Model, applied live by reconfigure()."""

    max_batch_size: int = 16  # 1 = no batching
    # 0 = no waiting: a batch is whatever queued while the previous one ran.
    batch_wait_timeout_s: float = 0.0
    # Session appends (up to 8 new vectors) through the fused, traced step
    # (lvm_ray.model.fused_step) at int8 or fp32; "eager" = the model's own forward. int8 is
    # >= 1.5x faster than the eager step at every shipped size for < 0.2 point of bank-Hit@5
    # (BENCHMARKS.md, section quant). CPU only: on a GPU appends stay eager.
    append_step: Literal["int8", "fp32", "eager"] = "int8"
    # Search parameters of the index (args.index), applied live; None keeps FAISS's default.
    nprobe: int | None = None  # IVF indexes: inverted lists visited per query
    ef_search: int | None = None  # HNSW indexes: candidate list size per query

    def __post_init__(self) -> None:
        super().__post_init__()
        require(1 <= self.max_batch_size <= 256, "max_batch_size must be in [1, 256]")
        require(0.0 <= self.batch_wait_timeout_s <= 1.0, "batch_wait_timeout_s must be in [0, 1]")
        require(self.append_step in ("int8", "fp32", "eager"),
                f"append_step must be int8, fp32 or eager, got {self.append_step!r}")
        require(all(v is None or v >= 1 for v in (self.nprobe, self.ef_search)),
                "nprobe and ef_search must be >= 1 (or null)")


@dataclass(frozen=True)
class RouterUserConfig(RequestLimits):
    """user_config of the Router, applied live by reconfigure(): the routing policy's settings
    (lvm_ray.serve.routing explains them) and the request limits (RequestLimits)."""

    # Contexts longer than this are "long" (Phase-3 candidates). From the context curve
    # (docs/serve.md): Phase-3 (L=1000) never measurably beat Phase-2 (L=500) on val at any
    # length, so by default no context is long (4096 = max_context_vectors).
    threshold: int = 4096
    canary_fraction: float = 0.05  # share of long contexts sent to Phase-3 (0..1)
    p95_limit_ms: float = 10.0  # Phase-3 rolling P95 latency above this rolls back
    error_rate_limit: float = 0.001  # Phase-3 rolling error rate above this rolls back
    window: int = 200  # Phase-3 calls the guardrail looks at
    min_samples: int = 20  # no verdict on fewer calls
    rollout_id: str = ""  # a new value re-arms the rollout after a rollback
    # The design's lane rule blocks canary traffic to a Phase-3 whose lanes.json fails it;
    # false lets it through anyway (the status still shows the failure).
    enforce_lane_rule: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.threshold >= 0, f"threshold must be >= 0, got {self.threshold}")
        require(0.0 <= self.canary_fraction <= 1.0,
                f"canary_fraction must be in [0, 1], got {self.canary_fraction}")
        require(self.p95_limit_ms > 0 and 0.0 <= self.error_rate_limit <= 1.0,
                "p95_limit_ms must be > 0 and error_rate_limit in [0, 1]")
        require(self.window >= 1 and 1 <= self.min_samples <= self.window,
                "need window >= 1 and 1 <= min_samples <= window")
