"""The consortium's shared inference service on Ray Serve.

Two deployments:
- `Ingress` (FastAPI): authenticates the member's API token, checks that the member may call
  the model (by the platform database's rule: private to its owner, shared with named members,
  or consortium-wide; a model without a rule is served to admins only), applies a
  per-member rate limit, resolves `name@alias` to the version the platform promoted it to
  (platform/promotion.py; re-read every few seconds, so `indai model promote` moves traffic
  without a restart, and a job moving the registry's alias moves nothing), serves a `name/version`
  to members only if it was promoted, has the pool check the promoted files' digest, and meters
  every call in batches (serving never waits on the database). While the database
  or MLflow is away, what was looked up recently stands in (platform/recent.py), and MLflow
  requests are bounded (`registry_timeout_s`), so no member's call hangs on them. `POST /v1/feedback`
  stores a member's rating of a prediction by its request id.
- `ModelPool`: loads registered models by resolved version, several per replica
  (`serve.multiplexed`, least recently used dropped), validates each instance against the
  model's card (a bad instance is a 400, never a crash), and batches instances across
  requests (`serve.batch`), grouped by model.
This module never imports training code: it runs what the registry holds.
"""

import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError
from ray import serve
from starlette.datastructures import Headers

from indai.platform.config import Strict
from indai.platform.errors import UserError
from indai.platform.modalities import MAX_REQUEST_PIXELS, check_request_pixels
from indai.platform.recent import Recent, SourceAway
from indai.serving.schemas import (ErrorResponse, FeedbackRequest, FeedbackResponse, ModelInfo, ModelListing, PredictRequest,
                                   PredictResponse)

MAX_BODY_BYTES = 16 * 1024 * 1024
# models held per pool replica; set by build_app through the replica's environment, because
# serve.multiplexed takes its bound when the class is defined
MAX_MODELS = int(os.environ.get("INDAI_SERVE_MAX_MODELS", "4"))
# the visibility of a registered model the platform database holds no access rule for: served to
# admins only, until `indai model share` records its owner
UNASSIGNED = "unassigned"


class ServeArgs(Strict):
    model: str | None = Field(default=None, description="default model of requests that name none: name@alias or name/version")
    mlflow_uri: str = Field(description="MLflow tracking/registry server")
    registry_wait_s: float = Field(default=0.0, ge=0, le=3600, description="how long the app's build tries again while MLflow "
                                   "refuses its credentials (the chart sets 300: it makes the serving user after each install and upgrade)")
    db_url: str | None = Field(default=None, description="platform database (tokens, model access, metering); "
                                                         "default INDAI_DB_URL, else the embedded default's SQLite file")
    name: str = Field(default="indai", description="Serve application name")
    route_prefix: str = Field(default="/", pattern=r"^/[A-Za-z0-9/_-]*$")
    ingress_replicas: int = Field(default=1, ge=1, le=64)
    num_replicas: int = Field(default=1, ge=1, le=64, description="model pool replicas (without autoscaling)")
    autoscaling: dict | None = Field(default=None, description="Ray Serve autoscaling_config of the model pool, e.g. "
                                                               "{min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}")
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs per model pool replica")
    max_models_per_replica: int = Field(default=4, ge=1, le=64)
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_request_pixels: int = Field(default=MAX_REQUEST_PIXELS, ge=1, description="pixels all the images of one request may "
                                    "declare together (checked from their headers before any is decoded)")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)
    pool_max_ongoing: int = Field(default=64, ge=1, le=10_000, description="requests a pool replica takes at once "
                                                                          "(at least max_batch_size, or batches never fill)")
    ingress_max_ongoing: int = Field(default=256, ge=1, le=10_000)
    max_queued_requests: int = Field(default=1000, ge=-1, description="requests waiting for a replica before new ones get 503 "
                                                                    "(backpressure instead of collapse; -1: unbounded)")
    rate_per_s: float = Field(default=200, ge=0, description="calls per second per member on each ingress replica (0: no limit)")
    burst: float = Field(default=400, ge=1)
    resolve_ttl_s: float = Field(default=2.0, ge=0, le=300, description="how long an alias resolution, an access rule and the "
                                 "model list are reused before a call looks them up again")
    registry_timeout_s: int = Field(default=5, ge=1, le=300, description="seconds the ingress and the model pool wait for one "
                                    "answer from MLflow; they do not send again (MLflow's own default is 120 s and 7 retries, "
                                    "minutes in which a member's call would hang)")
    registry_grace_s: float = Field(default=300.0, ge=0, le=3600, description="while MLflow is unreachable, the model list "
                                    "and registered-model checks confirmed less than this long ago keep being used")
    token_recheck_s: float = Field(default=2.0, ge=0, le=300, description="a revoked token is refused within this time")
    db_grace_s: float = Field(default=300.0, ge=0, le=3600, description="while the platform database is unreachable, tokens, "
                                                                        "access rules and promotions (aliases) checked less than this "
                                                                        "long ago keep working")
    db_timeout_s: float = Field(default=5.0, ge=1, le=300, description="seconds the ingress waits for one answer from the "
                                "platform database (a token's first check, an access rule, a batch of metered calls) before it "
                                "gives that connection up; a server that stops answering mid-statement would otherwise hold them")
    meter_flush_s: float = Field(default=1.0, gt=0, le=60)


