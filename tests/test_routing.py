"""The hybrid routing policy (Ray-free): threshold, canary fraction, guardrails, rollback and
re-arming."""

import random

import pytest

from harness.service import lane_doc
from lvm_ray.serve.config import RouterUserConfig
from lvm_ray.serve.routing import PHASE2, PHASE3, RoutingPolicy


def policy(**kw) -> RoutingPolicy:
    return RoutingPolicy(RouterUserConfig(**kw), rng=random.Random(0), clock=lambda: 123.0)


def test_threshold_splits_short_and_long():
    p = policy(threshold=500, canary_fraction=1.0)
    assert p.route(1).model == PHASE2
    assert (p.route(500).model, p.route(500).reason) == (PHASE2, "short")  # threshold inclusive
    assert p.route(501).model == PHASE3 and p.route(501).reason == "canary"
    assert p.state == "full"


def test_canary_fraction_is_respected():
    for frac in (0.05, 0.25, 0.5):
        p = policy(threshold=10, canary_fraction=frac)
        n = 20_000
        share = sum(p.route(11).model == PHASE3 for _ in range(n)) / n
        sd = (frac * (1 - frac) / n) ** 0.5
        assert abs(share - frac) < 4 * sd, (frac, share)
    p = policy(canary_fraction=0.0)
    assert {p.route(10_000).reason for _ in range(100)} == {"canary_skip"}
    assert p.state == "phase2_only"


def test_explicit_model_wins_and_unknown_is_an_error():
    p = policy(canary_fraction=0.0)
    assert p.route(3, "phase3").model == PHASE3
    assert p.route(3, "phase3").reason == "explicit"
    with pytest.raises(ValueError, match="unknown model 'phase9'"):
        p.route(3, "phase9")


def test_slow_phase3_rolls_back_after_min_samples():
    p = policy(threshold=500, canary_fraction=1.0, p95_limit_ms=10, min_samples=20, window=50)
    for _ in range(19):
        assert p.record(PHASE3, 50.0, ok=True) is None  # too few samples for a verdict
    rb = p.record(PHASE3, 50.0, ok=True)
    assert rb is not None and rb.reason == "p95" and rb.p95_ms == 50.0 and rb.at == 123.0
    assert p.state == "rolled_back"
    r = p.route(1000)
    assert (r.model, r.reason) == (PHASE2, "rolled_back")
    assert p.route(10).reason == "short"
    assert p.route(1000, "phase3").model == PHASE3  # explicit requests still reach Phase-3
    st = p.status()
    assert st["rolled_back"]["reason"] == "p95" and len(st["rollbacks"]) == 1
    assert st["decisions"]["phase2:rolled_back"] == 1


def test_p95_not_mean_decides():
    p = policy(canary_fraction=1.0, p95_limit_ms=10, min_samples=100, window=100)
    for i in range(100):  # 4% slow calls: P95 stays fast
        p.record(PHASE3, 100.0 if i % 25 == 0 else 1.0, ok=True)
    assert p.rolled_back is None and p.p95_ms() == pytest.approx(1.0)
    for _ in range(3):  # 7% slow: P95 is slow
        p.record(PHASE3, 100.0, ok=True)
    assert p.rolled_back is not None


def test_error_rate_rolls_back():
    p = policy(canary_fraction=0.5, error_rate_limit=0.01, min_samples=50, window=200)
    for _ in range(60):
        assert p.record(PHASE3, 1.0, ok=True) is None
    assert p.record(PHASE3, 1.0, ok=False).reason == "error_rate"  # 1/61 > 1%


def test_phase2_outcomes_do_not_count():
    p = policy(min_samples=1, window=1)
    assert p.record(PHASE2, 1e6, ok=False) is None and p.rolled_back is None


