"""The plain-PyTorch training recipe: schedule, accumulation, early stopping, learning."""

import math

import numpy as np
import pytest
import torch

from lvm_ray.config import TrainConfig, load_config
from lvm_ray.eval.baselines import CopyLast
from lvm_ray.eval.metrics import evaluate
from lvm_ray.model import build_model
from lvm_ray.eval.predict import predict_windows
from lvm_ray.train.loop import EarlyStopping, fit_local
from lvm_ray.train.step import (Batch, LocalCollective, accumulation_steps, make_optimizer,
                                make_scheduler, noisy_context, train_group)
from lvm_ray.workflows.prepare import prepare_windows


def test_scheduler_has_real_linear_warmup_then_cosine():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=1.0, warmup_frac=0.1)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)  # step 0 of a 10-step warmup
    assert np.all(np.diff(lrs[:10]) > 0) and lrs[9] == pytest.approx(1.0)
    assert np.all(np.diff(lrs[10:]) <= 1e-12) and lrs[-1] < 0.01
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_accumulation_steps_give_effective_batch():
    assert accumulation_steps(TrainConfig(batch_size=256, micro_batch=32), 2) == 4
    with pytest.raises(ValueError, match="multiple"):
        accumulation_steps(TrainConfig(batch_size=100, micro_batch=32), 1)


def test_accumulated_step_equals_one_big_batch():
    """4 micro-batches of 8 accumulate to the same gradient step as one batch of 32."""
    cfg = load_config(presets=["smoke"], overrides={"loss": {"negatives": "none"},
                                                    "model": {"d_in": 32}})
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(32, 5, 32, generator=g)
    tgt = torch.nn.functional.normalize(torch.randn(32, 32, generator=g), dim=-1)
    lengths = torch.full((32,), 5)
    outs = []
    for chunks in (4, 1):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = make_optimizer(model, cfg.train)
        sched = make_scheduler(opt, cfg.train, 10)
        group = [Batch(c, l, t) for c, l, t in zip(ctx.chunk(chunks), lengths.chunk(chunks),
                                                   tgt.chunk(chunks))]
        train_group(model, group, opt, sched, cfg.loss, cfg.train, LocalCollective())
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)


def test_context_noise_perturbs_real_vectors_only_and_changes_the_step():
    g = torch.Generator().manual_seed(0)
    ctx = torch.nn.functional.normalize(torch.randn(4, 6, 384, generator=g), dim=-1)
    ctx[0, 3:] = 0.0  # row 0 is 3 long: right padding
    lengths = torch.tensor([3, 6, 6, 6])
    b = Batch(ctx, lengths, ctx[:, -1])
    torch.manual_seed(1)  # not 0: that would draw noise parallel to ctx (the same randn)
    out = noisy_context(b, 0.025).ctx
    assert torch.equal(out[0, 3:], ctx[0, 3:]) and torch.equal(out.new_tensor(0), out[0, 4].sum())
    real = torch.arange(6)[None, :] < lengths[:, None]
    torch.testing.assert_close(out[real].norm(dim=-1), torch.ones(int(real.sum())))
    cos = (out[real] * ctx[real]).sum(-1)
    assert cos.max() < 0.99 and cos.mean() == pytest.approx(1 / math.sqrt(1 + 0.025**2 * 384),
                                                             abs=0.02)
    # train_group applies it: the same seed and batch give other weights with the noise on.
    cfg = load_config(presets=["smoke"], overrides={"loss": {"negatives": "none"},
                                                    "model": {"d_in": 384}})
    outs = []
    for noise in (0.0, 0.0, 0.025):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        tc = TrainConfig(**{**cfg.train.__dict__, "context_noise": noise})
        opt = make_optimizer(model, tc)
        train_group(model, [b], opt, make_scheduler(opt, tc, 10), cfg.loss, tc,
                    LocalCollective())
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    with pytest.raises(ValueError, match="context_noise"):
        TrainConfig(context_noise=-0.1)