# bodies that routes read themselves, after the token check (read_body): FastAPI does not see them as
# parameters, so the OpenAPI document gets their schemas from here (and each route's openapi_extra)
BODY_MODELS = (PredictRequest, FeedbackRequest)


def body_doc(model) -> dict:
    """The OpenAPI requestBody of a route that reads `model` from its body itself."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def body_schemas() -> dict:
    """The OpenAPI component schemas of BODY_MODELS (and the models they use), made by FastAPI's own
    generator from routes that take them as parameters, so they read exactly as if the real routes did."""
    from fastapi.openapi.utils import get_openapi
    from fastapi.routing import APIRoute

    def taking(model):
        async def endpoint(body: model):  # never served: only its signature is read
            return None
        return APIRoute(f"/{model.__name__}", endpoint, methods=["POST"])

    doc = get_openapi(title="body schemas", version="0", routes=[taking(m) for m in BODY_MODELS])
    return doc["components"]["schemas"]


class IngressAPI(FastAPI):
    def openapi(self) -> dict:
        if self.openapi_schema is None:
            doc = super().openapi()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in body_schemas().items():
                schemas.setdefault(name, schema)
        return self.openapi_schema


# Everything on `api` must be set before `Ingress` is defined: serve.ingress freezes a copy of the app.
api = IngressAPI(title="indai inference", version="2",
                 description="Predictions from models registered in the indai registry (sensor, image and text inputs), "
                             "for consortium members with an API token (`Authorization: Bearer <token>`).")


class BodyTooLarge(Exception):
    """Raised into the app by BodyLimit's receive once the body read passes the limit."""


def too_large() -> JSONResponse:
    return JSONResponse(status_code=413, content={"detail": f"request body is over the limit of {MAX_BODY_BYTES} bytes "
                                                            f"({MAX_BODY_BYTES // (1024 * 1024)} MiB): send fewer instances per request"})


class BodyLimit:
    """No request body over MAX_BODY_BYTES gets into the app. A Content-Length over the limit is
    refused before anything is read; but a chunked request has no Content-Length (and a header can
    be wrong), so the bytes are also counted as the app receives them, and once they pass the limit
    the app's receive raises and the answer is 413, whatever the app would have answered. A plain
    ASGI middleware: it sees the receive channel itself, which Starlette's http middleware does not."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            await too_large()(scope, receive, send)
            return
        read, over, started = 0, False, False

        async def counted_receive():
            nonlocal read, over
            if over:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > MAX_BODY_BYTES:
                    over = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if over:  # what the app answers to a body cut short (a 400 from FastAPI's parser, say) is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            if started:
                raise
        if over and not started:
            await too_large()(scope, receive, send)


api.add_middleware(BodyLimit)

MAX_ERRORS_SHOWN = 20


def _loc_part(part):
    # a location names the fields of the input, and a key of the input is the caller's text: keep it short
    return part if not isinstance(part, str) or len(part) <= 64 else part[:64] + "..."


async def validation_failed(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 that says where and what, but never echoes the input: FastAPI's default answer carries
    each error's `input`, so a large bad body came back as an equally large answer."""
    errors = exc.errors()
    shown = [{"loc": [_loc_part(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))[:500], "type": e.get("type", "")}
             for e in errors[:MAX_ERRORS_SHOWN]]
    content = {"detail": shown, "hint": "the request does not match the schema: fix the field named by each error's loc "
                                        "(the schemas are in this service's OpenAPI document, /openapi.json)"}
    if len(errors) > MAX_ERRORS_SHOWN:
        content["more_errors"] = len(errors) - MAX_ERRORS_SHOWN
    return JSONResponse(status_code=422, content=content)


