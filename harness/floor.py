"""Serve's own floor for benchmarks: the topology of the hybrid app (HTTP proxy -> an ingress
replica -> a model replica) with no lvm_ray work in it. The ingress reads the body and, with
`?hops=model`, awaits one call of the model deployment that returns at once.

    serve.run(floor_app(), route_prefix="/floor")
    POST /floor/noop            proxy -> ingress
    POST /floor/noop?hops=model proxy -> ingress -> model
    gRPC lvm.LVM/Predict, metadata application=floor: gRPC proxy -> ingress
"""

from fastapi import FastAPI, HTTPException, Request
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

api = FastAPI()
# A sliver of CPU each: they must schedule beside the hybrid app at full scale on 2 cores.


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64)
class NoopModel:
    def noop(self) -> dict:
        return {}


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=256)
@serve.ingress(api)
class NoopRouter:
    def __init__(self, model: DeploymentHandle):
        self.model = model

    async def Predict(self, request):  # gRPC (lvm.proto), application "floor"
        from lvm_ray.serve.protos import lvm_pb2

        return lvm_pb2.Prediction()

    @api.post("/noop")
    async def noop(self, request: Request, hops: str = "router") -> dict:
        await request.body()
        if hops == "model":
            await self.model.noop.remote()
        elif hops != "router":
            raise HTTPException(422, "hops must be 'router' or 'model'")
        return {}


def floor_app() -> Application:
    return NoopRouter.bind(NoopModel.bind())
