"""Ray Data adapter for ingest: the embedding stage as map_batches over encoder actors.

The core plans the work (documents, chunks, what is already cached) and writes the cache and the
bank; Ray Data only runs the encoder over the pending chunks in parallel, so a cluster embeds a
large corpus on every node and a re-run encodes only what is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lvm_ray.config import Config, EncoderConfig
from lvm_ray.data.bank import BankError, ConceptBank, check_schema, from_table
from lvm_ray.data.encoders import get_encoder
from lvm_ray.data.ingest import IngestResult, finish_ingest, group_vectors, plan_ingest


class EncodeBatch:
    """A Ray Data actor: loads the encoder once, then embeds batches of chunk texts."""

    def __init__(self, encoder_cfg: EncoderConfig, threads: int = 1,
                 export_root: str | None = None):
        import torch

        # One intra-op thread per CPU the actor owns: oversubscribed OpenMP threads spin.
        torch.set_num_threads(max(1, threads))
        self.encoder = get_encoder(encoder_cfg, export_root=export_root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.encoder.encode(list(batch["text"]), batch_size=len(batch["text"]))
        return {"doc_id": batch["doc_id"], "position": batch["position"], "vector": vectors}


def ingest_with_ray(cfg: Config, out_path: str | Path, num_encoders: int | None = None,
                    batch_size: int | None = None, overwrite: bool = False) -> IngestResult:
    """Like lvm_ray.data.ingest.ingest, with the encoding fanned out over Ray Data actors."""
    import ray
    import ray.data

    plan = plan_ingest(cfg.corpus, cfg.encoder, cfg.split, out_path, show_progress=True,
                       overwrite=overwrite)
    if plan.reuse_bank or not plan.todo:
        return finish_ingest(plan, {})
    pending = plan.pending_chunks()
    n = len(pending["text"])
    # Length-sorted, so each batch pads to similar lengths (sentence-transformers sorts inside
    # one encode call; Ray Data batches would otherwise mix short and long sentences). Rows are
    # put back in document order by group_vectors.
    order = sorted(range(n), key=lambda i: len(pending["text"][i]))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    num_encoders = num_encoders or max(1, min(cpus, 8))
    batch_size = batch_size or cfg.encoder.batch_size
    ds = ray.data.from_items([
        {"doc_id": pending["doc_id"][i], "position": pending["position"][i],
         "text": pending["text"][i]} for i in order
    ], override_num_blocks=max(num_encoders, n // (batch_size * 8) or 1))
    encoded = ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"encoder_cfg": cfg.encoder,
                               "export_root": str(plan.cache_dir / "encoders"),
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


def read_bank_with_ray(path: str | Path) -> ConceptBank:
    """The training job's read of the concept bank: `ray.data.read_parquet`, so the read runs as
    Ray tasks on the cluster (any filesystem Ray Data reads). The schema is checked before any
    value is read (no extension types: see check_schema), and rows are put back in concept_id
    order, since read tasks may finish in any order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data

    try:
        schema = pq.read_schema(str(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise BankError(f"{path}: not a readable Parquet concept bank: {e}") from e
    check_schema(schema)
    ds = ray.data.read_parquet(str(path))
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    if "concept_id" in table.column_names:
        table = table.sort_by("concept_id")
    # Ray Data keeps the columns, not the file's schema metadata (split and encoder provenance).
    return from_table(table.replace_schema_metadata(schema.metadata))
