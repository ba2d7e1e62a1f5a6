"""An ensemble as a model deployment: one replica runs every member on one input and fuses their
neighbour lists (lvm_ray.serve.fusion). It is ModelServer with an EnsemblePredictor in place of
a Predictor, so it answers the router (predict, append, info) and serves direct session appends
exactly as ModelServer does, and the hybrid app serves an ensemble as Phase-2 or Phase-3:

    serve run serve_configs/ensemble.yaml     # phase2_checkpoint: an ensemble.json
    lvm serve serve_configs/ensemble.yaml

Each of `phase2_checkpoint` / `phase3_checkpoint` is an ensemble.json (`lvm evaluate --ensemble`
writes one, weights chosen on val) or a plain checkpoint directory (a one-member ensemble).
"""

from pathlib import Path
from typing import Any

from lvm_ray.serve.app import make_app
from lvm_ray.serve.fusion import EnsemblePredictor, read_spec
from lvm_ray.serve.models import ModelServer

ENSEMBLE_APP = "lvm_ray.serve.ensemble:build_app"


class EnsembleServer(ModelServer):
    """ModelServer over every member of an ensemble (or one checkpoint) + the concept bank."""

    @staticmethod
    def _open(checkpoint: str, bank: str, device: str, allow_bank_mismatch: bool, index: str,
              index_files: str | None) -> tuple[Any, str, str]:
        doc = read_spec(checkpoint)
        predictor = EnsemblePredictor.from_paths(
            checkpoint, bank, device, allow_bank_mismatch, index, build_index=False,
            index_files=index_files)
        # lanes.json sits next to a checkpoint's weights, and next to an ensemble.json (written
        # by `lvm evaluate --ensemble` for the fusion it serves).
        local = Path(checkpoint)
        lanes_dir = (doc["members"][0]["checkpoint"] if len(doc["members"]) == 1
                     and local.is_dir() else (local if local.is_dir() else local.parent))
        return predictor, predictor.fingerprint, str(lanes_dir)

    def info(self) -> dict[str, Any]:
        i = self.predictor.info()
        return {**super().info(),
                "ensemble": {k: i[k] for k in ("ensemble", "fusion", "weights", "members")}}


def build_app(args: dict[str, Any]):
    """The hybrid app with EnsembleServer for both models: what serve_configs/ensemble.yaml
    imports. Same args as lvm_ray.serve.app:build_app; each checkpoint may be an ensemble.json."""
    return make_app(args, model_class=EnsembleServer)