def test_rollback_is_sticky_until_rearmed():
    p = policy(canary_fraction=0.1, min_samples=1, window=1, p95_limit_ms=5)
    p.record(PHASE3, 50.0, ok=True)
    assert p.state == "rolled_back"
    # A new limit alone does not re-arm: the operator has not started a new rollout.
    p.configure(RouterUserConfig(canary_fraction=0.1, min_samples=1, window=1, p95_limit_ms=500))
    assert p.state == "rolled_back"
    p.configure(RouterUserConfig(canary_fraction=0.25, min_samples=1, window=1, p95_limit_ms=500))
    assert p.state == "canary"
    p.record(PHASE3, 600.0, ok=True)
    assert p.state == "rolled_back"
    p.configure(RouterUserConfig(canary_fraction=0.25, min_samples=1, window=1, p95_limit_ms=500,
                              rollout_id="retry-1"))
    assert p.state == "canary" and len(p.status()["rollbacks"]) == 2


def test_live_threshold_change():
    p = policy(threshold=500, canary_fraction=1.0)
    assert p.route(600).model == PHASE3
    p.configure(RouterUserConfig(threshold=800, canary_fraction=1.0))
    assert p.route(600).model == PHASE2


@pytest.mark.parametrize("kw", [{"canary_fraction": 1.5}, {"threshold": -1}, {"window": 0},
                                {"min_samples": 10, "window": 5}, {"p95_limit_ms": 0}])
def test_bad_config_is_rejected(kw):
    with pytest.raises(ValueError):
        RouterUserConfig(**kw)


# ----------------------------------------------------------------------------- lane rule


def test_failing_lane_report_blocks_the_canary():
    from lvm_ray.serve.routing import lane_failure, lane_summary

    lanes = lane_summary(lane_doc(0.05))
    assert lanes["canary_ok"] is False and "baselines" not in lanes
    p = policy(threshold=10, canary_fraction=1.0)
    p.set_canary_lanes(lanes)
    assert p.canary_blocked.startswith("phase3 fails the lane rule: lane 3 Hit@5 0.0")
    assert f"< threshold {lanes['threshold']:.3f}" in p.canary_blocked
    assert "lane 0" not in lane_failure(lanes)
    assert {p.route(11).reason for _ in range(50)} == {"canary_blocked"}
    assert p.route(11).model == PHASE2 and p.state == "canary_blocked"
    assert p.route(11, "phase3").model == PHASE3  # explicit requests still reach Phase-3
    assert p.status()["canary_blocked"] == p.canary_blocked
    p.configure(RouterUserConfig(threshold=10, canary_fraction=0.0))  # no rollout: nothing to block
    assert p.route(11).reason == "canary_skip" and p.state == "phase2_only"
    # The override: canary traffic flows again, and the failure is still shown.
    p.configure(RouterUserConfig(threshold=10, canary_fraction=1.0, enforce_lane_rule=False))
    assert p.canary_blocked is None and p.route(11).reason == "canary"
    assert p.status()["lane_rule"] == {"enforced": False, "phase3_report_read": True,
                                       "phase3_failure": lane_failure(lanes)}


def test_passing_or_missing_lane_report_does_not_block():
    from lvm_ray.serve.routing import lane_summary

    passing = lane_summary(lane_doc(0.5))
    assert passing["canary_ok"] is True
    for lanes in (passing, None):  # None: no lanes.json, nothing to check
        p = policy(threshold=10, canary_fraction=1.0)
        p.set_canary_lanes(lanes)
        assert p.canary_blocked is None and p.route(11).reason == "canary"
        assert p.status()["lane_rule"]["phase3_failure"] is None


def test_default_threshold_routes_nothing_long():
    """The measured default (docs/serve.md): Phase-3 never beat Phase-2 on val, so no context
    up to max_context_vectors counts as long; explicit requests still reach Phase-3."""
    p = policy(canary_fraction=1.0)
    assert p.cfg.threshold == p.cfg.max_context_vectors
    assert p.route(p.cfg.max_context_vectors).reason == "short"
    assert p.route(1000, "phase3").model == PHASE3
