"""Checkpoints: bit-exact round trip, self-describing, no pickle, interrupted writes rejected."""

import json
import pickletools  # noqa: F401  (documents intent: nothing here unpickles)

import pytest
import torch

from lvm_ray.config import ModelConfig, TrainConfig
from lvm_ray.model import build_model
from lvm_ray.train.checkpoint import (CheckpointError, is_valid_checkpoint, load_checkpoint,
                                      load_train_state, read_meta, save_checkpoint)
from lvm_ray.train.step import make_optimizer

CFG = ModelConfig(d_in=16, hidden=16, layers=2, slots=4)


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = build_model(CFG)
    path = save_checkpoint(tmp_path / "ck", model, CFG, epoch=3, metrics={"val_bank_hit@5": 0.5},
                           data={"encoder": "x"}, config={"window": {"context": 7}})
    loaded = load_checkpoint(path)
    assert loaded.model_config == CFG
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    meta = read_meta(path)
    assert meta["epoch"] == 3 and meta["metrics"]["val_bank_hit@5"] == 0.5
    assert meta["n_parameters"] == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 5, 16)
    model.eval()
    torch.testing.assert_close(model(x)[0], loaded.model(x)[0], atol=0, rtol=0)


def test_train_state_loads_without_pickle(tmp_path):
    model = build_model(CFG)
    opt = make_optimizer(model, TrainConfig())
    model(torch.randn(2, 3, 16))[0].sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, CFG, epoch=0, metrics={},
                    train_state={"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                                 "epoch": 0})
    st = load_train_state(tmp_path / "ck")  # torch.load(weights_only=True) inside
    opt2 = make_optimizer(build_model(CFG), TrainConfig())
    opt2.load_state_dict(st["optimizer"])
    assert st["epoch"] == 0


def test_ddp_style_wrapper_is_unwrapped(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    model = build_model(CFG)
    save_checkpoint(tmp_path / "ck", Wrapper(model), CFG, epoch=0, metrics={})
    load_checkpoint(tmp_path / "ck")  # keys have no "module." prefix


def test_interrupted_or_corrupted_checkpoints_are_rejected(tmp_path):
    model = build_model(CFG)
    path = save_checkpoint(tmp_path / "ck", model, CFG, epoch=0, metrics={})
    assert is_valid_checkpoint(path)
    # Truncated weights (a write cut short) fail the checksum.
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert not is_valid_checkpoint(path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    # A directory without checkpoint.json (never finished) is not a checkpoint.
    (tmp_path / "partial").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "partial")
    # No temporary directories are left behind by a successful save.
    save_checkpoint(tmp_path / "ck2", model, CFG, epoch=0, metrics={})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_atomically(tmp_path):
    m1, m2 = build_model(CFG), build_model(CFG)
    save_checkpoint(tmp_path / "ck", m1, CFG, epoch=0, metrics={})
    save_checkpoint(tmp_path / "ck", m2, CFG, epoch=1, metrics={})
    assert read_meta(tmp_path / "ck")["epoch"] == 1
    assert json.loads((tmp_path / "ck" / "checkpoint.json").read_text())["format"] == 1


def test_checkpoint_from_before_the_anchor_field_keeps_its_meaning(tmp_path):
    """Checkpoints written before model.anchor existed were trained with anchor "last"; the later
    default ("decay") must not change what they compute."""
    cfg = ModelConfig(d_in=16, hidden=16, layers=1, slots=4, anchor="last")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "old", model, cfg, epoch=0, metrics={})
    meta_file = path / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    del meta["model_config"]["anchor"]
    meta_file.write_text(json.dumps(meta))
    assert ModelConfig().anchor == "decay"
    loaded = load_checkpoint(path)
    assert loaded.model_config.anchor == "last"
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(model(x)[0], loaded.model(x)[0], atol=0, rtol=0)