api.add_exception_handler(RequestValidationError, validation_failed)


async def read_body(request: Request, model):
    """The request's JSON body validated as `model`. Routes call it after the token check, so the
    body of a caller without a valid token is never read or parsed; BodyLimit caps what is read.
    A body that does not fit is a RequestValidationError (422, see validation_failed)."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors(include_url=False, include_input=False, include_context=False)]) from None


class Refused(Exception):
    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


# what a member reads while MLflow is away or refuses the serving service's account: the details
# (address, account) go to the replica's log, for the admin
REGISTRY_AWAY = "the model registry did not answer: retry later"
REGISTRY_REFUSED = ("the model registry refused the serving service's credentials: retry later, and tell the platform admin "
                    "if it lasts")


def registry_away(e: Exception) -> SourceAway | None:
    """A failure that is not about the request as SourceAway: MLflow unreachable, timing out,
    answering 5xx, or refusing the service's own credentials, whether raw (an MlflowException)
    or already named by indai.platform.registry (RegistryAway, RegistryRefused); None for any other."""
    from mlflow.exceptions import MlflowException

    from indai.platform.registry import RegistryAway, RegistryRefused, short_cause, tracking_server_away

    raw = isinstance(e, MlflowException)
    if isinstance(e, RegistryRefused) or (raw and e.get_http_status_code() == 401):
        message = REGISTRY_REFUSED
    elif isinstance(e, RegistryAway) or tracking_server_away(e):
        message = REGISTRY_AWAY
    else:
        return None
    return SourceAway(message, f"MLflow: {short_cause(e)}" if raw else str(e))


def is_admin(p) -> bool:
    """Whether a principal acts as an admin: the role and the scope both (an admin may narrow a token,
    e.g. to models:predict, to get what a consumer of the admin's member gets, no more; the role is
    checked too, so the old tokens of a user no longer admin lose it at once)."""
    return p.role == "admin" and "admin" in p.scopes


def parsed_model_ref(text: str):
    """A request's model reference, checked (registry.parse_model_ref) before it reaches the
    database or the registry; a bad one is a 400 that says what is wrong."""
    from indai.platform.registry import parse_model_ref

    try:
        return parse_model_ref(text)
    except UserError as e:
        raise Refused(400, str(e)) from None


def fetch_model_files(mlflow_uri: str, model_id: str, dest: str):
    """Download a pool's model into `dest` and return its folder. The id is `name/version`, or
    `name/version#<sha256>` (the ingress's id of a promoted version), whose files must hash to that
    digest (promotion.ModelAltered otherwise, and nothing is loaded)."""
    from indai.platform.promotion import DIGEST_RE, check_digest
    from indai.platform.registry import download, parse_model_ref

    ref_text, _, digest = model_id.partition("#")
    if digest and not DIGEST_RE.fullmatch(digest):
        raise UserError(f"model id {model_id!r}: the part after '#' must be a sha256 in hex")
    folder, _ = download(mlflow_uri, parse_model_ref(ref_text), Path(dest))
    if digest:
        check_digest(folder, digest, f"model {ref_text}")
    return folder


@serve.deployment
class ModelPool:
    def __init__(self, args: dict):
        self.args = ServeArgs.model_validate(args)
        self._tmp = tempfile.TemporaryDirectory(prefix="indai-serve-")
        self.run_batch.set_max_batch_size(self.args.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS)
    async def get_model(self, model_id: str):
        from indai.platform.model_format import IndaiModel

        folder = await asyncio.to_thread(fetch_model_files, self.args.mlflow_uri, model_id, tempfile.mkdtemp(dir=self._tmp.name))
        return await asyncio.to_thread(IndaiModel.load, folder / "artifacts" / "indai_model")

    async def _loaded(self, model_id: str):
        """(the model, None), or (None, {"error": ..., "status": ...}) when it cannot be loaded: 503
        while MLflow is away or refuses the pool's account, 404 for a version that is not there, 502
        for a promoted version whose files changed since."""
        from indai.platform.promotion import ModelAltered
        from indai.platform.registry import ModelMissing

        try:
            return await self.get_model(model_id), None
        except ModelAltered as e:  # the details for the admins' log; the member is told it is not served
            print(f"[indai] refused to load {model_id}: {e}", file=sys.stderr, flush=True)
            return None, {"error": f"model {model_id.partition('#')[0]} is not served: its files in the registry differ from "
                                   "the ones promoted; the platform's admins can see why in the serving log", "status": 502}
        except ModelMissing:
            name, _, version = model_id.partition("#")[0].rpartition("/")
            return None, {"error": f"model {name} has no version {version} in the registry: GET /v1/models lists the models "
                                   "you may call", "status": 404}
        except Exception as e:  # the version's lookup, or its files' download
            if (away := registry_away(e)) is None:
                raise
            print(f"[indai] loading {model_id}: {away.detail}", file=sys.stderr, flush=True)
            return None, {"error": str(away), "status": 503}

    async def card(self) -> dict:
        """The model's card, or {"error": ..., "status": ...}."""
        model, failed = await self._loaded(serve.get_multiplexed_model_id())
        return failed or model.card

    async def predict(self, instances: list[dict]) -> dict:
        """{"predictions": [...]}, or {"error": "...", "status": ...} (a bad instance fails the request, 400)."""
        model_id = serve.get_multiplexed_model_id()
        model, failed = await self._loaded(model_id)
        if failed:
            return failed
        try:
            # Decoding images is CPU work of up to seconds per request: in a thread, so the replica's
            # event loop goes on taking calls and filling batches meanwhile. This is safe with the
            # batching: prepare only reads the card and returns new arrays (run_batch, which runs in
            # threads too, shares nothing with it), and run_batch is entered from the loop afterwards.
            prepared = await asyncio.to_thread(self._prepare, model, instances)
        except UserError as e:
            return {"error": str(e)}
        return {"predictions": list(await asyncio.gather(*(self.run_batch(model_id, p) for p in prepared)))}

    def _prepare(self, model, instances: list[dict]) -> list[dict]:
        if "image" in model.modalities:  # (a model without images refuses them in prepare, before decoding)
            check_request_pixels([i.get("image") for i in instances if isinstance(i, dict)], self.args.max_request_pixels,
                                 model.card.get("inputs", {}).get("image", {}).get("size"))
        return [model.prepare(i) for i in instances]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run_batch(self, model_ids: list[str], prepared: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(prepared)
        for mid in dict.fromkeys(model_ids):  # one forward per model in the batch
            idx = [i for i, m in enumerate(model_ids) if m == mid]
            model = await self.get_model(mid)
            for i, r in zip(idx, await asyncio.to_thread(model.run, [prepared[i] for i in idx])):
                out[i] = r
        return out


@serve.deployment
@serve.ingress(api)
class Ingress:
    models_page = 1000  # registered models read per MLflow request for GET /v1/models

    def __init__(self, pool, args: dict):
        from indai.platform import db, tenancy
        from indai.serving.metering import Meter, RateLimiter

        self.pool = pool
        self.args = ServeArgs.model_validate(args)
        self.eng = db.engine(self.args.db_url or db.database_url(), query_timeout_s=self.args.db_timeout_s)
        # what each call looks up, kept for a few seconds and standing in while its source is away (platform/recent.py)
        said = lambda line: print(f"[indai] {line}", file=sys.stderr, flush=True)  # noqa: E731 (the replica's log)
        self.tokens = tenancy.TokenCache(self.eng, recheck_s=self.args.token_recheck_s, grace_s=self.args.db_grace_s, log=said)
        self.meter = Meter(self.eng, flush_s=self.args.meter_flush_s)
        self.limits = RateLimiter(self.args.rate_per_s, self.args.burst)
        self.rules = Recent(lambda name, _: self._lookup_rule(name), self.args.resolve_ttl_s, self.args.db_grace_s, log=said)
        self.versions = Recent(lambda text, _: self._lookup_version(text), self.args.resolve_ttl_s, self.args.db_grace_s, log=said)
        self.names = Recent(lambda _all, _: self._lookup_names(), self.args.resolve_ttl_s, self.args.registry_grace_s, log=said)
        self.promoted = Recent(lambda _all, _: self._lookup_promoted(), self.args.resolve_ttl_s, self.args.db_grace_s, log=said)
        self.pool_retries = 0  # calls sent again because the pool replica that had them died

    # -- who is asking, may they, which version -----------------------------------------

    def _principal(self, request: Request, scope: str):
        from indai.platform import tenancy

        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        try:
            p = self.tokens.verify(token)
            p.require(scope)
            return p
        except tenancy.DatabaseDown as e:
            raise Refused(503, str(e)) from None
        except tenancy.AuthError as e:
            raise Refused(401 if "scope" not in str(e) else 403, str(e)) from None

    def _rule(self, name: str) -> dict | None:
        """The model's access rule from the platform database; a registered model without one is
        `unassigned` (admins only); None if the model is not registered at all. Registry tags are
        never read for access: every job writes the registry with one account, so a tag naming a
        model's owner may have been written by another member's job."""
        try:
            return self.rules.get(name)
        except SourceAway as e:
            raise Refused(503, str(e)) from None

    def _lookup_rule(self, name: str) -> dict | None:
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError
        from sqlalchemy.orm import Session

        from indai.platform import db
        from indai.platform.db import ModelAccess
        from indai.platform.registry import client

        try:
            with Session(self.eng) as s:
                row = s.get(ModelAccess, name)
        except SQLAlchemyError as e:
            raise db.unavailable(e) from None
        if row:
            return {"owner": row.owner_member_id, "visibility": row.visibility, "process": row.process,
                    "shared_with": set(row.shared_members)}
        try:
            client(self.args.mlflow_uri).get_registered_model(name)
        except MlflowException as e:
            if (away := registry_away(e)) is not None:
                raise away from None
            return None  # no such model (404); under MLflow's auth also a 403, which it answers before it looks
        return {"owner": "", "visibility": UNASSIGNED, "process": "", "shared_with": set()}

    def _check_access(self, p, name: str) -> dict:
        rule = self._rule(name)
        if rule is None:
            raise Refused(404, f"model {name!r} is not registered: GET /v1/models lists the models you may call")
        if is_admin(p) or rule["visibility"] == "consortium" or p.member == rule["owner"] or \
                (rule["visibility"] == "shared" and p.member in rule["shared_with"]):
            return rule
        if rule["visibility"] == UNASSIGNED:
            raise Refused(403, f"model {name!r} has no owner in the platform yet: an admin records it with `indai model "
                               f"share {name} --owner <member>`, and it is then served to that member")
        raise Refused(403, f"model {name!r} belongs to another member and is not shared with {p.member}: ask its owner to share it")

    def _version(self, p, text: str) -> tuple[str, int, str]:
        """(name, version, the pool's model id) of a reference the principal may call: an alias as
        the platform promoted it (platform/promotion.py), never as the registry's alias says; a
        version only if it was promoted, except for admins (to try one before promoting it). The
        model id carries the promoted files' digest, which the pool checks before loading."""
        ref = parsed_model_ref(text)
        try:
            version, digest = self.versions.get(str(ref))
        except SourceAway as e:
            raise Refused(503, str(e)) from None
        if digest is None and not is_admin(p):
            raise Refused(403, f"version {version} of model {ref.name} is not promoted: members are served promoted versions "
                               f"only (an admin runs `indai model promote {ref.name}/{version} --alias <alias>`)")
        return ref.name, version, f"{ref.name}/{version}" + (f"#{digest}" if digest else "")

    def _lookup_version(self, text: str) -> tuple[int, str | None]:
        """(version, recorded digest or None) from the platform database."""
        from sqlalchemy.exc import SQLAlchemyError

        from indai.platform import db, promotion

        ref = parsed_model_ref(text)
        try:
            version = ref.version if ref.alias is None else promotion.alias_version(self.eng, ref.name, ref.alias)
            if version is None:
                raise Refused(404, f"model {ref.name} has no promoted alias {ref.alias}: GET /v1/models lists the models you may "
                                   "call with their aliases (an admin promotes one with `indai model promote`)")
            return version, promotion.version_digest(self.eng, ref.name, version)
        except SQLAlchemyError as e:
            raise db.unavailable(e) from None

    def _lookup_names(self) -> list[str]:
        from mlflow.exceptions import MlflowException

        from indai.platform.registry import client

        c, names, page = client(self.args.mlflow_uri), [], None
        try:
            while True:  # (MLflow's client answers 100 a page unless told, and at most 1000)
                got = c.search_registered_models(max_results=self.models_page, page_token=page)
                names += [m.name for m in got]
                if not (page := got.token):
                    return sorted(names)
        except MlflowException as e:
            if (away := registry_away(e)) is not None:
                raise away from None
            raise

    def _lookup_promoted(self) -> dict[str, dict[str, int]]:
        from sqlalchemy.exc import SQLAlchemyError

        from indai.platform import db, promotion

        try:
            return promotion.promoted_aliases(self.eng)
        except SQLAlchemyError as e:
            raise db.unavailable(e) from None

    def _model_ref(self, given: str | None) -> str:
        ref = given or self.args.model
        if not ref:
            raise Refused(400, "name the model: {\"model\": \"name@alias\", \"instances\": [...]} (GET /v1/models lists them)")
        return ref

    async def _ask_pool(self, model_id: str, method: str, *args):
        """Call a model pool method. If the replica that took the call dies (killed, out of memory),
        the call is sent once more, and Serve routes it to another replica: pool calls have no side
        effects, so this cannot do anything twice. A second death is a 503, which clients retry."""
        from ray.exceptions import RayActorError

        for attempt in (1, 2):
            try:
                return await getattr(self.pool.options(multiplexed_model_id=model_id), method).remote(*args)
            except RayActorError:
                if attempt == 2:
                    raise Refused(503, "the model replica serving this request stopped: retry") from None
                self.pool_retries += 1

    def _error(self, e: Refused, request_id: str) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(status_code=e.status, content={"detail": e.detail, "request_id": request_id}, headers=headers)

    # -- endpoints ------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "metering": self.meter.stats(), "pool_retries": self.pool_retries,
                "lookups": {"tokens": self.tokens.stats(), "access": self.rules.stats(), "versions": self.versions.stats(),
                            "models": self.names.stats(), "promoted": self.promoted.stats()}}

    @api.get("/v1/models", response_model=ModelListing, responses={401: {"model": ErrorResponse}})
    async def models(self, request: Request):
        try:
            p = await asyncio.to_thread(self._principal, request, "models:predict")
        except Refused as e:
            return self._error(e, "")
        try:
            names = await asyncio.to_thread(self.names.get, "")
            promoted = await asyncio.to_thread(self.promoted.get, "")
        except SourceAway as e:
            return self._error(Refused(503, str(e)), "")
        visible = []
        for name in sorted(names):
            try:
                rule = await asyncio.to_thread(self._check_access, p, name)
                visible.append({"model": name, "owner": rule["owner"], "visibility": rule["visibility"], "process": rule["process"],
                                "aliases": promoted.get(name, {})})
            except Refused as e:
                if e.status == 503:
                    return self._error(e, "")
                continue
        return ModelListing(models=visible)

    @api.get("/v1/model", response_model=ModelInfo, responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}})
    async def info(self, request: Request, model: str | None = None):
        try:
            p = await asyncio.to_thread(self._principal, request, "models:predict")
            ref = self._model_ref(model)
            # access before the alias or version is resolved: else a 404 for a missing alias and a 403
            # for an existing one would tell anyone which aliases and versions a private model has
            await asyncio.to_thread(self._check_access, p, parsed_model_ref(ref).name)
            name, version, model_id = await asyncio.to_thread(self._version, p, ref)
            c = await self._ask_pool(model_id, "card")
            if "error" in c:
                raise Refused(c.get("status", 400), c["error"])
        except Refused as e:
            return self._error(e, "")
        task = c.get("task") or ("report" if c.get("family") == "report_writer" else "classification")
        return ModelInfo(model=ref, model_version=version, modalities=c["modalities"], classes=c["classes"],
                         inputs=c["inputs"], dataset=c.get("dataset"), task=task)

    @api.post("/v1/predict", response_model=PredictResponse, openapi_extra=body_doc(PredictRequest),
              responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 422, 429, 503)})
    async def predict(self, request: Request):
        from indai.serving.metering import CallRecord, now_utc

        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        name, version, process, status = "", None, "", 200
        try:
            p = await asyncio.to_thread(self._principal, request, "models:predict")
        except Refused as e:
            return self._error(e, request_id)
        body = await read_body(request, PredictRequest)  # a 413 or 422 here is not metered (nor was it before)
        try:
            if not self.limits.allow(p.member):
                raise Refused(429, f"rate limit: member {p.member} may send {self.args.rate_per_s:g} requests per second "
                                   f"(bursts of {self.args.burst:g}); slow down and retry")
            ref = self._model_ref(body.model)
            name = parsed_model_ref(ref).name
            rule = await asyncio.to_thread(self._check_access, p, name)
            process = rule["process"]
            name, version, model_id = await asyncio.to_thread(self._version, p, ref)
            out = await self._ask_pool(model_id, "predict", [i.model_dump(exclude_none=True) for i in body.instances])
            if "error" in out:
                raise Refused(out.get("status", 400), out["error"])
            return PredictResponse(request_id=request_id, model=ref, model_version=version, predictions=out["predictions"])
        except Refused as e:
            status = e.status
            return self._error(e, request_id)
        except Exception:
            status = 500
            raise
        finally:
            self.meter.record(CallRecord(request_id=request_id, member_id=p.member, model=name or "-", model_version=version,
                                         process=process, at=now_utc(), status=status,
                                         latency_ms=(time.perf_counter() - t0) * 1000, instances=len(body.instances)))

    @api.post("/v1/feedback", response_model=FeedbackResponse, openapi_extra=body_doc(FeedbackRequest),
              responses={s: {"model": ErrorResponse} for s in (401, 404, 413, 422)})
    async def feedback(self, request: Request):
        from indai.platform.db import Call, Feedback

        try:
            p = await asyncio.to_thread(self._principal, request, "feedback:write")
        except Refused as e:
            return self._error(e, "")
        body = await read_body(request, FeedbackRequest)

        def store() -> bool:
            from sqlalchemy import select
            from sqlalchemy.orm import Session

            pending = self.meter.pending(body.request_id)
            with Session(self.eng) as s, s.begin():
                owner = pending.member_id if pending else s.scalar(select(Call.member_id).where(Call.request_id == body.request_id))
                if owner != p.member:
                    return False
                s.add(Feedback(request_id=body.request_id, member_id=p.member, rating=body.rating, true_label=body.true_label,
                               comment=body.comment))
            return True

        try:
            ok = await asyncio.to_thread(store)
        except Exception:
            return JSONResponse(status_code=503, content={"detail": "the platform database is unavailable: retry later",
                                                          "request_id": body.request_id})
        if not ok:
            return JSONResponse(status_code=404, content={"detail": f"no prediction {body.request_id} of member {p.member}",
                                                          "request_id": body.request_id})
        return FeedbackResponse(request_id=body.request_id, stored=True)


