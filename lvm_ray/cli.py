"""`lvm` command line: ingest, train, evaluate, ablate, tune, serve, demo.

Every command takes the same config arguments: --config FILE, --preset NAME (repeatable, applied
first), --set section.key=value (repeatable, applied last) and --smoke-test (a tiny synthetic run
that finishes in seconds). jobs/*.py are thin wrappers around these commands so that
`python jobs/train.py ...` and `ray job submit ... -- python jobs/train.py ...` behave alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lvm_ray.config import PRESETS, Config, ConfigError, deep_update, load_config, parse_override

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (unknown keys are errors)")
    p.add_argument("--preset", action="append", default=[],
                   help="named preset applied before --config (repeatable): "
                        + ", ".join(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one value, e.g. train.lr=3e-4")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny synthetic run that finishes in seconds")


def config_from_args(args: argparse.Namespace) -> Config:
    presets = (["smoke"] if args.smoke_test else []) + list(args.preset)
    overrides: dict[str, Any] = {}
    for text in args.overrides:
        deep_update(overrides, parse_override(text))
    return load_config(args.config, presets, overrides)


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster a job was submitted to (RAY_ADDRESS), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # The dashboard (bound to 127.0.0.1) also serves the state API Ray Train polls.
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)


# ----------------------------------------------------------------------------- commands


def cmd_ingest(args: argparse.Namespace) -> int:
    from lvm_ray.workflows import ensure_bank

    cfg = config_from_args(args)
    if args.ray:
        init_ray()
    bank = ensure_bank(cfg, use_ray=args.ray)
    print(json.dumps({"bank": cfg.bank_path, "concepts": len(bank), "dim": bank.dim,
                      "encoder": bank.meta.get("encoder")}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lvm_ray.workflows import train_and_evaluate

    cfg = config_from_args(args)
    if args.workers is not None:
        from lvm_ray.config import merge

        cfg = merge(cfg, {"scaling": {"num_workers": args.workers}})
    if not args.local:
        init_ray()
    summary = train_and_evaluate(cfg, use_ray=not args.local, record_pids=args.record_pids)
    print(summary["table"])
    print(f"\nartifacts: {summary['run_dir']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lvm_ray.eval.evaluate import evaluate_checkpoints

    cfg = config_from_args(args)
    ckpts = {}
    for spec in args.checkpoint:
        name, _, path = spec.rpartition("=")
        ckpts[name or Path(path).parent.name or path] = path
    out = evaluate_checkpoints(ckpts, cfg, split=args.split, out_dir=args.out)
    print(out["table"])
    print(f"\nreport: {out['report']}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from lvm_ray.distributed.tune import run_tune

    return int(run_tune(args) or 0)


def cmd_serve(args: argparse.Namespace) -> int:
    from lvm_ray.serve.app import run_config

    init_ray()
    run_config(args.serve_config, blocking=True)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from lvm_ray.ablate import run_ablation

    cfg = config_from_args(args)
    presets = (["smoke"] if args.smoke_test else []) + list(args.preset)
    extra: dict[str, Any] = {}
    for text in args.overrides:
        deep_update(extra, parse_override(text))
    if args.ray:
        init_ray()
    rows = [r for r in (args.rows or "").split(",") if r] or None
    out = run_ablation(cfg, rows, args.out, use_ray=args.ray, config_path=args.config,
                       presets=presets, extra=extra, force=args.force)
    print(out["table"])
    print(f"table: {out['out_dir']}/ablations.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lvm_ray.demo import run_demo

    return run_demo(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="documents -> chunks -> embeddings -> Parquet bank")
    add_config_args(p)
    p.add_argument("--ray", action="store_true", help="embed with a Ray Data pipeline")
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("train", help="train with Ray Train, evaluate the best on test")
    add_config_args(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (overrides scaling)")
    p.add_argument("--local", action="store_true", help="plain PyTorch loop, no Ray")
    p.add_argument("--record-pids", action="store_true",
                   help="write every worker's pid under RUN_DIR/worker_pids (fault tests)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="protocol report for checkpoints vs baselines")
    add_config_args(p)
    p.add_argument("--checkpoint", action="append", required=True,
                   metavar="[NAME=]PATH", help="checkpoint directory (repeatable)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out", default="runs/evaluate", help="report directory")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("tune", help="sweep context length x InfoNCE alpha with Ray Tune "
                                    "(objective: val Hit@5)")
    add_config_args(p)
    from lvm_ray.distributed.tune import add_tune_args

    add_tune_args(p)
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("serve", help="deploy a Serve config (hybrid router) and serve until "
                                     "Ctrl-C")
    p.add_argument("serve_config", nargs="?", default="serve_configs/hybrid.yaml",
                   help="Serve config file (default: serve_configs/hybrid.yaml)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("ablate", help="the ablation table: one trained checkpoint per row")
    add_config_args(p)
    p.add_argument("--rows", help="comma-separated row names (default: all rows)")
    p.add_argument("--out", help="table directory (default: RUN_STORAGE/ablations)")
    p.add_argument("--ray", action="store_true", help="train each row with Ray Train")
    p.add_argument("--force", action="store_true", help="retrain rows that already have results")
    p.set_defaults(fn=cmd_ablate)

    p = sub.add_parser("demo", help="the main job on the embedded corpus")
    p.add_argument("--quick", action="store_true", help="smaller subset, for a fast look")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # AVX probing is not news
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # Bad input is the user's to fix: one clear line (a YAML error spans several), non-zero
        # exit, no traceback.
        print(f"lvm {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
