"""What one session append costs the causal Transformer at L = 100, 500, 1000, beside MemoryGRU.

A session has seen L vectors (L = the model's context) and appends one more. Three ways:
- transformer, recompute: what Serve does (lvm_ray.predictor): the signed session token carries
  the last L vectors and the model runs over the newest L again: O(L^2) attention, O(L) MLP;
- transformer, KV cache: the model's own continuation (TransformerLVM.forward(x, state)): one
  query against L cached keys, O(L) per append, but the cache would have to travel in the token;
- MemoryGRU step: the recurrent models' O(1) append, for reference.
Model work only (no kNN, no HTTP: those cost the same for every model; BENCHMARKS.md section serve
has them), CPU time of this process with one torch thread, median of interleaved rounds, at batch
1 and 16 sessions (Serve batches appends). Token: bytes of the state a session token must carry
(float32, before base64's 4/3). Sizes as trained in docs/results.md (random weights: speed does
not depend on them).

    python bench/bench_transformer.py              # writes the "transformer_append" section
    python bench/bench_transformer.py --smoke-test # tiny, seconds, writes nothing
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import markdown_table, write_section  # noqa: E402


def cpu_seconds(fn, n: int) -> float:
    c0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - c0) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-test", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from lvm_ray.config import ModelConfig
    from lvm_ray.model import build_model, count_parameters

    torch.set_num_threads(1)
    smoke = args.smoke_test
    d = 32 if smoke else 384
    tcfg = ModelConfig(kind="transformer", d_in=d, hidden=16 if smoke else 192, layers=2,
                       heads=2 if smoke else 4)
    gcfg = ModelConfig(kind="memory_gru", d_in=d, hidden=16 if smoke else 256, layers=1,
                       slots=4 if smoke else 32)
    torch.manual_seed(0)
    tr, gru = build_model(tcfg).eval(), build_model(gcfg).eval()
    lengths = (8, 16) if smoke else (100, 500, 1000)
    batches = (1, 4) if smoke else (1, 16)
    rounds = 2 if smoke else args.rounds
    results: dict[tuple, list[float]] = {}
    with torch.no_grad():
        for _ in range(rounds):  # interleaved: a burst of load hits every cell alike
            for b in batches:
                x1 = F.normalize(torch.randn(b, 1, d), dim=-1)
                for L in lengths:
                    hist = F.normalize(torch.randn(b, L, d), dim=-1)
                    window = torch.cat([hist[:, 1:], x1], dim=1)  # the newest L vectors
                    _, cache = tr(hist[:, 1:])  # L - 1 cached positions + the new one = L
                    n = 3 if L >= 500 else 10
                    results.setdefault(("recompute", b, L), []).append(
                        cpu_seconds(lambda: tr(window), n))
                    results.setdefault(("kv", b, L), []).append(
                        cpu_seconds(lambda: tr(x1, cache), 20))
                _, gstate = gru(F.normalize(torch.randn(b, 100, d), dim=-1))
                results.setdefault(("gru", b, 0), []).append(
                    cpu_seconds(lambda: gru(x1, gstate), 50))
    med = {k: 1000 * float(np.median(v)) for k, v in results.items()}
    rows = []
    for L in lengths:
        token_window = 4 * (L * d + d)
        token_kv = 4 * (2 * tcfg.layers * L * tcfg.hidden + d)
        for b in batches:
            rows.append([L, b, f"{med[('recompute', b, L)]:.2f}", f"{med[('kv', b, L)]:.2f}",
                         f"{med[('recompute', b, L)] / med[('kv', b, L)]:.1f}x",
                         f"{med[('gru', b, 0)]:.2f}", f"{token_window / 1024:.0f} kB",
                         f"{token_kv / 1024:.0f} kB"])
    gru_token = 4 * (gcfg.layers * gcfg.hidden + d)
    body = "\n".join([
        f"Transformer: hidden {tcfg.hidden}, {tcfg.layers} layers, {tcfg.heads} heads, d_in {d} "
        f"({count_parameters(tr):,} parameters); MemoryGRU: hidden {gcfg.hidden}, "
        f"{gcfg.layers} layer, {gcfg.slots} slots ({count_parameters(gru):,} parameters). "
        f"Milliseconds of CPU time per append (one torch thread, median of {rounds} interleaved "
        "rounds), model work only.", "",
        markdown_table(["L (vectors seen)", "sessions per batch", "transformer, recompute (ms)",
                        "transformer, KV cache (ms)", "recompute / KV", "MemoryGRU step (ms)",
                        "token: window", "token: KV cache"], rows), "",
        f"A MemoryGRU session token carries {gru_token / 1024:.1f} kB of state whatever L. Serve "
        "uses recompute for the transformer: its token carries the last L vectors (the KV cache "
        f"would be {2 * tcfg.layers * tcfg.hidden / d:.1f}x larger), and its answer equals a "
        "full-context predict at every length (tests/test_transformer.py)."])
    if smoke:
        print(body)
        return 0
    write_section("transformer_append", "Transformer session append (issue 14)", body,
                  "python bench/bench_transformer.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
