"""Ray Data adapter for ingest: the sharded ingest of lvm_ray.data.shards on a cluster.

The core plans and checks; Ray Data only runs its per-partition steps in parallel:

    partitions (driver: file names, Parquet footers, JSONL newline offsets)
      -> map_batches(survey) on CPU tasks: read + chunk each partition, return counts and keys
      -> plan_shards (driver: ids, splits, dense concept-id offsets; shards already written)
      -> map_batches(ShardWriter) on encoder actors (a GPU each when the cluster has them):
         read + chunk + encode one partition and write its Parquet shard
      -> finish_shards (driver: content hash shard by shard, manifest)

No step holds the documents on the driver, and a re-run keeps every shard already written.
The corpus path and the bank directory must be readable and writable from every node (shared
storage) when the cluster has more than one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from lvm_ray.config import Config, CorpusConfig, EncoderConfig
from lvm_ray.data.corpus import Partition, partitions
from lvm_ray.data.encoders import get_encoder
from lvm_ray.data.ingest import IngestResult, cache_dir_for
from lvm_ray.data.shards import (ShardPlan, Survey, finish_shards, log_plan, plan_shards,
                                 prepare_out_dir, survey, survey_corpus, write_shard)

log = logging.getLogger(__name__)
PROGRESS_SLICE = 4096  # texts per encode call inside a shard
PROGRESS_SECONDS = 15.0  # at most one progress line per actor this often


def _survey_batch(batch: dict[str, np.ndarray], corpus: CorpusConfig,
                  encoder: EncoderConfig) -> dict[str, np.ndarray]:
    out = [json.dumps(survey(corpus, encoder, Partition(**json.loads(p))).to_dict())
           for p in batch["part"]]
    return {"survey": np.array(out, dtype=object)}


class ShardWriter:
    """A Ray Data actor: loads the encoder once, then writes whole shards."""

    def __init__(self, corpus: CorpusConfig, encoder: EncoderConfig, meta: dict, out_dir: str,
                 threads: int = 1):
        import torch

        # One intra-op thread per CPU the actor owns: oversubscribed OpenMP threads spin.
        torch.set_num_threads(max(1, threads))
        self.corpus, self.meta, self.out_dir = corpus, meta, out_dir
        self.shard = -1  # the shard being written (progress lines name it)
        self.batch_size = encoder.batch_size
        # An exported backend (encoder.backend onnx...) is cached beside the bank's other caches.
        self.encoder = get_encoder(encoder, export_root=cache_dir_for(out_dir) / "encoders")

    def encode(self, texts: list[str]) -> np.ndarray:
        # In slices, printing progress: a shard can take minutes on a CPU, and the driver only
        # hears of it when it is written (Ray forwards an actor's stdout to the driver).
        if not texts:
            return self.encoder.encode(texts, batch_size=self.batch_size)
        step, out, last = max(self.batch_size, PROGRESS_SLICE), [], time.monotonic()
        for i in range(0, len(texts), step):
            out.append(self.encoder.encode(texts[i:i + step], batch_size=self.batch_size))
            done = min(i + step, len(texts))
            if done < len(texts) and time.monotonic() - last >= PROGRESS_SECONDS:
                print(f"shard {self.shard}: encoded {done:,} / {len(texts):,} chunks", flush=True)
                last = time.monotonic()
        return np.concatenate(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for s in batch["shard"]:
            plan = ShardPlan.from_dict(json.loads(s))
            self.shard = plan.index
            rows.append(write_shard(self.corpus, plan, self.meta, self.out_dir,
                                    self.encode)["rows"])
        return {"rows": np.array(rows, dtype=np.int64)}


def ingest_with_ray(cfg: Config, out_path: str | Path, num_encoders: int | None = None,
                    overwrite: bool = False) -> IngestResult:
    """lvm_ray.data.shards.ingest_sharded with the surveys on Ray tasks and the encoding on an
    actor pool: writes (or resumes, or reuses) the sharded bank directory at out_path."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    out_path = Path(out_path)
    parts = partitions(cfg.corpus, cfg.corpus.docs_per_shard)

    def survey_many(ps: list[Partition]) -> list[Survey]:
        ds = ray.data.from_items([{"part": json.dumps(p.to_dict())} for p in ps],
                                 override_num_blocks=len(ps))
        out = ds.map_batches(_survey_batch, batch_size=1, batch_format="numpy",
                             fn_kwargs={"corpus": cfg.corpus, "encoder": cfg.encoder})
        return [Survey.from_dict(json.loads(s))
                for b in out.iter_batches(batch_size=256, batch_format="numpy")
                for s in b["survey"]]

    plan = plan_shards(cfg.corpus, cfg.encoder, cfg.split, out_path,
                       survey_corpus(cfg.corpus, parts, survey_many), overwrite)
    log_plan(plan)
    todo = plan.todo
    if todo:
        prepare_out_dir(plan)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        gpus = int(ray.cluster_resources().get("GPU", 0))
        on_gpu = gpus > 0 and cfg.encoder.device in ("auto", "cuda")
        num_encoders = min(len(todo), num_encoders or (gpus if on_gpu else max(1, min(cpus, 8))))
        ds = ray.data.from_items([{"shard": json.dumps(s.to_dict())} for s in todo],
                                 override_num_blocks=len(todo))
        written = ds.map_batches(
            ShardWriter, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"corpus": cfg.corpus, "encoder": cfg.encoder,
                                   "meta": plan.meta, "out_dir": str(out_path),
                                   "threads": max(1, cpus // num_encoders)},
            compute=ray.data.ActorPoolStrategy(size=num_encoders),
            num_cpus=1 if on_gpu else max(0.5, cpus / num_encoders) if cpus >= num_encoders
            else 1,
            num_gpus=1 if on_gpu else 0)
        done = 0
        for b in written.iter_batches(batch_size=1, batch_format="numpy"):
            done += int(b["rows"].sum())
            log.info("encoded %d / %d chunks", done, sum(s.rows for s in todo))
    return finish_shards(plan)
