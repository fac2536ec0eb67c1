"""The Ray Serve application: a model deployment behind a FastAPI ingress.

`build_app(args)` builds it from typed arguments. The deployment resolves `name@alias` (or a
pinned `name/version`) in the MLflow registry, downloads the model and runs the exported
program; requests are validated one by one (a bad sample gets a 4xx and never reaches the
batch), then batched with `@serve.batch`. This module never imports training code: it runs
what the registry holds.
"""

import asyncio
import tempfile
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from ray import serve

from indai.platform.config import Strict
from indai.platform.errors import UserError
from indai.platform.model_format import IndaiModel
from indai.platform.registry import download, parse_model_ref, resolve_version
from indai.serving.schemas import ErrorResponse, ModelInfo, PredictRequest, PredictResponse

MAX_BODY_BYTES = 16 * 1024 * 1024


class ServeArgs(Strict):
    model: str = Field(description="registered model to serve: name@alias or name/version")
    mlflow_uri: str = Field(description="MLflow tracking/registry server")
    name: str = Field(default="indai", description="Serve application name")
    route_prefix: str = Field(default="/", pattern=r"^/[A-Za-z0-9/_-]*$")
    num_replicas: int = Field(default=1, ge=1, le=64)
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs per replica")
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)


api = FastAPI(title="indai inference", version="1",
              description="Predictions from models registered in the indai registry (sensor, image and text inputs).")


@api.middleware("http")
async def limit_body(request: Request, call_next):
    """Refuse oversized bodies before they are read or parsed."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        return JSONResponse(status_code=413, content={"detail": f"request body is over the limit of {MAX_BODY_BYTES} bytes: send fewer instances per request"})
    return await call_next(request)


@serve.deployment
@serve.ingress(api)
class ModelServer:
    def __init__(self, args: dict):
        self.args = ServeArgs.model_validate(args)
        self.ref = parse_model_ref(self.args.model)
        self._tmp = tempfile.TemporaryDirectory(prefix="indai-serve-")
        folder, self.version = download(self.args.mlflow_uri, self.ref, self._tmp.name)
        self.model = IndaiModel.load(folder / "artifacts" / "indai_model")
        self.predict_batch.set_max_batch_size(self.args.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, prepared: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self.model.run, prepared)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": str(self.ref), "model_version": self.version}

    @api.get("/v1/model", response_model=ModelInfo)
    async def info(self) -> ModelInfo:
        c = self.model.card
        return ModelInfo(model=str(self.ref), model_version=self.version, modalities=c["modalities"],
                         classes=c["classes"], inputs=c["inputs"], dataset=c.get("dataset"))

    @api.post("/v1/predict", response_model=PredictResponse,
              responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
    async def predict(self, body: PredictRequest, request: Request):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            prepared = [self.model.prepare(inst.model_dump(exclude_none=True)) for inst in body.instances]
        except UserError as e:
            return JSONResponse(status_code=400, content={"detail": str(e), "request_id": request_id})
        results = await asyncio.gather(*(self.predict_batch(p) for p in prepared))
        return PredictResponse(request_id=request_id, model=str(self.ref), model_version=self.version, predictions=results)


def build_app(args: dict | ServeArgs) -> serve.Application:
    """Ray Serve app builder (usable from `serve run indai.serving.app:build_app model=...`)."""
    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    resolve_version(a.mlflow_uri, parse_model_ref(a.model))  # fail here, not in a replica loop
    return ModelServer.options(num_replicas=a.num_replicas, ray_actor_options={"num_cpus": a.num_cpus}).bind(a.model_dump())
