"""Markdown and PNG reports carry the numbers the protocol requires beside every Hit@K."""

import numpy as np
import pytest

from lvm_ray.config import EvalConfig, WindowConfig
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import make_windows
from lvm_ray.eval import report
from lvm_ray.eval.baselines import ContextMean, CopyLast, evaluate_baselines
from lvm_ray.eval.metrics import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def small_results():
    rng = np.random.default_rng(0)
    lens = rng.integers(20, 40, 30)
    n = int(lens.sum())
    split_of = np.array(["train", "train", "train", "val", "test"], dtype=object)
    bank = ConceptBank(
        doc_ids=np.repeat(np.array([f"d{i}" for i in range(30)], dtype=object), lens),
        positions=np.concatenate([np.arange(k) for k in lens]).astype(np.int32),
        texts=np.array([""] * n, dtype=object),
        vectors=unit(rng.standard_normal((n, 32))),
        splits=np.repeat(split_of[np.arange(30) % 5], lens),
        lanes=np.full(n, -1, dtype=np.int16),
    )
    ws = make_windows(bank, "test", WindowConfig(context=8))
    cfg = EvalConfig(ks=(1, 5), pool_size=50, bootstrap=200)
    results = evaluate_baselines([CopyLast(), ContextMean(2)], bank, ws, cfg)
    model = unit(bank.vectors[ws.target_rows] + 0.5 * rng.standard_normal((len(ws), 32)))
    results["memory_gru"] = evaluate(model, ws, bank, cfg)
    return results


def test_markdown_report_prints_sizes_chance_and_cis():
    results = small_results()
    s = results["memory_gru"]
    md = report.markdown_report(results, "test split", {"split": "test", "context": 8})
    assert md.startswith("# test split")
    assert "- split: test" in md
    assert f"bank {s['bank_size']:,}" in md
    assert f"full pool {s['pool_size_full']:,}, chance {100 * 5 / s['n_windows']:.2f}%" in md
    assert "fixed pool 50, chance 10.00%" in md and "CA (chance 50%)" in md
    ci = f"{100 * s['bank_hit@5']:.2f}% [{100 * s['bank_hit@5_lo']:.2f}%, "
    assert ci in md
    for name in results:
        assert name in md
    best = report.best_baseline(results)
    assert best in ("copy-last", "context-mean(m=2)")
    assert f"**memory_gru** vs best baseline **{best}**" in md


def test_comparison_lines_say_whether_cis_overlap():
    base = {"bank_hit@5": 0.10, "bank_hit@5_lo": 0.08, "bank_hit@5_hi": 0.12,
            "ca": 0.60, "ca_lo": 0.58, "ca_hi": 0.62}
    weak = {"bank_hit@5": 0.05, "bank_hit@5_lo": 0.03, "bank_hit@5_hi": 0.07, "ca": 0.5}
    model = {"bank_hit@5": 0.30, "bank_hit@5_lo": 0.27, "bank_hit@5_hi": 0.33,
             "ca": 0.61, "ca_lo": 0.59, "ca_hi": 0.63}
    (line,) = report.comparison_lines({"ridge(m=1,lambda=1)": base, "copy-last": weak,
                                       "gru": model})
    assert "best baseline **ridge(m=1,lambda=1)**" in line
    assert "bank-Hit@5 30.00% vs 10.00% (+20.00 pts, 95% CIs do not overlap)" in line
    assert "CA 61.00% vs 60.00% (+1.00 pts, 95% CIs overlap)" in line


