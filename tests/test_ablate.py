"""The ablation table: rows train real checkpoints, results are reused, and every row's command
rebuilds exactly the config that trained it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lvm_ray.workflows import ablate
from lvm_ray.cli import build_parser, config_from_args
from lvm_ray.config import load_config


def test_every_row_is_one_valid_change():
    base = load_config(presets=["smoke"])
    assert len(set(ablate.ROW_NAMES)) == len(ablate.ROWS)
    for row in ablate.ROWS:
        cfg = ablate.row_config(base, row, "out")  # unknown keys would raise here
        assert cfg.run.name == row.name and cfg.run.storage_path == "out"
    with pytest.raises(ValueError, match="unknown ablation row"):
        ablate.run_ablation(base, ["nope"], "unused")


@pytest.mark.parametrize("row", ablate.ROWS, ids=ablate.ROW_NAMES)
def test_row_command_rebuilds_the_row_config(row, tmp_path):
    extra = {"train": {"max_epochs": 2}, "bank_path": str(tmp_path / "b.parquet")}
    base = load_config(presets=["smoke"], overrides=extra)
    cmd = ablate.row_command(row, tmp_path / "abl", None, ["smoke"], extra)
    argv = shlex.split(cmd)
    assert argv[:3] == ["lvm", "train", "--local"]
    args = build_parser().parse_args(argv[1:])
    assert config_from_args(args) == ablate.row_config(base, row, tmp_path / "abl")


def test_ablate_with_bank_flag_gives_commands_that_train_on_that_bank(tmp_path, monkeypatch):
    """`lvm ablate --bank B`: each row's reproduce command names B too (it used to drop it and
    so trained on the config's default corpus)."""
    seen = {}

    def fake_run_ablation(cfg, rows, out, **kw):
        seen.update(cfg=cfg, extra=kw["extra"], presets=kw["presets"])
        return {"table": "", "out_dir": str(out)}

    monkeypatch.setattr(ablate, "run_ablation", fake_run_ablation)
    bank = str(tmp_path / "mine.parquet")
    args = build_parser().parse_args(["ablate", "--smoke-test", "--bank", bank, "--rows", "gru",
                                      "--set", "train.max_epochs=2", "--out", str(tmp_path)])
    assert args.fn(args) == 0
    row = ablate.ROWS[ablate.ROW_NAMES.index("gru")]
    cmd = ablate.row_command(row, tmp_path, None, seen["presets"], seen["extra"])
    rebuilt = config_from_args(build_parser().parse_args(shlex.split(cmd)[1:]))
    assert rebuilt.bank_path == bank and rebuilt.corpus.source == "bank"
    assert rebuilt == ablate.row_config(seen["cfg"], row, tmp_path)


@pytest.mark.slow
def test_run_ablation_trains_rows_writes_table_and_reuses(tmp_path):
    extra = {"train": {"max_epochs": 2}, "bank_path": str(tmp_path / "bank.parquet"),
             "eval": {"lanes": 4}}
    base = load_config(presets=["smoke"], overrides=extra)
    out = ablate.run_ablation(base, ["base", "gru"], tmp_path / "abl", presets=["smoke"],
                              extra=extra)
    recs = out["records"]
    assert [r["row"] for r in recs] == ["base", "gru"]
    for r in recs:
        assert (tmp_path / "abl" / r["row"]).is_dir()
        meta = json.loads((Path(r["checkpoint"]) / "checkpoint.json").read_text())
        assert meta["model_config"]["kind"] == ("gru" if r["row"] == "gru" else "memory_gru")
        assert 0 <= r["model"]["bank_hit@5"] <= 1 and r["best_baseline"]
        assert r["command"].startswith("lvm train --local --preset smoke")
    md = (tmp_path / "abl" / "ablations.md").read_text()
    assert "| base |" in md and "| gru |" in md and "| bank-Hit@5 | CA |" in md
    assert "lvm train --local" in md
    # Lanes were written next to the checkpoint's test metrics.
    from lvm_ray.eval.lanes import lane_report

    lanes = lane_report(recs[0]["checkpoint"])
    assert lanes is not None and lanes["k"] == 5 and len(lanes["lanes"]) >= 1
    # A second run reuses the saved rows instead of training again.
    again = ablate.run_ablation(base, ["base"], tmp_path / "abl", presets=["smoke"], extra=extra)
    assert again["records"][0]["seconds"] == recs[0]["seconds"]
    # ... and the table still lists the row run earlier (gru), not only the one asked for.
    assert [r["row"] for r in again["records"]] == ["base", "gru"]
    assert "| gru |" in (tmp_path / "abl" / "ablations.md").read_text()
    # A row saved on another bank is left out of this bank's table.
    gru_rec = json.loads((tmp_path / "abl" / "gru" / "ablation_row.json").read_text())
    assert ablate._saved_row(tmp_path / "abl", "gru", str(tmp_path / "b2"), []) is None
    assert ablate._saved_row(tmp_path / "abl", "gru", base.bank_path, []) == gru_rec


def test_a_set_that_a_row_overrides_is_refused_before_training(tmp_path):
    """`--rows ema --set train.ema=0.97` would train the row's 0.9 and say nothing: refused,
    naming the key; a --set of the same value, or of a key the row leaves alone, is accepted."""
    base = load_config(presets=["smoke"])
    with pytest.raises(ValueError, match=r"train\.ema=0\.97 \(row ema: 0\.9\)"):
        ablate.run_ablation(base, ["ema"], tmp_path / "abl", extra={"train": {"ema": 0.97}})
    assert not (tmp_path / "abl").exists()
    row = ablate.ROWS[ablate.ROW_NAMES.index("ema")]
    ablate.check_no_conflict(row, tmp_path, {"train": {"ema": 0.9, "lr": 0.01}})
    with pytest.raises(ValueError, match="run.name"):
        ablate.check_no_conflict(row, tmp_path, {"run": {"name": "mine"}})
