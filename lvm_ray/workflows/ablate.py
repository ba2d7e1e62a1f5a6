"""The ablation table: each row is the base config with one change, trained, selected on val and
evaluated on test beside the baselines on the same windows. Every row keeps its checkpoint and
prints the `lvm train` command that reproduces it.

    lvm ablate --config configs/ablations/base.yaml                 # every row, plain loop
    lvm ablate --config configs/ablations/base.yaml --rows base,gru  # some rows
    lvm ablate --smoke-test                                          # seconds, synthetic

Rows whose results already exist under the output directory are reused (pass --force to retrain),
so an interrupted table resumes where it stopped; the table lists every row saved under the
output directory on the same bank, so `--rows wide` later adds a line instead of replacing it.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lvm_ray.config import Config, deep_update, merge, to_dict
from lvm_ray.console import say
from lvm_ray.eval.report import best_baseline, is_baseline
from lvm_ray.workflows.train import train_and_evaluate


@dataclass(frozen=True)
class Row:
    name: str
    change: str  # what differs from the base, in words
    overrides: dict[str, Any] = field(default_factory=dict)


# val5k's early stopping (docs/results.md 10.10), shared by the rows trained to their plateau.
_VAL5K = {"max_eval_windows": 5000, "patience": 8}
# The wide rows' training: 2x the base's windows per epoch, stopped on 5,000 val windows.
_WIDE_TRAIN = {"max_train_windows": 2048, "max_epochs": 16, "max_eval_windows": 5000,
               "patience": 4}
# The causal Transformer at about the MemoryGRU's parameter count.
_TRANSFORMER = {"kind": "transformer", "hidden": 192, "layers": 2, "heads": 4}

ROWS: tuple[Row, ...] = (
    Row("base", "base config (see configs/ablations/base.yaml)"),
    Row("gru", "plain GRU, same hidden size and layers, no memory", {"model": {"kind": "gru"}}),
    Row("slots0", "MemoryGRU with 0 memory slots", {"model": {"slots": 0}}),
    Row("slots16", "16 memory slots", {"model": {"slots": 16}}),
    Row("slots2048", "2048 memory slots (the paper's large bank)", {"model": {"slots": 2048}}),
    Row("no_delta", "delta mode off: prediction = l2(head(state))", {"model": {"delta": False}}),
    Row("anchor_last", "delta added to the last vector, not the decayed context sum",
        {"model": {"anchor": "last"}}),
    Row("infonce_off", "InfoNCE off: MSE + 0.5 cosine only (the seed's loss without InfoNCE)",
        {"loss": {"negatives": "none", "w_mse": 1.0, "w_cos": 0.5}}),
    Row("neg_local", "InfoNCE with local negatives (this micro-batch's targets)",
        {"loss": {"negatives": "local"}}),
    Row("neg_gathered", "InfoNCE with gathered negatives (the whole global batch's targets)",
        {"loss": {"negatives": "gathered"}}),
    Row("objective_last", "one target per window instead of every step",
        {"train": {"objective": "last"}}),
    Row("ctx500", "context 500", {"window": {"context": 500}}),
    Row("ctx1000", "context 1000", {"window": {"context": 1000}}),
    Row("transformer", "causal Transformer (2 pre-LN blocks, 4 heads, rotary positions; "
        "hidden 192, about the GRU's parameter count)",
        {"model": _TRANSFORMER}),
    Row("transformer_ctx1000", "causal Transformer as above, context 1000",
        {"model": _TRANSFORMER, "window": {"context": 1000}}),
    Row("stream", "stream windows (cross documents inside a split)",
        {"window": {"policy": "stream"}}),
    Row("longer", "longer training: 4x the windows per epoch, up to 12 epochs",
        {"train": {"max_train_windows": 4096, "max_epochs": 12}}),
    Row("longer_reg", "longer training, regularised: dropout 0.2, weight decay 0.01, lr 5e-4",
        {"train": {"max_train_windows": 4096, "max_epochs": 12, "lr": 5e-4,
                   "weight_decay": 0.01}, "model": {"dropout": 0.2}}),
    # Issue 16: the coherence gate (training windows only), lane experts, and the base at the
    # experts' parameter count (hidden 308: 1.374M, soft experts 1.374M, hard 1.370M).
    Row("gate0", "coherence gate at the design's 0.0 (training windows only)",
        {"window": {"min_coherence": 0.0}}),
    Row("gate_keep75", "coherence gate keeping 75% of training windows (their 0.25-quantile)",
        {"window": {"min_coherence_quantile": 0.25}}),
    Row("gate_keep50", "coherence gate keeping 50% of training windows (their median)",
        {"window": {"min_coherence_quantile": 0.5}}),
    Row("experts_hard", "16 lane expert heads (width 64), hard routing by the last concept's lane",
        {"model": {"experts": "hard"}}),
    Row("experts_soft", "16 lane expert heads (width 64), a learned soft gate over the lanes",
        {"model": {"experts": "soft"}}),
    Row("base_matched", "base at the lane-expert rows' parameter count (hidden 308)",
        {"model": {"hidden": 308}}),
    # Issue 13: harder negatives, the concepts that follow the target in its own document.
    Row("hard_neg16", "InfoNCE also against the 16 concepts after each target in its document",
        {"loss": {"hard_negatives": 16}}),
    # 1,000 val windows give a +-2-point CI: early stopping then picks among epochs by noise.
    Row("val5k", "early stopping on 5,000 val windows instead of 1,000, patience 8",
        {"train": _VAL5K}),
    # The first lever: the transformer rows above stopped at a 3-epoch budget; this one
    # trains to its plateau, stopped as val5k is.
    Row("transformer_val5k", "causal Transformer as `transformer`, up to 16 epochs, val5k's "
        "early stopping (patience 4)",
        {"model": _TRANSFORMER, "train": {**_VAL5K, "max_epochs": 16, "patience": 4}}),
    # val5k showed a plateau, not overfitting: the next lever is capacity with more windows.
    Row("wide", "capacity: hidden 512, 2x the windows per epoch, val5k's early stopping",
        {"model": {"hidden": 512}, "train": _WIDE_TRAIN}),
    # wide overfits after two epochs: the regularisers on the same capacity.
    Row("wide_reg", "wide, regularised: dropout 0.3, weight decay 0.05",
        {"model": {"hidden": 512, "dropout": 0.3},
         "train": {**_WIDE_TRAIN, "weight_decay": 0.05}}),
    # The sotu sweep of docs/results.md 10.14: temperature 0.03 cut at epoch 2 by ASHA with a
    # margin 0.1 higher than the base's; trained as val5k is, to see whether ranking holds.
    *(Row(f"temp{round(t * 100):03d}", f"InfoNCE temperature {t} instead of 0.05, val5k's early "
          "stopping", {"loss": {"temperature": t}, "train": _VAL5K}) for t in (0.03, 0.02, 0.01)),
    # Bank-Hit@5 ranks against the whole bank: 4x the sampled negatives per step brings the
    # InfoNCE softmax closer to that ranking (the train bank holds 61,648 sotu concepts).
    Row("neg16k", "16,384 sampled bank negatives instead of 4,096, val5k's early stopping",
        {"loss": {"bank_negatives": 16384}, "train": _VAL5K}),
    # Dropout and weight decay leave wide's peak at epoch 1: noise on the inputs instead, so
    # that no training window is seen twice exactly (std 0.025: cosine ~0.9 to the clean one).
    Row("wide_noise", "wide, context vectors noised in training (std 0.025 per dimension)",
        {"model": {"hidden": 512}, "train": {**_WIDE_TRAIN, "context_noise": 0.025}}),
    # Do the single levers stack? The longest context (ctx1000) with neg16k's negatives and
    # stopping: the two rows with the highest test scores of a MemoryGRU on sotu.
    Row("stacked", "context 1000 + 16,384 bank negatives + val5k's early stopping",
        {"window": {"context": 1000}, "loss": {"bank_negatives": 16384}, "train": _VAL5K}),
    # Polyak averaging: val5k's plateau scored and saved as a moving average of the weights.
    Row("ema", "val5k, evaluated and saved as an exponential moving average of the weights "
        "(decay 0.9 per optimiser step)", {"train": {**_VAL5K, "ema": 0.9}}),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def _yaml_scalar(v: Any) -> str:
    # JSON scalars are valid YAML; a string that YAML reads back unchanged stays bare.
    return v if isinstance(v, str) and yaml.safe_load(v) == v else json.dumps(v)


def row_overrides(row: Row, out_dir: str | Path) -> dict[str, Any]:
    over: dict[str, Any] = json.loads(json.dumps(row.overrides))
    deep_update(over, {"run": {"name": row.name, "storage_path": str(out_dir)}})
    return over


def check_no_conflict(row: Row, out_dir: str | Path, extra: dict[str, Any] | None) -> None:
    """A row's own change wins over --set; a --set of the same key to another value would be
    silently ignored, so it is refused before anything trains."""
    ours = dict(_flatten(row_overrides(row, out_dir)))
    clash = [f"{k}={v!r} (row {row.name}: {ours[k]!r})" for k, v in _flatten(extra or {})
             if k in ours and ours[k] != v]
    if clash:
        raise ValueError("--set conflicts with what the row changes: " + "; ".join(clash)
                         + ". A row's change cannot be overridden (the output folder is --out); "
                         "run `lvm train --local` with the row's command and your --set instead")


def row_config(base: Config, row: Row, out_dir: str | Path) -> Config:
    return merge(base, row_overrides(row, out_dir))


def row_command(row: Row, out_dir: str | Path, config_path: str | None,
                presets: list[str] | tuple[str, ...] = (), extra: dict[str, Any] | None = None
                ) -> str:
    """The `lvm train --local` command that trains exactly this row's checkpoint."""
    parts = ["lvm", "train", "--local"]
    for p in presets:
        parts += ["--preset", p]
    if config_path:
        parts += ["--config", config_path]
    over: dict[str, Any] = json.loads(json.dumps(extra or {}))
    deep_update(over, row_overrides(row, out_dir))
    for key, v in _flatten(over):
        parts += ["--set", f"{key}={_yaml_scalar(v)}"]
    return shlex.join(parts)


