"""A model deployment that can be made slow or failing through its user_config, for the tests of
the router's guardrail (rollback on P95 latency or error rate). Kept out of the product: the
served ModelServer has no fault knobs.

    import_path: harness.faults:build_app      # instead of lvm_ray.serve.app:build_app
    Phase3Model user_config: {inject_latency_ms: 80}   or   {inject_error_rate: 1.0}
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from ray.serve import Application

from lvm_ray.serve.app import make_app
from lvm_ray.serve.models import ModelServer


class FaultyModelServer(ModelServer):
    """ModelServer whose predict and append first sleep and/or fail, as the user_config says."""

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        uc = dict(user_config or {})
        self.latency_ms = float(uc.pop("inject_latency_ms", 0.0))
        self.error_rate = float(uc.pop("inject_error_rate", 0.0))
        super().reconfigure(uc)

    def info(self) -> dict[str, Any]:
        out = super().info()  # shows the knobs, so a deploy can wait until they are live
        out["user_config"] = {**out["user_config"], "inject_latency_ms": self.latency_ms,
                              "inject_error_rate": self.error_rate}
        return out

    async def _inject(self) -> None:
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        if self.error_rate > 0 and random.random() < self.error_rate:
            raise RuntimeError("injected failure (user_config inject_error_rate)")

    async def predict(self, *args, **kwargs) -> dict[str, Any]:
        await self._inject()
        return await super().predict(*args, **kwargs)

    async def append(self, *args, **kwargs) -> dict[str, Any]:
        await self._inject()
        return await super().append(*args, **kwargs)


def build_app(args: dict[str, Any]) -> Application:
    """The product's app with both model deployments replaced by FaultyModelServer."""
    return make_app(args, model_class=FaultyModelServer)
