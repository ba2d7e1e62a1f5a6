"""Data identity: a model is trained, evaluated and served only with the bank it belongs to.
Runs are never resumed or replaced silently; lvm evaluate uses each checkpoint's recorded config
and writes only to its own folder; the model's input width comes from the bank."""

import json
from pathlib import Path

import numpy as np
import pytest

from lvm_ray.config import ConfigError, load_config
from lvm_ray.data.bank import BankMismatch, load_bank, save_bank
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.predictor import Predictor
from lvm_ray.train.checkpoint import load_checkpoint
from lvm_ray.workflows.evaluate import evaluate_checkpoints
from lvm_ray.workflows.train import train_and_evaluate


def smoke(tmp_path: Path, **over) -> "Config":  # noqa: F821
    base = {"bank_path": str(tmp_path / "bank.parquet"),
            "run": {"storage_path": str(tmp_path / "runs"), "name": "r"},
            "train": {"max_epochs": 2}, "eval": {"bootstrap": 20, "lanes": 0}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.update({k: v})
    return load_config(presets=["smoke"], overrides=base)


def files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    cfg = smoke(tmp)
    summary = train_and_evaluate(cfg, use_ray=False)
    return tmp, cfg, Path(summary["best_checkpoint"])


def test_model_width_comes_from_the_bank(trained):
    tmp, cfg, best = trained
    assert cfg.model.d_in is None  # the smoke preset leaves it to the bank
    ck = load_checkpoint(best)
    assert ck.model_config.d_in == load_bank(tmp / "bank.parquet").dim == 32
    assert ck.meta["config"]["model"]["d_in"] == 32  # recorded resolved, so evaluate rebuilds it
    with pytest.raises(ValueError, match="leave model.d_in unset"):
        train_and_evaluate(smoke(tmp, model={"d_in": 48}, run={"name": "wide"}), use_ray=False)


def test_checkpoint_records_the_banks_fingerprint(trained):
    tmp, _, best = trained
    data = load_checkpoint(best).meta["data"]
    bank = load_bank(tmp / "bank.parquet")
    assert data["content"] == bank.content_hash() == bank.meta["content_sha256"]
    assert len(data["content"]) == 64 and data["n_concepts"] == len(bank)


def test_a_bank_it_was_not_trained_on_is_refused(trained, tmp_path):
    tmp, _, best = trained
    # Same shape, same documents, one vector nudged: another bank all the same.
    other = load_bank(tmp / "bank.parquet")
    other.vectors[5] = -other.vectors[5]
    save_bank(other, tmp_path / "other.parquet")
    with pytest.raises(BankMismatch) as e:
        Predictor.from_paths(best, tmp_path / "other.parquet", device="cpu")
    assert str(best) in str(e.value) and "other.parquet" in str(e.value)
    assert "content" in str(e.value)
    p = Predictor.from_paths(best, tmp_path / "other.parquet", device="cpu",
                             allow_bank_mismatch=True)
    assert p.info()["bank_mismatch"] and p.predict(other.vectors[:4]).neighbors
    ok = Predictor.from_paths(best, tmp / "bank.parquet", device="cpu")
    assert ok.info()["bank_mismatch"] == []
    with pytest.raises(BankMismatch):
        evaluate_checkpoints({"m": str(best)}, out_dir=tmp_path / "eval",
                             overrides={"bank_path": str(tmp_path / "other.parquet")})
    assert not (tmp_path / "eval").exists()


def test_evaluate_uses_the_recorded_config_and_writes_only_its_own_folder(trained, tmp_path,
                                                                          monkeypatch):
    tmp, cfg, best = trained
    monkeypatch.chdir(tmp_path)  # the default config's bank_path would be data/bank.parquet here
    before = files(best)
    out = evaluate_checkpoints({"m": str(best)})
    report = Path(out["report"])
    assert report.parent.resolve() == tmp_path / "runs" / "evaluate" / "m"  # its own folder
    text = report.read_text()
    assert str(tmp / "bank.parquet") in text  # the bank recorded in the checkpoint
    assert f"@L={cfg.window.context}" in " ".join(out["results"])  # the recorded windows
    assert files(best) == before  # nothing written into the checkpoint directory
    assert not (tmp_path / "data").exists()  # and no bank ingested


def test_an_existing_run_is_never_resumed_or_replaced_silently(trained):
    tmp, cfg, best = trained
    with pytest.raises(ConfigError, match="--resume to continue it, --overwrite"):
        train_and_evaluate(cfg, use_ray=False)
    changed = smoke(tmp, train={"lr": 0.01})
    with pytest.raises(ConfigError, match=r"different config.*train.lr: 0.003 -> 0.01"):
        train_and_evaluate(changed, use_ray=False, resume=True)
    record = json.loads((Path(cfg.run.storage_path) / "r" / "run.json").read_text())
    assert record["config"]["train"]["lr"] == 0.003  # the refused resume changed nothing
    # Same config: resumes from its checkpoint and ends where a finished run ends.
    again = train_and_evaluate(cfg, use_ray=False, resume=True)
    assert Path(again["best_checkpoint"]).parent == best.parent


def test_overwrite_starts_over(tmp_path):
    cfg = smoke(tmp_path)
    train_and_evaluate(cfg, use_ray=False)
    stale = Path(cfg.run.storage_path) / "r" / "stale.txt"
    stale.write_text("from the earlier run")
    res = train_and_evaluate(smoke(tmp_path, train={"lr": 0.01}), use_ray=False, overwrite=True)
    assert not stale.exists() and Path(res["best_checkpoint"]).is_dir()
    record = json.loads((Path(cfg.run.storage_path) / "r" / "run.json").read_text())
    assert record["config"]["train"]["lr"] == 0.01


def test_settings_the_data_cannot_fill_fail_before_the_run_directory_exists(tmp_path):
    cfg = smoke(tmp_path, train={"batch_size": 100_000, "micro_batch": 100_000})
    with pytest.raises(ValueError, match="too few training windows"):
        train_and_evaluate(cfg, use_ray=False)
    assert not (Path(cfg.run.storage_path) / "r").exists()


def test_changing_the_bank_changes_its_fingerprint():
    a = make_synthetic_bank(n_docs=6, seed=0)
    b = make_synthetic_bank(n_docs=6, seed=0)
    assert a.content_hash() == b.content_hash()
    b.splits = np.where(b.splits == "val", "test", b.splits).astype(object)
    assert a.content_hash() != b.content_hash()  # same vectors, other splits: another bank