def build_app(args: dict | ServeArgs) -> serve.Application:
    """Ray Serve app builder (usable from `serve run indai.serving.app:build_app mlflow_uri=... db_url=...`)."""
    from indai.platform import db

    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    a = a.model_copy(update={"db_url": a.db_url or db.database_url()})
    eng = db.engine(a.db_url)
    db.upgrade(eng)
    if a.model:  # fail here, not in a replica loop: the default model's promotion, and its version in the registry
        from indai.platform import promotion
        from indai.platform.registry import ModelRef, parse_model_ref, wait_for_model

        ref = parse_model_ref(a.model)
        if ref.alias is not None:  # (as members' calls resolve it: never by the registry's label, which a job may move or delete)
            version = promotion.alias_version(eng, ref.name, ref.alias)
            if version is None:
                raise UserError(f"the default model {a.model} is not promoted: run `indai model promote {ref.name}/<version> "
                                f"--alias {ref.alias}` first (`indai model ls` lists the versions)")
            ref = ModelRef(ref.name, version=version)
        wait_for_model(a.mlflow_uri, ref, a.registry_wait_s, log=lambda line: print(f"[indai] {line}", file=sys.stderr, flush=True))
    # a member's call must not hang on MLflow's own defaults (120 s a request, 7 retries): one try, bounded
    mlflow_env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(a.registry_timeout_s), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    pool_opts = {"max_ongoing_requests": max(a.pool_max_ongoing, a.max_batch_size), "max_queued_requests": a.max_queued_requests,
                 "ray_actor_options": {"num_cpus": a.num_cpus, "runtime_env": {
                     "env_vars": {**mlflow_env, "INDAI_SERVE_MAX_MODELS": str(a.max_models_per_replica)}}}}
    pool_opts.update({"autoscaling_config": a.autoscaling} if a.autoscaling else {"num_replicas": a.num_replicas})
    pool = ModelPool.options(**pool_opts).bind(a.model_dump())
    return Ingress.options(num_replicas=a.ingress_replicas, max_ongoing_requests=a.ingress_max_ongoing,
                           max_queued_requests=a.max_queued_requests,
                           ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": mlflow_env}}).bind(pool, a.model_dump())
