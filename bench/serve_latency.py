"""Request latency and throughput of the inference service, against a hand-written server.

One run starts the embedded default in a temporary INDAI_HOME on free loopback ports, ingests
the shipped CWRU subset, trains the sensor recipe (shortened) and registers it, creates a
member, a user and a token and shares the model consortium-wide. Then it sends the held-out
test windows, one instance per request, to:

  raw        IndaiModel.prepare + run in this process, one after another (no HTTP): the floor
  fastapi    a plain FastAPI app on uvicorn in a subprocess around the same model (no auth,
             no Ray): the hand-written baseline that the ratios are taken against
  serve      indai's Serve app, POST /v1/predict with the token, batching on (max_batch_size 32)
  bare       a minimal Serve FastAPI deployment defined here that calls the same running
             ModelPool deployment (no token, no access rule, no meter): serve - bare is the
             cost of auth + access check + metering per request
  serve-nb   indai's Serve app redeployed with max_batch_size=1 (no batching)

HTTP targets are driven open-loop (each request is sent at its planned time, 1/rate apart,
whatever the earlier ones are doing; latency is counted from the planned time, so it includes
queueing, in the client too) at each rate, and then closed-loop with a fixed number of
requests in flight (`--closed`, default 4 and 16) for the maximum throughput ("max@N" rows). The per-member rate limit is
switched off. The model replica of Ray Serve runs torch with one thread (Ray sets
OMP_NUM_THREADS=1 for a 0.5-CPU actor); the floor and the baseline do the same.

    .venv/bin/python bench/serve_latency.py [--rates 20 50 100 200] [--seconds 8] [--epochs 1]

About 7 minutes on 2 cores: 2 for setup (services, ingest, training), the rest measuring; a
step the target cannot keep up with lasts up to --seconds + 10 s (the request timeout).
Everything started here (services, Serve, the uvicorn subprocess) is stopped at the end, also
on error, Ctrl-C or SIGTERM.
"""
# no `from __future__ import annotations`: the bare deployment's FastAPI route is pickled into
# a Ray replica and its annotations must be classes there, not strings to resolve

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write  # noqa: E402

MODEL = "bench-serve"
ALIAS = "champion"
MEMBER = "bench"
TIMEOUT_S = 10.0  # a request not answered within this counts as an error


# ---- measuring ------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


def summary(latencies_ms: list[float], errors: int, elapsed: float, sent: int, statuses: dict) -> dict:
    return {"sent": sent, "ok": len(latencies_ms), "errors": errors, "p50_ms": pct(latencies_ms, 50),
            "p99_ms": pct(latencies_ms, 99), "mean_ms": (sum(latencies_ms) / len(latencies_ms)) if latencies_ms else None,
            "throughput_rps": len(latencies_ms) / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed,
            "statuses": statuses}


async def _post(session, url: str, body: bytes, headers: dict) -> int:
    async with session.post(url, data=body, headers=headers) as r:
        await r.read()
        return r.status


def _session():
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512),
                                 timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))


async def open_loop(url: str, bodies: list[bytes], headers: dict, rate: float, seconds: float) -> dict:
    """Send rate*seconds requests at fixed planned times; latency from the planned time."""
    n = max(1, round(rate * seconds))
    lat: list[float] = []
    ends: list[float] = []
    lags: list[float] = []
    statuses: dict[str, int] = {}
    async with _session() as s:
        async def one(i: int, due: float) -> None:
            try:
                status = str(await _post(s, url, bodies[i % len(bodies)], headers))
            except Exception as e:  # timeouts, refused connections
                status = type(e).__name__
            done = time.perf_counter()
            ends.append(done)
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                lat.append((done - due) * 1000)

        tasks = []
        t0 = time.perf_counter() + 0.05
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, -delay) * 1000)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
    out = summary(lat, n - len(lat), max(ends) - t0, n, statuses)
    out["send_lag_p99_ms"] = pct(lags, 99)  # how late the client itself was in sending
    return out