def _pct(s: dict[str, Any], key: str) -> str:
    if key not in s:
        return "n/a"
    out = f"{100 * s[key]:.2f}"
    if f"{key}_lo" in s:
        out += f" [{100 * s[key + '_lo']:.1f}, {100 * s[key + '_hi']:.1f}]"
    return out


def _lanes_cell(s: dict[str, Any]) -> str:
    """Per-lane Hit@5 in one cell: the worst lane, the mean over lanes, the canary verdict."""
    if "lane_avg_hit@5" not in s:
        return "n/a"
    verdict = "passes" if s.get("lane_canary_ok") else (
        "fails (confident)" if s.get("lane_canary_confident_fail") else "fails (within CI)")
    return f"{100 * s['lane_min_hit@5']:.1f} / {100 * s['lane_avg_hit@5']:.1f}, {verdict}"


def run_row(base: Config, row: Row, out_dir: Path, use_ray: bool = False,
            command: str = "", force: bool = False) -> dict[str, Any]:
    """Train and evaluate one row (or reuse its saved result). Returns the row's record."""
    record_path = out_dir / row.name / "ablation_row.json"
    if record_path.is_file() and not force:
        say(f"ablation row {row.name}: reusing {record_path}")
        return json.loads(record_path.read_text())
    cfg = row_config(base, row, out_dir)
    say(f"ablation row {row.name}: {row.change}")
    t0 = time.perf_counter()
    # An interrupted row continues (same config only); --force trains it afresh.
    summary = train_and_evaluate(cfg, use_ray=use_ray, resume=not force, overwrite=force)
    results = summary["results"]
    model = next(n for n in results if not is_baseline(n))
    best = best_baseline(results)
    ckpt_meta = json.loads((Path(summary["best_checkpoint"]) / "checkpoint.json").read_text())
    record = {
        "row": row.name, "change": row.change, "overrides": row.overrides,
        "checkpoint": summary["best_checkpoint"], "command": command,
        "n_parameters": ckpt_meta.get("n_parameters"), "best_epoch": ckpt_meta.get("epoch"),
        "seconds": time.perf_counter() - t0, "model": results[model],
        "best_baseline": best, "baseline": results.get(best, {}) if best else {},
        "config": to_dict(cfg),
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    return record


def table_markdown(records: list[dict[str, Any]], title: str, meta: dict[str, Any]) -> str:
    """One table: a row per checkpoint, test metrics with 95% CIs, the best baseline on the same
    windows, then the command behind each row."""
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    if records:
        m = records[0]["model"]
        pool = m.get("pool_size_fixed")
        lines += [f"- test windows {m['n_windows']:,}, bank {m['bank_size']:,} concepts "
                  f"(bank-Hit@5 chance {100 * m['bank_chance@5']:.2f}%); Hit, CA in %; "
                  "[95% bootstrap CI]; the best baseline is chosen per row on the same windows"]
    else:
        pool = None
    pool_head = f"pool{pool}-Hit@5" if pool else "pool-Hit@5"
    lines += ["", f"| row | change | params | epoch | bank-Hit@5 | CA | {pool_head} | cosine | "
              "margin | best baseline: bank-Hit@5 / CA | Δ bank-Hit@5 [paired CI] | lanes: min / "
              "mean, canary |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s, b = r["model"], r["baseline"]
        pk = f"pool{pool}_hit@5" if pool else "pool_hit@5"
        delta = f"{100 * (s['bank_hit@5'] - b['bank_hit@5']):+.2f}" if b else "n/a"
        if b and s.get("paired_baseline") == r["best_baseline"]:
            delta += (f" [{100 * s['paired_bank_hit@5_lo']:+.1f}, "
                      f"{100 * s['paired_bank_hit@5_hi']:+.1f}]")
        lines.append(
            f"| {r['row']} | {r['change']} | {r['n_parameters'] or 0:,} | {r['best_epoch']} | "
            f"{_pct(s, 'bank_hit@5')} | {_pct(s, 'ca')} | {_pct(s, pk)} | {s['cosine']:.3f} | "
            f"{s['margin']:+.3f} | {r['best_baseline']}: {_pct(b, 'bank_hit@5')} / "
            f"{_pct(b, 'ca')} | {delta} | {_lanes_cell(s)} |")
    lines += ["", "Checkpoints and the commands that reproduce them:", ""]
    for r in records:
        lines.append(f"- **{r['row']}**: `{r['checkpoint']}`  \n  `{r['command']}`")
    return "\n".join(lines) + "\n"


def _saved_row(out: Path, name: str, bank_path: str,
               fresh: list[dict[str, Any]]) -> dict[str, Any] | None:
    """This run's record of a row, else one saved earlier in out on the same bank, else None."""
    for r in fresh:
        if r["row"] == name:
            return r
    path = out / name / "ablation_row.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("config", {}).get("bank_path") == bank_path else None


def run_ablation(base: Config, rows: list[str] | None = None, out_dir: str | Path | None = None,
                 use_ray: bool = False, config_path: str | None = None,
                 presets: list[str] | tuple[str, ...] = (), extra: dict[str, Any] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Run the chosen rows (default all) and write ablations.md + ablations.json in out_dir.
    config_path / presets / extra are what the command line gave, for the reproduce commands."""
    names = list(rows or ROW_NAMES)
    unknown = sorted(set(names) - set(ROW_NAMES))
    if unknown:
        raise ValueError(f"unknown ablation row(s) {unknown}; choose from {', '.join(ROW_NAMES)}")
    out = Path(out_dir or Path(base.run.storage_path) / "ablations")
    for row in (r for r in ROWS if r.name in names):
        check_no_conflict(row, out, extra)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for row in (r for r in ROWS if r.name in names):
        cmd = row_command(row, out, config_path, presets, extra)
        records.append(run_row(base, row, out, use_ray, cmd, force))
        (out / "ablations.json").write_text(json.dumps(records, indent=2))
    # Rows run earlier into the same folder on the same bank stay in the table: `--rows wide`
    # after a full run adds a row instead of replacing the table with one line.
    records = [r for r in (_saved_row(out, row.name, base.bank_path, records) for row in ROWS)
               if r is not None]
    (out / "ablations.json").write_text(json.dumps(records, indent=2))
    meta = {"base config": config_path or "defaults", "presets": ", ".join(presets) or "none",
            "bank": base.bank_path, "window": f"{base.window.policy}, L={base.window.context}",
            "selection": f"val {base.eval.select_metric} (early stopping)", "split": "test",
            "trained with": "Ray Train" if use_ray else "the plain PyTorch loop"}
    md = table_markdown(records, "lvm_ray ablations", meta)
    (out / "ablations.md").write_text(md)
    return {"table": md, "records": records, "out_dir": str(out)}
