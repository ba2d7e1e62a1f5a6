"""`lvm` command line: ingest, train, evaluate, context-curve, ablate, tune, serve, demo.

Every command takes the same config arguments: --config FILE, --preset NAME (repeatable, applied
first), --set section.key=value (repeatable, applied last) and --smoke-test (a tiny synthetic run
that finishes in seconds). jobs/*.py are thin wrappers around these commands so that
`python jobs/train.py ...` and `ray job submit ... -- python jobs/train.py ...` behave alike.
Each command imports its workflow when it runs, so `lvm --help` loads neither Ray nor torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lvm_ray.config import (PRESETS, Config, ConfigError, deep_update, load_config, merge,
                            parse_overrides)
from lvm_ray.distributed.runtime import RayUnreachable, init_ray

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
    p.add_argument("--bank", metavar="PATH",
                   help="use this existing concept bank as it is (corpus.source=bank, "
                        "bank_path=PATH): no corpus settings needed")


def add_address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="local|auto|HOST:PORT",
                   help="the Ray cluster to use: local (a new one here), auto (the one `ray "
                        "start` recorded), or a head's HOST:PORT. Default: RAY_ADDRESS, else the "
                        "recorded cluster if it answers, else a new local Ray")


def presets_of(args: argparse.Namespace) -> list[str]:
    return (["smoke"] if args.smoke_test else []) + list(args.preset)


def overrides_of(args: argparse.Namespace, extra: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """--set values, then --bank, then `extra` (other flags)."""
    overrides = parse_overrides(args.overrides)
    if getattr(args, "bank", None):
        deep_update(overrides, {"corpus": {"source": "bank", "path": args.bank},
                                "bank_path": args.bank})
    deep_update(overrides, extra or {})
    return overrides


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    """Defaults, --preset, --config, then --set, --bank and `extra` (other flags)."""
    return load_config(args.config, presets_of(args), overrides_of(args, extra))


# ----------------------------------------------------------------------------- commands


def cmd_ingest(args: argparse.Namespace) -> int:
    from lvm_ray.workflows.prepare import ensure_bank, ingest_dry_run, say_short_documents

    cfg = config_from_args(args)
    if args.dry_run:
        plan = ingest_dry_run(cfg, use_ray=args.ray)
        print(plan["summary"])
        print(json.dumps(plan, indent=2))
        return 0
    if args.ray:
        init_ray(address=args.address, verbose=args.verbose)
    bank = ensure_bank(cfg, use_ray=args.ray, overwrite=args.overwrite)
    say_short_documents(cfg, bank)
    out = {"bank": cfg.bank_path, "concepts": len(bank), "dim": bank.dim,
           "encoder": bank.meta.get("encoder")}
    if args.index:
        from lvm_ray.data.index import build_index_files

        out["index"] = build_index_files(cfg.bank_path, cfg.index)
    print(json.dumps(out, indent=2))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from lvm_ray.data.index import build_index_files

    cfg = config_from_args(args)
    print(json.dumps(build_index_files(cfg.bank_path, cfg.index, force=args.force), indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lvm_ray.workflows.train import train_and_evaluate

    cfg = config_from_args(args)
    if args.workers is not None:
        cfg = merge(cfg, {"scaling": {"num_workers": args.workers}})
    if not args.local:
        init_ray(address=args.address, verbose=args.verbose)
    summary = train_and_evaluate(cfg, use_ray=not args.local, record_pids=args.record_pids,
                                 resume=args.resume, overwrite=args.overwrite,
                                 verbose=args.verbose)
    print(summary["table"])
    print(f"\n{summary['verdict']}\nartifacts: {summary['run_dir']} (report.md, "
          f"training_curves.png); best checkpoint: {summary['best_checkpoint']}")
    return 0


def checkpoints_of(specs: list[str]) -> dict[str, str]:
    """--checkpoint [NAME=]PATH values -> {name: path} (the name defaults to the run's folder)."""
    ckpts = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        ckpts[name or Path(path).parent.name or path] = path
    return ckpts


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lvm_ray.workflows.evaluate import evaluate_checkpoints

    if args.ensemble or args.ensemble_pool:
        return cmd_evaluate_ensembles(args)
    if not args.checkpoint:
        raise ValueError("give --checkpoint (or --ensemble / --ensemble-pool)")
    # Each checkpoint's recorded config is the base; --config/--preset/--set/--bank go on top.
    out = evaluate_checkpoints(checkpoints_of(args.checkpoint), args.config, presets_of(args),
                               overrides_of(args), split=args.split, out_dir=args.out,
                               allow_bank_mismatch=args.allow_bank_mismatch)
    print(out["table"])
    print(f"\nreport: {out['report']}")
    return 0


def cmd_evaluate_ensembles(args: argparse.Namespace) -> int:
    from lvm_ray.train.checkpoint import load_checkpoint
    from lvm_ray.workflows.ensemble import evaluate_ensembles
    from lvm_ray.workflows.evaluate import checkpoint_config

    ensembles = {}
    for spec in args.ensemble:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise ValueError(f"--ensemble {spec!r} must look like NAME=PATH,PATH[,...]")
        ensembles[name] = [p for p in paths.split(",") if p]
    pool = [p for p in (args.ensemble_pool or "").split(",") if p] or None
    first = next(iter([p for ps in ensembles.values() for p in ps] + (pool or [])))
    # The first member's recorded config is the base (bank, windows), as for --checkpoint.
    cfg = checkpoint_config(load_checkpoint(first).meta, args.config, presets_of(args),
                            overrides_of(args))
    out = evaluate_ensembles(
        ensembles, cfg, split=args.split, out_dir=args.out or "runs/evaluate/ensembles",
        fusions=tuple(f for f in args.fusion.split(",") if f), pool=pool,
        sizes=tuple(int(n) for n in args.ensemble_sizes.split(",") if n),
        allow_bank_mismatch=args.allow_bank_mismatch)
    print(out["table"])
    print(f"\nreport: {out['report']}")
    return 0


def cmd_context_curve(args: argparse.Namespace) -> int:
    from lvm_ray.workflows.context_curve import run_context_curve

    cfg = config_from_args(args)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    out = run_context_curve(cfg, checkpoints_of(args.checkpoint), split=args.split,
                            lengths=lengths, min_history=args.min_history, out_dir=args.out,
                            phase2=args.phase2, smoke=args.smoke_test)
    print(out["markdown"])
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from lvm_ray.eval.report import summary_table
    from lvm_ray.eval.sweep import objective_metric
    from lvm_ray.workflows.sweep import run_sweep

    cfg = config_from_args(args, {"tune": {"name": args.name}} if args.name else None)
    init_ray(args.num_cpus, address=args.address, verbose=args.verbose)
    # A smoke test is meant to be rerun: it starts over unless asked to resume.
    res = run_sweep(cfg, resume=args.resume,
                    overwrite=args.overwrite or (args.smoke_test and not args.resume))
    if res.status != "finished":
        return 3
    print((Path(res.sweep_dir) / "results.md").read_text())
    if res.best is not None:
        metric = objective_metric(cfg)
        print(f"best: trial {res.best['trial_id']} context={res.best['context']} "
              f"alpha={res.best['alpha']:.4g} {metric}={100 * res.best[metric]:.2f}%\n"
              f"checkpoint: {res.best['checkpoint']}")
    if res.test:
        print("\ntest (best trial vs baselines, 95% CIs):\n" + summary_table(res.test))
    print(f"\nsweep directory: {res.sweep_dir} ({res.seconds:.0f} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lvm_ray.serve.deploy import run_config, use_fast_serve_settings

    # Before the local Ray starts: its processes read them.
    use_fast_serve_settings(direct_ingress=args.direct_ingress)
    init_ray(address=args.address, verbose=args.verbose)
    run_config(args.serve_config, blocking=True)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from lvm_ray.workflows.ablate import run_ablation

    cfg = config_from_args(args)
    if args.ray:
        init_ray(address=args.address, verbose=args.verbose)
    rows = [r for r in (args.rows or "").split(",") if r] or None
    out = run_ablation(cfg, rows, args.out, use_ray=args.ray, config_path=args.config,
                       presets=presets_of(args), extra=overrides_of(args), force=args.force)
    print(out["table"])
    print(f"table: {out['out_dir']}/ablations.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lvm_ray.workflows.demo import run_demo

    return run_demo(quick=args.quick, address=args.address, verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's own logs and warnings (hidden by default)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="documents -> chunks -> embeddings -> Parquet bank")
    add_config_args(p)
    p.add_argument("--ray", action="store_true", help="embed with a Ray Data pipeline")
    add_address_arg(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a bank at bank_path that was built from other settings or data "
                        "(without it, such a bank is never touched)")
    p.add_argument("--dry-run", action="store_true",
                   help="say how many documents and chunks would be encoded and estimate the "
                        "time; write nothing")
    p.add_argument("--index", action="store_true",
                   help="then build the serving index (index.factory) beside the bank")
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("index", help="build the serving kNN index (index.factory) and lookup "
                                     "file beside a bank (`--bank PATH`)")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.set_defaults(fn=cmd_index)

    p = sub.add_parser("train", help="train with Ray Train, evaluate the best on test")
    add_config_args(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (overrides scaling)")
    p.add_argument("--local", action="store_true", help="plain PyTorch loop, no Ray")
    add_address_arg(p)
    p.add_argument("--record-pids", action="store_true",
                   help="write every worker's pid under RUN_DIR/worker_pids (fault tests)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_STORAGE/run.name (same config and bank only)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing run of the same run.name and start over")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="protocol report for checkpoints vs baselines (each "
                                         "checkpoint's recorded config and bank by default)")
    add_config_args(p)
    p.add_argument("--checkpoint", action="append", default=[],
                   metavar="[NAME=]PATH", help="checkpoint directory (repeatable)")
    p.add_argument("--ensemble", action="append", default=[], metavar="NAME=PATH,PATH[,...]",
                   help="an ensemble of checkpoints on the same bank, fused with weights chosen "
                        "on val (repeatable)")
    p.add_argument("--ensemble-pool", metavar="PATH,PATH,...",
                   help="checkpoints to search: the best subset of each --ensemble-sizes on val")
    p.add_argument("--ensemble-sizes", default="2,3", help="subset sizes for --ensemble-pool")
    p.add_argument("--fusion", default="score,rrf",
                   help="ensemble fusions: score (weighted cosine sum), rrf (reciprocal rank)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out", help="report directory (default: runs/evaluate/NAME[+NAME...])")
    p.add_argument("--allow-bank-mismatch", action="store_true",
                   help="evaluate on a bank the checkpoints were not trained on")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("context-curve", help="bank-Hit@5, MRR and CA against context length L "
                                             "on one fixed set of long-history targets")
    add_config_args(p)
    p.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                   help="checkpoint directory (repeatable)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--lengths", default="1,2,4,8,16,32,64,128,256,500,1000",
                   help="comma-separated context lengths (those above --min-history are dropped)")
    p.add_argument("--min-history", type=int, default=1000,
                   help="targets need at least this many earlier concepts in their document")
    p.add_argument("--phase2", metavar="NAME",
                   help="the Phase-2 checkpoint's name: also derive the router threshold and "
                        "Phase-3 from the same curve on val")
    p.add_argument("--out", default="runs/context_curve", help="output directory")
    p.set_defaults(fn=cmd_context_curve)

    p = sub.add_parser("tune", help="sweep context length x InfoNCE alpha (x tune.grid's knobs) "
                                    "with Ray Tune (objective: val Hit@5); the config's `tune:` "
                                    "section")
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (same config): finished trials are kept, "
                        "unfinished and errored ones continue from their last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing sweep directory of the same name and start over")
    p.add_argument("--name", help="sweep name (tune.name): the directory under the storage path")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    add_address_arg(p)
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("serve", help="deploy a Serve config (hybrid router) and serve until "
                                     "Ctrl-C")
    p.add_argument("serve_config", nargs="?", default="serve_configs/hybrid.yaml",
                   help="Serve config file (default: serve_configs/hybrid.yaml)")
    p.add_argument("--direct-ingress", action="store_true",
                   help="each application's replicas also answer HTTP on their own ports "
                        "(printed), without the proxy's hop: for a load balancer in front "
                        "(local Ray only; a cluster sets RAY_SERVE_ENABLE_DIRECT_INGRESS=1)")
    add_address_arg(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("ablate", help="the ablation table: one trained checkpoint per row")
    add_config_args(p)
    p.add_argument("--rows", help="comma-separated row names (default: all rows)")
    p.add_argument("--out", help="table directory (default: RUN_STORAGE/ablations)")
    p.add_argument("--ray", action="store_true", help="train each row with Ray Train")
    add_address_arg(p)
    p.add_argument("--force", action="store_true", help="retrain rows that already have results")
    p.set_defaults(fn=cmd_ablate)

    p = sub.add_parser("demo", help="the main job on the embedded corpus")
    p.add_argument("--quick", action="store_true", help="smaller subset, for a fast look")
    add_address_arg(p)
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
    except (ConfigError, FileNotFoundError, ValueError, RayUnreachable) as e:
        # Bad input is the user's to fix: one clear line (a YAML error spans several), non-zero
        # exit, no traceback.
        print(f"lvm {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
