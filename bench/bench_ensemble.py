"""Per-query cost of ensembles against their members: what one Serve replica pays per request.

    python bench/bench_ensemble.py --bank data/sotu_full_bank.parquet \
        --spec runs/ensembles/pair --spec runs/ensembles/best3
    python bench/bench_ensemble.py --smoke-test        # synthetic, seconds, writes nothing

For each ensemble.json (lvm_ray.serve.fusion.EnsemblePredictor) and each of its members alone
(its checkpoint in a Predictor, what ModelServer runs, and as a one-member spec, what
EnsembleServer runs for a plain checkpoint): batch 1,
CPU time of this process (`time.process_time`, 1 thread), median over interleaved rounds of
- predict: one full context of the members' trained length from the test split, model(s) + kNN
  over the whole bank + fusion (what /v1/predict pays);
- append: one new vector continuing a session (what /v1/sessions/.../append pays);
for each fusion the spec has weights for. Writes the "ensemble" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import markdown_table, write_section  # noqa: E402


def cpu_ms(fn, n: int) -> float:
    c0 = time.process_time()
    for _ in range(n):
        fn()
    return 1000 * (time.process_time() - c0) / n


def measure(predictors: dict[str, object], contexts: list[np.ndarray], rounds: int,
            calls: int) -> dict[str, dict[str, float]]:
    """Median CPU ms per call of predict and append, rounds interleaved across predictors."""
    samples = {name: {"predict": [], "append": []} for name in predictors}
    states = {}
    for name, p in predictors.items():  # a session state after the context, for append
        (_, h, last), = p.append_batch([contexts[0][:-1]], [None], [None], k=5)
        states[name] = (h, last)
    for r in range(rounds):
        for name, p in predictors.items():
            ctx = contexts[r % len(contexts)]
            samples[name]["predict"].append(cpu_ms(lambda: p.predict(ctx, k=5), calls))
            h, last = states[name]
            x = ctx[-1:]
            samples[name]["append"].append(
                cpu_ms(lambda: p.append_batch([x], [h], [last], k=5), calls))
    return {n: {k: float(np.median(v)) for k, v in s.items()} for n, s in samples.items()}


def main() -> int:
    import torch

    from lvm_ray.data.bank import load_bank
    from lvm_ray.predictor import Predictor
    from lvm_ray.serve.fusion import EnsemblePredictor, read_spec
    from lvm_ray.train.checkpoint import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", default="data/sotu_full_bank.parquet")
    ap.add_argument("--spec", action="append", default=[], help="ensemble.json or its directory")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.smoke_test:
        args.spec, args.bank, args.rounds, args.calls = _smoke_assets(), None, 2, 2
    bank = _smoke_bank() if args.smoke_test else load_bank(args.bank)
    rows, raw = [], {}
    for spec_path in args.spec:
        spec = read_spec(spec_path)
        predictors = {}
        for m in spec["members"]:
            # What ModelServer runs for a plain checkpoint, and the same behind EnsembleServer.
            predictors[f"{m['name']} (Predictor)"] = Predictor(load_checkpoint(m["checkpoint"]),
                                                               bank, "cpu")
            predictors[m["name"]] = EnsemblePredictor(read_spec(m["checkpoint"]), bank, "cpu")
        for fusion in spec["weights"]:
            one = dict(spec, fusion=fusion)
            predictors[f"{spec['name']} ({fusion})"] = EnsemblePredictor(one, bank, "cpu")
        ctx_len = max(p.max_context for p in predictors.values())
        test = np.flatnonzero(bank.splits == "test")
        starts = np.random.default_rng(0).choice(len(test) - ctx_len - 1, size=5, replace=False)
        contexts = [bank.vectors[test[s : s + ctx_len]] for s in starts]
        res = measure(predictors, contexts, args.rounds, args.calls)
        raw[spec["name"]] = res
        base = min(res[m["name"]]["predict"] for m in spec["members"])
        for name, r in res.items():
            n_members = len(getattr(predictors[name], "members", [None]))
            rows.append([name, n_members, f"{r['predict']:.2f}", f"{r['predict'] / base:.2f}x",
                         f"{r['append']:.2f}"])
    body = ("Batch 1, CPU ms per call of this process (1 thread), median of "
            f"{args.rounds} interleaved rounds of {args.calls} calls; predict = a full context of "
            f"the trained length from the test split + kNN over the whole bank ({len(bank):,} "
            "concepts) + fusion; append = one new vector continuing a session. "
            "\"vs fastest member\" divides by the fastest member's predict.\n\n"
            + markdown_table(["model", "members", "predict ms", "vs fastest member",
                              "append ms"], rows))
    if args.smoke_test:
        print(body)
        return 0
    Path("runs/bench").mkdir(parents=True, exist_ok=True)
    Path("runs/bench/ensemble.json").write_text(json.dumps(raw, indent=2))
    write_section("ensemble", "Ensembles: per-query cost", body,
                  "python bench/bench_ensemble.py " + " ".join(f"--spec {s}" for s in args.spec))
    return 0


def _smoke_bank():
    from lvm_ray.data.synthetic import make_synthetic_bank

    return make_synthetic_bank(n_docs=30, doc_len=(40, 60), dim=32, seed=0)


def _smoke_assets() -> list[str]:
    """Two random-init checkpoints and a pair spec in a temporary directory."""
    import torch

    from lvm_ray.config import ModelConfig
    from lvm_ray.eval.ensemble import ensemble_document
    from lvm_ray.model import build_model
    from lvm_ray.train.checkpoint import save_checkpoint

    root = Path(tempfile.mkdtemp(prefix="bench_ensemble_"))
    members = []
    for i, kind in enumerate(("memory_gru", "gru")):
        cfg = ModelConfig(kind=kind, d_in=32, hidden=16, layers=1, slots=4)
        torch.manual_seed(i)
        p = save_checkpoint(root / kind, build_model(cfg), cfg, epoch=0, metrics={},
                            config={"window": {"context": 16}})
        members.append((kind, str(p)))
    doc = ensemble_document("pair", members, {"score": [0.5, 0.5], "rrf": [0.5, 0.5]},
                            {"score": 0.0, "rrf": 0.0}, "score")
    (root / "ensemble.json").write_text(json.dumps(doc))
    return [str(root)]


if __name__ == "__main__":
    sys.exit(main())