def test_gathered_negatives_see_the_whole_group():
    """With `gathered`, micro-step j's InfoNCE gets the other micro-batches' targets too."""
    seen = []
    cfg = load_config(presets=["smoke"], overrides={"model": {"d_in": 32}})
    import lvm_ray.train.step as step

    real = step.lvm_loss

    def spy(pred, target, loss_cfg, extra_negatives=None):
        seen.append(0 if extra_negatives is None else len(extra_negatives))
        return real(pred, target, loss_cfg, extra_negatives=extra_negatives)

    step.lvm_loss = spy
    try:
        model = build_model(cfg.model)
        opt = make_optimizer(model, cfg.train)
        group = [Batch(torch.randn(8, 3, 32), torch.full((8,), 3),
                       torch.nn.functional.normalize(torch.randn(8, 32), dim=-1))
                 for _ in range(4)]
        train_group(model, group, opt, make_scheduler(opt, cfg.train, 5), cfg.loss, cfg.train,
                    LocalCollective())
    finally:
        step.lvm_loss = real
    assert seen == [24, 24, 24, 24]


def test_early_stopping_patience_and_state():
    es = EarlyStopping(patience=3)
    assert es.update(0.1, 0) and es.update(0.2, 1)
    assert not es.update(0.2, 2) and not es.update(0.15, 3)
    assert not es.should_stop
    assert not es.update(0.19, 4)
    assert es.should_stop and es.best_epoch == 1
    assert EarlyStopping.from_state(es.state_dict()) == es


def test_tiny_memory_gru_beats_copy_last(tmp_path, synthetic_bank):
    """A few seconds of training on the synthetic corpus beat copy-last on val bank-Hit@5."""
    cfg = load_config(presets=["smoke"], overrides={"train": {"max_epochs": 5}})
    ws = prepare_windows(cfg, synthetic_bank)
    res = fit_local(cfg, synthetic_bank, ws.train, ws.val, tmp_path)
    from lvm_ray.train.checkpoint import load_checkpoint

    model = load_checkpoint(res["best_checkpoint"]).model
    pred = predict_windows(model, synthetic_bank.vectors, ws.val)
    ours = evaluate(pred, ws.val, synthetic_bank, cfg.eval)
    copy = evaluate(CopyLast().predict(synthetic_bank.vectors, ws.val), ws.val, synthetic_bank,
                    cfg.eval)
    assert ours["bank_hit@5"] > copy["bank_hit@5"] + 0.1, (ours["bank_hit@5"],
                                                           copy["bank_hit@5"])
    assert (tmp_path / "training_history.json").exists()
    assert len(res["history"]) == 5


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_crash_ends_where_an_uninterrupted_run_ends(tmp_path, synthetic_bank, ema):
    """A run that dies after epoch 1 and resumes from its latest checkpoint reproduces the
    uninterrupted run's history (losses, val metrics, best epoch) exactly; with train.ema the
    checkpoint holds the average and the state the last step's weights, both restored."""
    from pathlib import Path

    from lvm_ray.train.loop import Runtime, fit, local_epoch_indices

    cfg = load_config(presets=["smoke"], overrides={"train": {"max_epochs": 4, "patience": 10,
                                                               "ema": ema}})
    ws = prepare_windows(cfg, synthetic_bank)
    full = fit_local(cfg, synthetic_bank, ws.train, ws.val, tmp_path / "full")

    class Crash(Exception):
        pass

    saved: list[Path] = []

    def report(row, ckpt):
        if ckpt is not None:
            saved.append(ckpt)
        if row["epoch"] == 1:
            raise Crash

    rt = Runtime(local_epoch_indices(len(ws.train), cfg.train), report,
                 checkpoint_root=tmp_path / "cut")
    with pytest.raises(Crash):
        fit(cfg, synthetic_bank, ws.train, ws.val, rt)
    assert saved, "epoch 0 always improves on -inf, so a checkpoint exists"
    rt2 = Runtime(local_epoch_indices(len(ws.train), cfg.train), lambda r, c: None,
                  checkpoint_root=tmp_path / "cut2", resume_from=saved[-1])
    resumed = fit(cfg, synthetic_bank, ws.train, ws.val, rt2)
    assert [r["epoch"] for r in resumed["history"]] == [0, 1, 2, 3]
    for a, b in zip(resumed["history"], full["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_bank_hit@5"] == b["val_bank_hit@5"]
    assert resumed["best_epoch"] == full["best_epoch"]


def test_init_from_starts_from_the_checkpoints_weights(tmp_path, synthetic_bank):
    """train.init_from loads weights only: the fresh model equals the checkpoint's weights before
    its first step; a checkpoint of another architecture is refused."""
    from lvm_ray.config import merge
    from lvm_ray.train.checkpoint import load_checkpoint
    from lvm_ray.train.loop import init_weights, with_bank_width

    cfg = load_config(presets=["smoke"], overrides={"train": {"max_epochs": 1}})
    ws = prepare_windows(cfg, synthetic_bank)
    src = fit_local(cfg, synthetic_bank, ws.train, ws.val, tmp_path / "src")["best_checkpoint"]
    trained = load_checkpoint(src).model.state_dict()
    mcfg = with_bank_width(cfg, synthetic_bank).model
    torch.manual_seed(123)
    fresh = build_model(merge(mcfg, {"dropout": 0.3}))  # dropout may differ
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items())
    init_weights(fresh, merge(mcfg, {"dropout": 0.3}), src)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items())
    with pytest.raises(ValueError, match="hidden"):
        init_weights(build_model(merge(mcfg, {"hidden": 16})), merge(mcfg, {"hidden": 16}), src)
    # Through fit: the start is scored as epoch -1 (the checkpoint's own val score), and epochs
    # at lr ~0 that only tie it do not replace it: the run ends with the starting weights.
    tiny = load_config(presets=["smoke"], overrides={"train": {"max_epochs": 2, "lr": 1e-12,
                                                                "init_from": src}})
    res = fit_local(tiny, synthetic_bank, ws.train, ws.val, tmp_path / "ft")
    first = fit_local(cfg, synthetic_bank, ws.train, ws.val, tmp_path / "again")
    assert [h["epoch"] for h in res["history"]] == [-1, 0, 1]
    assert res["history"][0]["val_bank_hit@5"] == pytest.approx(
        first["history"][0]["val_bank_hit@5"])
    assert res["best_epoch"] == -1 and res["best_checkpoint"].endswith("epoch_-01")
    kept = load_checkpoint(res["best_checkpoint"]).model.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in trained.items())
    # A fine-tune that does learn replaces the start: from a briefly trained start at a working
    # learning rate, some epoch beats it and becomes the best.
    ft = load_config(presets=["smoke"], overrides={"train": {"max_epochs": 4, "init_from": src}})
    res = fit_local(ft, synthetic_bank, ws.train, ws.val, tmp_path / "ft2")
    assert res["best_epoch"] >= 0
    assert res["history"][res["best_epoch"] + 1]["val_bank_hit@5"] > res["history"][0][
        "val_bank_hit@5"]


