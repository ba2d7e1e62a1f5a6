"""The hybrid routing policy: which model answers a context, canary rollout and automatic rollback.

Plain Python (no Ray), held by the Serve router; every router replica has its own instance and
decides on what it observes itself.

Settings are the Router's user_config (lvm_ray.serve.config.RouterUserConfig), applied live:

- Contexts of up to `threshold` vectors go to Phase-2 (trained on 500-vector contexts).
- Longer ones go to Phase-3 (trained on 1000), but only a `canary_fraction` of them while it is
  being rolled out (the design's 5% -> 10% -> 25% -> 50% -> 100%); the rest stay on Phase-2.
- Guardrail: over the last `window` Phase-3 calls (at least `min_samples`), a P95 latency above
  `p95_limit_ms` or an error rate above `error_rate_limit` rolls back: every routed request goes
  to Phase-2 until an operator re-arms the rollout by changing `canary_fraction` or `rollout_id`
  in the router's user_config.
- Lane rule (the design's canary rule, lvm_ray.eval.lanes): when Phase-3's lanes.json says some
  lane's Hit@5 sits more than 20% below the mean over lanes, no canary traffic goes to it (route
  `canary_blocked`) while `enforce_lane_rule` is on. A checkpoint without lanes.json is not
  blocked: there is nothing to check, and the status says so.
- A request or session that names its model explicitly is served by that model (no rollout).
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from lvm_ray.serve.config import RouterUserConfig

PHASE2, PHASE3 = "phase2", "phase3"
MODELS = (PHASE2, PHASE3)


@dataclass(frozen=True)
class Route:
    model: str
    reason: str  # short | canary | canary_skip | rolled_back | canary_blocked | explicit


@dataclass(frozen=True)
class Rollback:
    at: float  # unix seconds
    reason: str  # "p95" or "error_rate"
    p95_ms: float
    error_rate: float
    samples: int


LANE_KEYS = ("k", "split", "source", "rule", "lanes", "average", "threshold", "canary_ok",
             "canary_confident_fail", "overall")


def lane_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """What Serve shows of a lanes.json (lvm_ray.eval.lanes.lane_report): the model's per-lane
    Hit@k rows {lane, n, hit, lo, hi, below_threshold}, average, threshold, verdict, source and
    rule; the baselines and lane labels stay in the file."""
    if report is None:
        return None
    return {key: report.get(key) for key in LANE_KEYS}


def lane_failure(lanes: dict[str, Any] | None) -> str | None:
    """Why a lane summary fails the canary rule, or None when it passes or is absent. Only an
    explicit canary_ok false fails: a missing verdict is not invented."""
    if lanes is None or lanes.get("canary_ok") is not False:
        return None
    k, thr = lanes.get("k", 5), lanes.get("threshold")
    below = [r for r in lanes.get("lanes") or [] if r.get("below_threshold")]
    if not below or thr is None:
        return "lanes.json says canary_ok false"
    parts = []
    for r in sorted(below, key=lambda r: r["hit"]):
        ci = f" [{r['lo']:.3f}, {r['hi']:.3f}]" if r.get("lo") is not None else ""
        parts.append(f"lane {r['lane']} Hit@{k} {r['hit']:.3f}{ci} < threshold {thr:.3f}")
    avg = lanes.get("average")
    return "; ".join(parts) + (f" (mean over lanes {avg:.3f})" if avg is not None else "")


class RoutingPolicy:
    def __init__(self, cfg: RouterUserConfig = RouterUserConfig(), rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self._rng = rng or random.Random()
        self._clock = clock
        self._samples: deque[tuple[float, bool]] = deque(maxlen=cfg.window)  # (latency ms, ok)
        self.rolled_back: Rollback | None = None
        self.history: deque[Rollback] = deque(maxlen=20)
        self.decisions: dict[str, int] = {}
        self.phase3_lane_failure: str | None = None  # from Phase-3's lanes.json
        self.lanes_read = False  # whether Phase-3's lanes.json (or its absence) was read

    def set_canary_lanes(self, lanes: dict[str, Any] | None) -> None:
        """Phase-3's lane summary (None: its checkpoint has no lanes.json)."""
        self.phase3_lane_failure = lane_failure(lanes)
        self.lanes_read = True

    @property
    def canary_blocked(self) -> str | None:
        """Why canary traffic is held back by the lane rule, or None."""
        if self.phase3_lane_failure is None or not self.cfg.enforce_lane_rule:
            return None
        return f"phase3 fails the lane rule: {self.phase3_lane_failure}"

    def configure(self, cfg: RouterUserConfig) -> None:
        """Apply a new config live; a changed rollout (fraction or id) re-arms after a rollback."""
        if (cfg.canary_fraction, cfg.rollout_id) != (self.cfg.canary_fraction, self.cfg.rollout_id):
            self.rolled_back = None
            self._samples.clear()
        if cfg.window != self.cfg.window:
            self._samples = deque(self._samples, maxlen=cfg.window)
        self.cfg = cfg

    @property
    def state(self) -> str:
        if self.rolled_back is not None:
            return "rolled_back"
        f = self.cfg.canary_fraction
        if f > 0.0 and self.canary_blocked is not None:
            return "canary_blocked"
        return "phase2_only" if f == 0.0 else "full" if f == 1.0 else "canary"

    def route(self, n_vectors: int, explicit: str | None = None) -> Route:
        if explicit is not None:
            if explicit not in MODELS:
                raise ValueError(f"unknown model {explicit!r}; choose one of {', '.join(MODELS)} "
                                 "or leave it out to let the router decide")
            r = Route(explicit, "explicit")
        elif n_vectors <= self.cfg.threshold:
            r = Route(PHASE2, "short")
        elif self.rolled_back is not None:
            r = Route(PHASE2, "rolled_back")
        elif self.cfg.canary_fraction > 0.0 and self.canary_blocked is not None:
            r = Route(PHASE2, "canary_blocked")
        elif self._rng.random() < self.cfg.canary_fraction:
            r = Route(PHASE3, "canary")
        else:
            r = Route(PHASE2, "canary_skip")
        key = f"{r.model}:{r.reason}"
        self.decisions[key] = self.decisions.get(key, 0) + 1
        return r

    def record(self, model: str, latency_ms: float, ok: bool) -> Rollback | None:
        """Feed one Phase-3 outcome (server errors only, never the client's bad input); return the
        Rollback if this one tripped the guardrail."""
        if model != PHASE3:
            return None
        self._samples.append((float(latency_ms), bool(ok)))
        if self.rolled_back is not None or len(self._samples) < self.cfg.min_samples:
            return None
        p95, err = self.p95_ms(), self.error_rate()
        reason = ("p95" if p95 > self.cfg.p95_limit_ms
                  else "error_rate" if err > self.cfg.error_rate_limit else None)
        if reason is None:
            return None
        self.rolled_back = Rollback(self._clock(), reason, p95, err, len(self._samples))
        self.history.append(self.rolled_back)
        self._samples.clear()
        return self.rolled_back

    def p95_ms(self) -> float:
        if not self._samples:
            return 0.0
        return float(np.percentile([s[0] for s in self._samples], 95))

    def error_rate(self) -> float:
        if not self._samples:
            return 0.0
        return sum(not ok for _, ok in self._samples) / len(self._samples)

    def status(self) -> dict:
        return {
            "state": self.state,
            "config": asdict(self.cfg),
            "phase3_window": {"samples": len(self._samples), "p95_ms": self.p95_ms(),
                              "error_rate": self.error_rate()},
            "rolled_back": asdict(self.rolled_back) if self.rolled_back else None,
            "rollbacks": [asdict(r) for r in self.history],
            "decisions": dict(self.decisions),
            "canary_blocked": self.canary_blocked,
            "lane_rule": {"enforced": self.cfg.enforce_lane_rule,
                          "phase3_report_read": self.lanes_read,
                          "phase3_failure": self.phase3_lane_failure},
        }
