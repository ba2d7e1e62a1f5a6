"""Markdown and PNG reports carry the numbers the protocol requires beside every Hit@K."""

import numpy as np

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


def test_pngs_are_written(tmp_path):
    results = small_results()
    out = report.plot_comparison(results, tmp_path / "cmp" / "comparison.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_bank_hit@5": 0.1 * e,
                "val_cosine": 0.5 + 0.01 * e, "val_bank_hit@5_lo": 0.0} for e in range(4)]
    curves = report.plot_training_curves(history, tmp_path / "curves.png")
    assert curves.read_bytes()[:8] == PNG_MAGIC and curves.stat().st_size > 5000
    assert report._curve_keys(history) == ["val_bank_hit@5", "val_cosine"]