async def closed_loop(url: str, bodies: list[bytes], headers: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` requests in flight for `seconds`: the most this target answers per second."""
    lat: list[float] = []
    statuses: dict[str, int] = {}
    counter = iter(range(10**9))
    async with _session() as s:
        t0 = time.perf_counter()
        end = t0 + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                i = next(counter)
                t = time.perf_counter()
                try:
                    status = str(await _post(s, url, bodies[i % len(bodies)], headers))
                except Exception as e:
                    status = type(e).__name__
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    lat.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    sent = sum(statuses.values())
    return summary(lat, sent - len(lat), elapsed, sent, statuses)


async def warm_up(url: str, bodies: list[bytes], headers: dict, n: int = 40) -> None:
    """Sequential requests until the target answers (models loaded, connections open)."""
    async with _session() as s:
        deadline = time.time() + 120
        for i in range(n):
            while True:
                try:
                    if await _post(s, url, bodies[i % len(bodies)], headers) == 200:
                        break
                except Exception:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"{url} did not answer 200 within 120 s")
                await asyncio.sleep(0.5)


def measure_http(target: str, url: str, bodies: list[bytes], headers: dict, rates: list[float], seconds: float,
                 closed: list[int]) -> list[dict]:
    asyncio.run(warm_up(url, bodies, headers))
    rows = []
    for rate in rates:
        time.sleep(1.0)  # let the previous step's stragglers finish
        r = asyncio.run(open_loop(url, bodies, headers, rate, seconds))
        rows.append({"target": target, "mode": "open", "rate": rate, **r, "load_avg_1m": os.getloadavg()[0]})
        print(line(rows[-1]), flush=True)
    for c in closed:
        time.sleep(1.0)
        r = asyncio.run(closed_loop(url, bodies, headers, c, seconds))
        rows.append({"target": target, "mode": f"closed, {c} in flight", "rate": f"max@{c}", "in_flight": c, **r,
                     "load_avg_1m": os.getloadavg()[0]})
        print(line(rows[-1]), flush=True)
    return rows


def measure_raw(model, instances: list[dict], seconds: float) -> dict:
    """The bare forward, one instance at a time, in this process (no HTTP, no queueing)."""
    for inst in instances[:20]:
        model.run([model.prepare(inst)])
    lat = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        model.run([model.prepare(instances[i % len(instances)])])
        lat.append((time.perf_counter() - t) * 1000)
        i += 1
    r = summary(lat, 0, time.perf_counter() - t0, len(lat), {"ok": len(lat)})
    return {"target": "raw", "mode": "in-process, sequential", "rate": "max@1", "in_flight": 1, **r, "load_avg_1m": os.getloadavg()[0]}


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def line(r: dict) -> str:
    return (f"{r['target']:<9} {str(r['rate']):>6}  sent {r['sent']:>5}  err {r['errors']:>4}  p50 {fmt(r['p50_ms'], '8.1f')} ms  "
            f"p99 {fmt(r['p99_ms'], '8.1f')} ms  {r['throughput_rps']:7.1f} req/s  load {r['load_avg_1m']:.2f}")


# ---- the hand-written baseline: FastAPI on uvicorn, in a subprocess -------------------------

def run_baseline_server(model_dir: str, port: int, version: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI

    from indai.platform.model_format import IndaiModel
    from indai.serving.schemas import PredictRequest, PredictResponse

    torch.set_num_threads(1)
    model = IndaiModel.load(model_dir)
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/predict", response_model=PredictResponse)
    def predict(body: PredictRequest):  # sync: FastAPI runs it in its thread pool
        preds = model.predict([i.model_dump(exclude_none=True) for i in body.instances])
        return PredictResponse(request_id=uuid.uuid4().hex, model=body.model or MODEL, model_version=version, predictions=preds)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_baseline(model_dir: Path, version: int, log: Path) -> tuple[subprocess.Popen, str]:
    import requests

    from indai.platform.services import pick_port

    port = pick_port(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(model_dir), "--port", str(port),
                                 "--model-version", str(version)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the baseline server exited ({proc.returncode}); see {log}")
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the baseline server did not answer within 120 s; see {log}")


def leftover_pids(home: Path) -> list[int]:
    """Processes of this run that `services.down()` missed: Ray's dashboard and runtime-env
    agents rewrite their title over the start of their environment, so psutil's environ() no
    longer shows INDAI_RAY_TAG; the raw /proc/<pid>/environ still holds this run's INDAI_HOME."""
    needle = f"INDAI_HOME={home}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_leftovers(home: Path) -> None:
    pids = leftover_pids(home)
    if pids:
        print(f"[cleanup] {len(pids)} process(es) of this run outlived `services.down()`: killing {pids}", flush=True)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ---- the bare Serve ingress: same ModelPool, no token, access rule or meter -----------------

def bare_app(pool_app: str, model_id: str, version: int):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    from indai.serving.schemas import PredictRequest, PredictResponse

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})  # as indai's Ingress
    @serve.ingress(api)
    class BareIngress:
        def __init__(self):
            self.pool = serve.get_deployment_handle("ModelPool", app_name=pool_app)

        @api.post("/v1/predict", response_model=PredictResponse)
        async def predict(self, body: PredictRequest):
            out = await self.pool.options(multiplexed_model_id=model_id).predict.remote(
                [i.model_dump(exclude_none=True) for i in body.instances])
            if "error" in out:
                return JSONResponse(status_code=400, content={"detail": out["error"]})
            return PredictResponse(request_id=uuid.uuid4().hex, model=model_id, model_version=version,
                                   predictions=out["predictions"])

    return BareIngress.bind()


# ---- setting up the platform ----------------------------------------------------------------

def prepare_platform(epochs: int) -> dict:
    from indai.platform import datasets, db, promotion, services, tenancy
    from indai.platform.config import load_config
    from indai.platform.ingest import ingest
    from indai.platform.settings import load_settings
    from indai.platform.storage import open_store
    from indai.serving.client import split_instances
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import train

    t = time.perf_counter()
    services.up(num_cpus=4, ports={"mlflow": 0, "ray_gcs": 0, "dashboard": 0, "serve": 0})
    s = load_settings()
    store = open_store(s.store_uri)
    name, version, manifest = ingest(REPO / "examples" / "cwru-0hp" / "dataset.yaml", store, progress=False)
    print(f"[setup] services up, dataset {name}@{version} ingested ({time.perf_counter() - t:.0f} s)", flush=True)
    cfg = load_config(TrainConfig, REPO / "trainers" / "recipes" / "cwru_sensor.yaml",
                      [f"data.dataset={name}@{version}", f"optim.epochs={epochs}", "run.workers=1", "run.progress=false",
                       "run.name=bench-serve-latency", f"run.register_as={MODEL}"])
    result = train(cfg, s)
    eng = db.engine()
    db.upgrade(eng)
    promotion.promote(eng, s.require_mlflow(), MODEL, result.model_version, ALIAS)
    print(f"[setup] trained {MODEL} version {result.model_version}, test accuracy {result.test_accuracy:.3f} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)

    tenancy.add_member(eng, MEMBER, "bench member", "other", "research")
    tenancy.add_user(eng, "bench-user", MEMBER, "researcher")
    _, token = tenancy.create_token(eng, "bench-user", name="serve-latency")
    tenancy.set_model_access(eng, MODEL, owner=MEMBER, visibility="consortium")

    instances, _ = split_instances(store, datasets.DatasetRef(name, version), "test")
    return {"settings": s, "token": token, "version": int(result.model_version), "instances": instances,
            "test_accuracy": result.test_accuracy, "db_url": db.database_url()}


def deploy_indai(s, db_url: str, port: int, max_batch_size: int) -> str:
    from ray import serve

    from indai.serving.app import ServeArgs, build_app

    args = ServeArgs(model=f"{MODEL}@{ALIAS}", mlflow_uri=s.require_mlflow(), db_url=db_url, rate_per_s=0,
                     max_batch_size=max_batch_size)
    serve.run(build_app(args), name=args.name, route_prefix="/")
    return f"http://127.0.0.1:{port}/v1/predict"


# ---- the run --------------------------------------------------------------------------------

def ratio(a, b):
    return None if a is None or not b else a / b


def print_table(rows: list[dict]) -> None:
    print()
    print("| target | rate (req/s) | sent | errors | p50 ms | p99 ms | achieved req/s | p50 / fastapi | req/s / fastapi |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['rate']} | {r['sent']} | {r['errors']} | {fmt(r['p50_ms'], '.1f')} | {fmt(r['p99_ms'], '.1f')} | "
              f"{r['throughput_rps']:.1f} | {fmt(r.get('p50_vs_fastapi'), '.2f')} | {fmt(r.get('rps_vs_fastapi'), '.2f')} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[20, 50, 100, 200], help="target request rates (req/s)")
    ap.add_argument("--seconds", type=float, default=8, help="seconds per rate")
    ap.add_argument("--closed", type=int, nargs="*", default=[4, 16],
                    help="requests in flight of the closed-loop (maximum throughput) steps")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs of the served model")
    ap.add_argument("--only", nargs="*", choices=["fastapi", "serve", "bare", "serve-nb"], help="HTTP targets to run (default all)")
    ap.add_argument("--baseline-server", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model-version", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.baseline_server:
        run_baseline_server(a.baseline_server, a.port, a.model_version)
        return 0
    rates = sorted(a.rates)
    only = set(a.only or ["fastapi", "serve", "bare", "serve-nb"])

    # SIGTERM (a killed run) unwinds through the finally below like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.TemporaryDirectory(prefix="indai-bench-serve-")
    home = Path(tmp.name) / "home"
    old_home = os.environ.get("INDAI_HOME")
    os.environ["INDAI_HOME"] = str(home)
    for k in ("INDAI_STORE_URI", "INDAI_MLFLOW_URI", "INDAI_RAY_ADDRESS", "INDAI_SERVE_URL", "INDAI_DB_URL"):
        os.environ.pop(k, None)  # this run's own services, never another's
    baseline = None
    load_start = os.getloadavg()
    print(f"[setup] load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"on {os.cpu_count()} CPUs; INDAI_HOME {home}", flush=True)
    from indai.platform import services

    rows: list[dict] = []
    try:
        ctx = prepare_platform(a.epochs)
        s, token, version = ctx["settings"], ctx["token"], ctx["version"]
        instances = ctx["instances"][:256]
        print(f"[setup] {len(ctx['instances'])} test windows; requests use {len(instances)} of them, one per request", flush=True)

        import torch

        from indai.platform.model_format import IndaiModel
        from indai.platform.registry import ModelRef, download

        folder, _ = download(s.require_mlflow(), ModelRef(MODEL, version=version), Path(tmp.name) / "model")
        model_dir = folder / "artifacts" / "indai_model"
        model = IndaiModel.load(model_dir)
        torch.set_num_threads(1)
        rows.append(measure_raw(model, instances, a.seconds))
        print(line(rows[-1]), flush=True)

        plain = {"Content-Type": "application/json"}
        bodies_named = [json.dumps({"model": f"{MODEL}@{ALIAS}", "instances": [i]}).encode() for i in instances]
        bodies_bare = [json.dumps({"instances": [i]}).encode() for i in instances]
        print(f"[setup] request body {len(bodies_named[0]) / 1024:.0f} KiB (one window, JSON)", flush=True)

        if "fastapi" in only:
            baseline, url = start_baseline(model_dir, version, Path(tmp.name) / "baseline.log")
            rows += measure_http("fastapi", f"{url}/v1/predict", bodies_bare, plain, rates, a.seconds, a.closed)
            stop_process(baseline)
            baseline = None

        if only & {"serve", "bare", "serve-nb"}:
            import ray
            from ray import serve

            if ray.is_initialized():
                # training connected this process with log_to_driver on: every replica's
                # per-request log line would then be printed here, on the client's CPU
                ray.shutdown()
            services.use_ray_auth()
            ray.init(address=s.require_ray(), logging_level="WARNING", log_to_driver=False)
            port = int(services.read_services()["serve_port"])
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            authed = {**plain, "Authorization": f"Bearer {token}"}
            if only & {"serve", "bare"}:
                url = deploy_indai(s, ctx["db_url"], port, 32)
                if "serve" in only:
                    rows += measure_http("serve", url, bodies_named, authed, rates, a.seconds, a.closed)
                if "bare" in only:
                    serve.run(bare_app("indai", f"{MODEL}/{version}", version), name="bare", route_prefix="/bare")
                    rows += measure_http("bare", f"http://127.0.0.1:{port}/bare/v1/predict", bodies_bare, plain, rates, a.seconds, a.closed)
                    serve.delete("bare")
            if "serve-nb" in only:
                url = deploy_indai(s, ctx["db_url"], port, 1)
                rows += measure_http("serve-nb", url, bodies_named, authed, rates, a.seconds, a.closed)

        # ratios against the hand-written server at the same rate
        base = {r["rate"]: r for r in rows if r["target"] == "fastapi"}
        for r in rows:
            b = base.get(r["rate"])
            if b:
                # the floor is sequential, the "max" rows have 16 in flight: only throughput compares
                r["p50_vs_fastapi"] = None if r["target"] == "raw" else ratio(r["p50_ms"], b["p50_ms"])
                r["rps_vs_fastapi"] = ratio(r["throughput_rps"], b["throughput_rps"])
        print_table(rows)

        meta = {"seconds": a.seconds, "epochs": a.epochs, "model_version": version, "test_accuracy": ctx["test_accuracy"],
                "body_bytes": len(bodies_named[0]), "load_avg_start": list(load_start), "timeout_s": TIMEOUT_S}
        for r in rows:
            write("serve_latency", {**r, **meta})

        serve_rows = {r["rate"]: r for r in rows if r["target"] == "serve"}
        bare_rows = {r["rate"]: r for r in rows if r["target"] == "bare"}
        if serve_rows and bare_rows:
            per_rate = {str(k): serve_rows[k]["p50_ms"] - bare_rows[k]["p50_ms"] for k in serve_rows
                        if k in bare_rows and serve_rows[k]["p50_ms"] is not None and bare_rows[k]["p50_ms"] is not None}
            # max throughput: the best any step of the target reached
            smax = max(r["throughput_rps"] for r in serve_rows.values())
            bmax = max(r["throughput_rps"] for r in bare_rows.values())
            per_req = (1000 / smax - 1000 / bmax) if smax and bmax else None
            overhead = {"target": "auth+access+metering overhead", "p50_diff_ms_by_rate": per_rate,
                        "max_rps_serve": smax, "max_rps_bare": bmax, "ms_per_request_at_max": per_req, **meta}
            write("serve_latency", overhead)
            print("\nauth + access check + metering (serve - bare): p50 difference "
                  + ", ".join(f"{k}: {v:+.1f} ms" for k, v in per_rate.items())
                  + f"; max throughput {smax:.1f} vs {bmax:.1f} req/s = {fmt(per_req, '+.2f')} ms per request")
        load_end = os.getloadavg()
        print(f"load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    finally:
        stop_process(baseline)
        try:
            import ray

            if ray.is_initialized():
                from ray import serve

                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            state = services.down()
            kill_leftovers(home)
            if state.get("ray_temp_dir"):
                shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
            if old_home is None:
                os.environ.pop("INDAI_HOME", None)
            else:
                os.environ["INDAI_HOME"] = old_home
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