def test_model_and_baseline_differ_window_by_window_with_a_paired_ci():
    """Same windows: a model that finds everything the baseline finds plus 6% more windows is
    clearly ahead, though 400 windows give the two runs' own CIs an overlap."""
    from lvm_ray.eval.compare import add_paired_differences
    from lvm_ray.eval.metrics import bootstrap_cis

    rng = np.random.default_rng(1)
    base_hits = (rng.random(400) < 0.3).astype(float)
    extra = np.flatnonzero(base_hits == 0)[:24]
    model_hits = base_hits.copy()
    model_hits[extra] = 1.0
    ca_b, ca_m = rng.random(400), rng.random(400)
    ca_m[:5] = np.nan  # CA's empty pools: left out of the pairs
    per = {"gru": {"bank_hit@5": model_hits, "ca": ca_m},
           "copy-last": {"bank_hit@5": base_hits, "ca": ca_b},
           "ridge(m=1,lambda=1)": {"bank_hit@5": 0 * base_hits, "ca": ca_b}}
    results = {n: {"bank_hit@5": float(v["bank_hit@5"].mean())} for n, v in per.items()}
    add_paired_differences(results, per, bootstrap=500, seed=0)
    s = results["gru"]
    assert s["paired_baseline"] == "copy-last"
    assert s["paired_bank_hit@5"] == pytest.approx(24 / 400)
    assert 0 < s["paired_bank_hit@5_lo"] < 24 / 400 < s["paired_bank_hit@5_hi"]
    (m_lo, b_lo), (m_hi, b_hi) = bootstrap_cis(np.stack([model_hits, base_hits]), 500)
    assert m_lo < b_hi  # the separate CIs overlap
    assert s["paired_ca"] == pytest.approx(np.mean(ca_m[5:] - ca_b[5:]))
    assert "paired_baseline" not in results["copy-last"]
    line = report.comparison_lines(results)[0]
    assert f"(+6.00 pts, paired 95% CI [{100 * s['paired_bank_hit@5_lo']:+.2f}, " in line
    verdict = report.verdict(s | {"bank_hit@5_lo": m_lo, "bank_hit@5_hi": m_hi},
                             {"copy-last": {**results["copy-last"], "bank_hit@5_lo": b_lo,
                                            "bank_hit@5_hi": b_hi}}, "bank_hit@5")
    assert "NOT shown better" in verdict and "difference +6.00 pts, paired 95% CI [+" in verdict
    untouched = {n: dict(r) for n, r in results.items() if n != "gru"} | {"gru": {}}
    add_paired_differences(untouched, per, bootstrap=0, seed=0)  # no bootstrap: no CIs
    assert untouched["gru"] == {}


def test_pngs_are_written(tmp_path):
    results = small_results()
    out = report.plot_comparison(results, tmp_path / "cmp" / "comparison.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_bank_hit@5": 0.1 * e,
                "val_cosine": 0.5 + 0.01 * e, "val_bank_hit@5_lo": 0.0} for e in range(4)]
    curves = report.plot_training_curves(history, tmp_path / "curves.png", "val_bank_hit@5",
                                         {"copy-last": 0.15, "ridge(m=1,lambda=1)": 0.05})
    assert curves.read_bytes()[:8] == PNG_MAGIC and curves.stat().st_size > 5000


def test_training_curves_show_the_selection_metric_and_the_baselines_only(tmp_path,
                                                                        monkeypatch):
    drawn = {}

    def spy(fig, path):
        ax1, ax2 = fig.axes
        drawn["left"] = [(ln.get_label(), list(ln.get_ydata())) for ln in ax1.lines]
        drawn["right"] = [ln.get_label() for ln in ax2.lines]
        return path

    monkeypatch.setattr(report, "_save", spy)
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_bank_hit@5": h, "val_cosine": 0.5,
                "val_mrr": 0.2, "val_ca": 0.9} for e, h in enumerate([0.1, 0.3, 0.2])]
    report.plot_training_curves(history, tmp_path / "c.png", "val_bank_hit@5",
                                {"copy-last": 0.25})
    labels = [label for label, _ in drawn["left"]]
    assert labels == ["model", "best (epoch 1)", "copy-last"]  # no other val metric
    assert drawn["left"][0][1] == pytest.approx([10.0, 30.0, 20.0])
    assert drawn["left"][2][1] == pytest.approx([25.0, 25.0])  # a horizontal line at 25%
    assert drawn["right"] == ["train_loss"]


def test_verdict_says_whether_the_model_beats_the_best_baseline():
    def s(v, lo, hi):
        return {"bank_hit@5": v, "bank_hit@5_lo": lo, "bank_hit@5_hi": hi}

    bls = {"copy-last": s(0.20, 0.18, 0.22), "ridge": s(0.10, 0.08, 0.12)}
    assert "beats the best baseline" in report.verdict(s(0.30, 0.27, 0.33), bls, "bank_hit@5")
    tie = report.verdict(s(0.21, 0.19, 0.23), bls, "bank_hit@5")
    assert tie.startswith("verdict: NOT shown better") and "copy-last" in tie
    assert "NOT worth serving" in report.verdict(s(0.1, 0.08, 0.12), bls, "bank_hit@5")


def test_summary_table_prints_long_row_names_whole():
    from lvm_ray.eval.report import summary_table

    row = {"n_windows": 10, "bank_size": 20, "bank_hit@5": 0.5, "mrr": 0.3, "ca": 0.9,
           "cosine": 0.7, "margin": -0.1}
    name = "ridge(m=16,lambda=1000) @L=1000 on the test split"
    table = summary_table({"model": row, name: row})
    assert name in table
    lines = table.splitlines()
    assert len({len(line) for line in lines[1:]}) == 1  # columns stay aligned
