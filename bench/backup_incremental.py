"""What a nightly backup costs once the first is made (`indai admin backup`).

Builds an embedded home in a temporary folder: a platform database with --calls metering rows,
an MLflow database with a run of --metrics metric points, and a store of --objects small objects
(64 KiB) and --large objects of 16 MiB. Then, in one process, times:
  baseline   a plain copy of the store folder (shutil.copytree: what `cp -r` of the data costs);
  first      the first snapshot (every object read, hashed and stored);
  unchanged  the next snapshot with nothing changed (objects recognised by size and mtime);
  1% changed the next one after 1% of the small objects and one large object were rewritten.
Each snapshot is made twice, into a plain backup store and into an encrypted one (a backup key
set): the same state, one after the other.
Prints the seconds, the ratios to the first snapshot, to the baseline and of the encrypted store
to the plain one, and the backup store's size against three full copies; appends a JSON line to
bench/results/backup_incremental.jsonl.

    .venv/bin/python bench/backup_incremental.py
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write  # noqa: E402


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def make_home(home: Path, calls: int, metrics: int, small: int, large: int) -> None:
    import numpy as np
    from mlflow import MlflowClient
    from sqlalchemy import insert

    from indai.platform import db, tenancy

    (home / "mlflow").mkdir(parents=True)
    store = home / "store"
    (store / "mlflow-artifacts").mkdir(parents=True)
    eng = db.engine(f"sqlite:///{home}/platform.db")
    db.upgrade(eng)
    tenancy.add_member(eng, "steel-a", "Steel A", "steel", "demand")
    rng = np.random.default_rng(0)
    now = db.utcnow()
    with eng.begin() as conn:
        for start in range(0, calls, 10_000):
            conn.execute(insert(db.Call), [
                {"request_id": f"r{i:09d}", "member_id": "steel-a", "model": "cwru-bearing", "model_version": 1,
                 "process": "bearing", "at": now, "latency_ms": float(rng.gamma(2, 10)), "status": 200, "instances": 16}
                for i in range(start, min(calls, start + 10_000))])
    eng.dispose()
    url = f"sqlite:///{home}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.create_experiment("bench", artifact_location=(store / "mlflow-artifacts" / "1").as_uri())
    run = client.create_run(exp)
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    for start in range(0, metrics, 1000):
        client.log_batch(run.info.run_id, metrics=[Metric("loss", float(1 / (i + 1)), stamp, i)
                                                   for i in range(start, min(metrics, start + 1000))])
    for i in range(small):
        path = store / "datasets" / "bench" / f"v{i // 500}" / f"part-{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(64 << 10))
    for i in range(large):
        path = store / "checkpoints" / "run-1" / f"epoch-{i}" / "model_states.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(16 << 20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--metrics", type=int, default=20_000)
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--large", type=int, default=12)
    a = ap.parse_args()

    from indai.platform import backup, progress

    with tempfile.TemporaryDirectory(prefix="indai-bench-backup-") as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        t = time.perf_counter()
        make_home(home, a.calls, a.metrics, a.objects, a.large)
        print(f"home made in {time.perf_counter() - t:.1f} s: store {folder_bytes(home / 'store') / 1e6:.0f} MB, "
              f"platform.db {os.path.getsize(home / 'platform.db') / 1e6:.1f} MB, "
              f"mlflow.db {os.path.getsize(home / 'mlflow' / 'mlflow.db') / 1e6:.1f} MB", file=sys.stderr)
        os.environ["INDAI_HOME"] = str(home)
        for var in ("INDAI_DB_URL", "INDAI_MLFLOW_DB_URL", "INDAI_STORE_URI"):
            os.environ.pop(var, None)
        sources = backup.current_sources()
        dest, sealed_dest = tmp / "backups", tmp / "backups-encrypted"
        from indai.platform.encryption import new_key_text

        key = new_key_text()
        quiet = lambda s: None  # noqa: E731

        t = time.perf_counter()
        shutil.copytree(home / "store", tmp / "plain-copy")
        baseline = time.perf_counter() - t
        shutil.rmtree(tmp / "plain-copy")

        # a warm-up snapshot, thrown away: imports and the first connections are not the first's cost
        backup.backup(sources, str(tmp / "warm-up"), say=quiet, stages=progress.Stages(open(os.devnull, "w")))
        shutil.rmtree(tmp / "warm-up")
        timings, manifests, parts, sealed = {}, {}, {}, {}
        for name in ("first", "unchanged", "1% changed"):
            if name == "1% changed":
                rng = __import__("numpy").random.default_rng(1)
                small = sorted((home / "store" / "datasets").rglob("*.bin"))
                for path in small[:: max(1, len(small) // max(1, a.objects // 100))][: max(1, a.objects // 100)]:
                    path.write_bytes(rng.bytes(64 << 10))
                big = sorted((home / "store" / "checkpoints").rglob("*.pt"))
                if big:
                    big[0].write_bytes(rng.bytes(16 << 20))
            t = time.perf_counter()
            with open(os.devnull, "w") as devnull:
                stages = progress.Stages(devnull)
                manifests[name] = backup.backup(sources, str(dest), say=quiet, stages=stages)
            parts[name] = {"databases_s": round(sum(v for k, v in stages.timings.items() if k.startswith("dump")), 3),
                           "objects_s": round(stages.timings["copy the object store"], 3)}
            timings[name] = time.perf_counter() - t
            os.environ["INDAI_BACKUP_KEY"] = key
            t = time.perf_counter()
            backup.backup(sources, str(sealed_dest), say=quiet, stages=progress.Stages(open(os.devnull, "w")))
            sealed[name] = time.perf_counter() - t
            del os.environ["INDAI_BACKUP_KEY"]
        size = folder_bytes(dest)
        sealed_size = folder_bytes(sealed_dest)
        # the cipher alone: the large objects sealed, against copying them, in this process
        from indai.platform.encryption import Key, seal_file

        k, big = Key.parse(key), sorted((home / "store" / "checkpoints").rglob("*.pt"))
        big_mb = sum(p.stat().st_size for p in big) / 1e6
        t = time.perf_counter()
        for i, p in enumerate(big):
            shutil.copyfile(p, tmp / f"copy-{i}")
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        for i, p in enumerate(big):
            seal_file(k, p, tmp / f"sealed-{i}", f"blobs/{i}")
        seal_s = time.perf_counter() - t
        store_bytes = folder_bytes(home / "store")

    first = timings["first"]
    rows = [(n, s, s / first, s / baseline, manifests[n]["objects"]["read"], manifests[n]["objects"]["new_bytes"])
            for n, s in timings.items()]
    print(f"{'snapshot':<12} {'seconds':>8} {'/ first':>8} {'/ copy':>8} {'databases':>10} {'objects':>8} {'read':>6} "
          f"{'new MB':>8} {'encrypted':>10} {'/ plain':>8}")
    print(f"{'plain copy':<12} {baseline:8.2f} {baseline / first:8.3f} {1:8.3f}")
    for n, s, r1, r2, read, new in rows:
        print(f"{n:<12} {s:8.2f} {r1:8.3f} {r2:8.3f} {parts[n]['databases_s']:9.2f}s {parts[n]['objects_s']:7.2f}s "
              f"{read:6d} {new / 1e6:8.1f} {sealed[n]:9.2f}s {sealed[n] / s:8.3f}")
    print(f"backup store after 3 snapshots: {size / 1e6:.0f} MB; 3 plain copies: {3 * store_bytes / 1e6:.0f} MB "
          f"(ratio {size / (3 * store_bytes):.3f}); encrypted: {sealed_size / 1e6:.0f} MB ({sealed_size / size:.4f} of plain)")
    if big:
        print(f"sealing {big_mb:.0f} MB: {seal_s:.2f} s ({big_mb / seal_s:.0f} MB/s), copying it: {copy_s:.2f} s "
              f"(ratio {seal_s / copy_s:.2f})")
    write("backup_incremental", {
        "params": vars(a), "store_mb": round(store_bytes / 1e6, 1), "baseline_copy_s": round(baseline, 3),
        "snapshots": {n: {"s": round(s, 3), "ratio_to_first": round(r1, 4), "ratio_to_copy": round(r2, 4), "read": read,
                          "new_mb": round(new / 1e6, 2), "encrypted_s": round(sealed[n], 3),
                          "encrypted_to_plain": round(sealed[n] / s, 4), **parts[n]} for n, s, r1, r2, read, new in rows},
        "encrypted_store_mb": round(sealed_size / 1e6, 1),
        "seal_mb_per_s": round(big_mb / seal_s, 1) if big else None, "seal_to_copy": round(seal_s / copy_s, 3) if big else None,
        "backup_store_mb": round(size / 1e6, 1), "ratio_to_three_copies": round(size / (3 * store_bytes), 4)})


if __name__ == "__main__":
    main()