def test_ema_scores_and_saves_the_moving_average_of_the_weights(tmp_path, synthetic_bank):
    """weight_average follows avg <- d * avg + (1 - d) * w after the first copy; with train.ema
    the saved checkpoint is that average, not the last step's weights."""
    from lvm_ray.train.checkpoint import load_checkpoint, load_train_state
    from lvm_ray.train.loop import weight_average

    lin = torch.nn.Linear(3, 2)
    avg = weight_average(lin, 0.75)
    w = [torch.full_like(lin.weight, v) for v in (1.0, 3.0, 5.0)]
    for v in w:
        with torch.no_grad():
            lin.weight.copy_(v)
        avg.update_parameters(lin)
    expect = 0.75 * (0.75 * 1.0 + 0.25 * 3.0) + 0.25 * 5.0
    assert torch.allclose(avg.module.weight, torch.full_like(lin.weight, expect))
    assert weight_average(lin, 0.0) is None
    with pytest.raises(ValueError, match="train.ema"):
        TrainConfig(ema=1.0)

    cfg = load_config(presets=["smoke"], overrides={"train": {"max_epochs": 2, "ema": 0.5}})
    ws = prepare_windows(cfg, synthetic_bank)
    ck = fit_local(cfg, synthetic_bank, ws.train, ws.val, tmp_path / "ema")["best_checkpoint"]
    saved, state = load_checkpoint(ck).model.state_dict(), load_train_state(ck)
    assert int(state["ema_n_averaged"]) >= 2
    assert any(not torch.equal(v, state["train_weights"][k]) for k, v in saved.items())
    plain = load_config(presets=["smoke"], overrides={"train": {"max_epochs": 2}})
    with pytest.raises(ValueError, match="train.ema"):
        fit_local(plain, synthetic_bank, ws.train, ws.val, tmp_path / "plain", resume_from=ck)
