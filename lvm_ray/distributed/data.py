"""Ray Data adapter for ingest: the embedding stage as map_batches over encoder actors.

The core plans the work (documents, chunks, what is already cached) and writes the cache and the
bank; Ray Data only runs the encoder over the pending chunks in parallel, so a cluster embeds a
large corpus on every node and a re-run encodes only what is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lvm_ray.config import Config, EncoderConfig
from lvm_ray.data.ingest import IngestResult, finish_ingest, group_vectors, plan_ingest


class EncodeBatch:
    """A Ray Data actor: loads the encoder once, then embeds batches of chunk texts."""

    def __init__(self, encoder_cfg: EncoderConfig, threads: int = 1):
        import torch

        from lvm_ray.data.encoders import get_encoder

        # One intra-op thread per CPU the actor owns: oversubscribed OpenMP threads spin.
        torch.set_num_threads(max(1, threads))
        self.encoder = get_encoder(encoder_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.encoder.encode(list(batch["text"]), batch_size=len(batch["text"]))
        return {"doc_id": batch["doc_id"], "position": batch["position"], "vector": vectors}


def ingest_with_ray(cfg: Config, out_path: str | Path, num_encoders: int | None = None,
                    batch_size: int | None = None) -> IngestResult:
    """Like lvm_ray.data.ingest.ingest, with the encoding fanned out over Ray Data actors."""
    import ray
    import ray.data

    plan = plan_ingest(cfg.corpus, cfg.encoder, cfg.split, out_path, show_progress=True)
    if plan.reuse_bank or not plan.todo:
        return finish_ingest(plan, {})
    pending = plan.pending_chunks()
    n = len(pending["text"])
    cpus = int(ray.cluster_resources().get("CPU", 1))
    num_encoders = num_encoders or max(1, min(cpus, 8))
    batch_size = batch_size or cfg.encoder.batch_size
    ds = ray.data.from_items([
        {"doc_id": d, "position": p, "text": t}
        for d, p, t in zip(pending["doc_id"], pending["position"], pending["text"])
    ], override_num_blocks=max(num_encoders, n // (batch_size * 8) or 1))
    encoded = ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"encoder_cfg": cfg.encoder,
                               "threads": max(1, cpus // num_encoders)},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_encoders),
        num_cpus=max(0.5, cpus / num_encoders) if cpus >= num_encoders else 1,
        batch_format="numpy",
    )
    doc_ids, positions, vectors = [], [], []
    for b in encoded.iter_batches(batch_size=4096, batch_format="numpy"):
        doc_ids.extend(b["doc_id"].tolist())
        positions.extend(b["position"].tolist())
        vectors.append(np.asarray(b["vector"], dtype=np.float32))
    return finish_ingest(plan, group_vectors(doc_ids, positions, np.concatenate(vectors)))
