"""Every shipped recipe runs from the CLI on real data and logs its evaluation to MLflow.

The recipes run as a user runs them (`indai train trainers/recipes/<recipe>.yaml ...`), made
small by overrides only: one to three epochs, the debug flavour, 32-pixel images, the local
launcher. The data is real: the CWRU recordings whole, and small subsets of ELPV (30 cells of
each defect level) and of the NIST Nestor work orders, ingested once for the module with the
shipped dataset specs. Each test checks the numbers and artefacts in MLflow, and the anomaly
and regression models answer through IndaiModel (as serving loads them) with their task's
fields and the same numbers the run measured."""
import base64
import io
import json
import math
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INDAI = [sys.executable, "-m", "indai.platform.cli"]
SMALL = ["--launcher", "local", "model.flavour=debug", "run.progress=false", "run.log_every=5"]


def elpv_subset(folder: Path, per_level: int = 30) -> Path:
    """The first `per_level` cells of each defect probability, with labels.csv in ELPV's format."""
    root = Path(metadata.distribution("elpv-dataset").locate_file("elpv_dataset/data"))
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    kept, seen = [], {}
    for path, prob, kind in rows:
        if seen.get(prob, 0) < per_level:
            seen[prob] = seen.get(prob, 0) + 1
            kept.append((path, prob, kind))
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / path, folder / path)
    (folder / "labels.csv").write_text("".join(f"{p}  {q}  {k}\n" for p, q, k in kept))
    return folder


def nestor_subset(folder: Path, every: int = 8) -> Path:
    """Every `every`-th work order that has a failure mode, all columns, in time order."""
    import pandas as pd

    csv = Path(metadata.distribution("nist-nestor").locate_file("nestor/datasets/excavators-cleaned.csv"))
    orders = pd.read_csv(csv)
    orders[orders["FM"].notna()].iloc[::every].to_csv(folder / "excavators-cleaned.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def data(services, tmp_path_factory):
    """name@version of each recipe's dataset, ingested with the shipped specs; the weight mirror filled."""
    from indai.platform import mirror
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store

    store = open_store(services.store_uri)
    elpv = elpv_subset(tmp_path_factory.mktemp("elpv"))
    nestor = nestor_subset(tmp_path_factory.mktemp("nestor"))
    refs = {}
    for key, spec, root in [("elpv", "examples/elpv/dataset.yaml", elpv), ("quality", "examples/elpv/quality.yaml", elpv),
                            ("typed", "examples/elpv/typed.yaml", elpv), ("anomaly", "examples/cwru-0hp/anomaly.yaml", None),
                            ("nestor", "examples/nestor-excavators/dataset.yaml", nestor)]:
        name, version, manifest = ingest(REPO / spec, store, progress=False, root=root)
        refs[key] = (f"{name}@{version}", manifest)
    mirror.add_packaged(store, ["efficientnet-lite0", "all-minilm-l6-v2"])
    return refs


def train_cli(services, recipe: str, *overrides: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    """`indai train trainers/recipes/<recipe> ...`; the process and its `[indai] result` line."""
    env = dict(os.environ, INDAI_HOME=str(services.home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    done = subprocess.run([*INDAI, "train", f"trainers/recipes/{recipe}", *SMALL, *overrides], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("[indai] result ")][-1]
    return done, json.loads(line.removeprefix("[indai] result "))


def client(services):
    from mlflow.tracking import MlflowClient

    return MlflowClient(services.mlflow_uri)


def artifacts(services, run_id: str) -> set[str]:
    return {a.path for a in client(services).list_artifacts(run_id)}


def served_model(services, name: str, version: int, tmp_path: Path):
    import mlflow

    from indai.platform.model_format import IndaiModel

    mlflow.set_tracking_uri(services.mlflow_uri)
    folder = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "download"))
    return IndaiModel.load(Path(folder) / "artifacts" / "indai_model")


def png_b64(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_cwru_anomaly_recipe_calibrates_logs_and_serves_scores(services, data, tmp_path):
    from indai.platform import datasets
    from indai.platform.storage import open_store
    from indai.serving.client import split_instances

    ref, manifest = data["anomaly"]
    done, result = train_cli(services, "cwru_anomaly.yaml", f"data.dataset={ref}", "optim.epochs=2", "run.name=it-anomaly",
                             "run.register_as=it-anomaly")
    assert "test auroc" in done.stdout
    m = client(services).get_run(result["run_id"]).data.metrics
    assert m["test_auroc"] >= 0.95, m  # normal against nine bearing faults, none seen in training
    assert m["test_target_false_alarm_rate"] == 0.05 and m["test_calibration_false_alarm_rate"] <= 0.05  # on the val normals
    normal = manifest["classes"].index("normal")
    assert m["test_n_normal"] == manifest["split"]["per_class"]["test"][normal]
    assert m["test_n_anomalous"] == manifest["split"]["windows"]["test"] - m["test_n_normal"]
    assert m["test_tp"] + m["test_fn"] == m["test_n_anomalous"] and 0.9 <= m["test_recall"] <= 1.0
    assert {"anomaly_scores_test.png", "test_metrics.json"} <= artifacts(services, result["run_id"])

    model = served_model(services, "it-anomaly", result["version"], tmp_path)
    assert model.card["task"] == "anomaly" and model.card["anomaly"]["threshold"] == pytest.approx(m["test_threshold"], rel=1e-6)
    instances, labels = split_instances(open_store(services.store_uri), datasets.parse_ref(ref), "test")
    answers = model.predict(instances)
    assert all(set(a) == {"score", "anomaly", "threshold"} for a in answers)
    flagged = np.array([a["anomaly"] for a in answers])
    faulty = np.array([label != "normal" for label in labels])
    # the served model flags what the run counted (float noise may move a score at the threshold)
    assert abs(int((flagged & faulty).sum()) - m["test_tp"]) <= 1 and abs(int((flagged & ~faulty).sum()) - m["test_fp"]) <= 1


def test_elpv_quality_regression_logs_residuals_and_serves_values(services, data, tmp_path):
    from indai.platform import datasets
    from indai.platform.storage import open_store

    ref, _ = data["quality"]
    _, result = train_cli(services, "elpv_quality.yaml", f"data.dataset={ref}", "optim.epochs=2", "data.image_size=32",
                          "compare.scratch=false", "run.name=it-quality", "run.register_as=it-quality")
    run = client(services).get_run(result["run_id"])
    m = run.data.metrics
    assert 0 < m["test_mae"] <= m["test_rmse"] < 1.0 and math.isfinite(m["test_r2"])  # the target lies in [0, 1]
    assert "residuals_test.png" in artifacts(services, result["run_id"])

    store = open_store(services.store_uri)
    train = datasets.load_split(store, datasets.parse_ref(ref), "train")
    test = datasets.load_split(store, datasets.parse_ref(ref), "test")
    model = served_model(services, "it-quality", result["version"], tmp_path)
    assert model.card["task"] == "regression" and model.card["target"]["unit"] == "probability"
    assert model.card["target"]["mean"] == pytest.approx(float(train["target"].mean()), rel=1e-5)
    answers = model.predict([{"image": png_b64(img)} for img in test["image"]])
    assert all(set(a) == {"value"} for a in answers)
    served_mae = float(np.mean(np.abs(np.array([a["value"] for a in answers]) - test["target"])))
    assert served_mae == pytest.approx(m["test_mae"], rel=1e-3)  # serving resizes like training did: same numbers


def test_elpv_image_recipe_compares_fine_tuned_with_scratch(services, data):
    ref, manifest = data["elpv"]
    done, result = train_cli(services, "elpv_image.yaml", f"data.dataset={ref}", "optim.epochs=1", "data.image_size=32",
                             "run.name=it-elpv", "run.register_as=it-elpv")
    assert "fine-tuned" in done.stdout and "from scratch" in done.stdout
    rows = result["comparison"]
    assert [r["variant"] for r in rows] == ["fine-tuned", "from scratch"]
    c = client(services)
    children = [c.get_run(r["run_id"]) for r in rows]
    parent_id = children[0].data.tags["mlflow.parentRunId"]
    assert children[1].data.tags["mlflow.parentRunId"] == parent_id
    assert {ch.data.tags["indai.dataset"] for ch in children} == {ref}  # one dataset version, one split
    assert children[0].data.params["model.image.pretrained"] == "efficientnet-lite0"
    assert children[1].data.params["model.image.pretrained"] == "None" and children[1].data.params["run.seed"] == "0"
    assert {"comparison.json", "comparison.png", "comparison.txt"} <= artifacts(services, parent_id)
    parent = c.get_run(parent_id).data.metrics
    for child, key in zip(children, ["fine-tuned", "from_scratch"]):
        m = child.data.metrics
        assert parent[f"{key}.test_accuracy"] == pytest.approx(m["test_accuracy"])
        assert 0 <= m["test_ece"] <= 1 and 0 <= m["test_macro_f1"] <= 1 and m["test_n"] == manifest["split"]["records"]["test"]
        for cls in manifest["classes"]:  # functional, defective
            assert 0 <= m[f"test_f1.{cls}"] <= 1 and 0 <= m[f"test_recall.{cls}"] <= 1
        assert {"confusion_matrix_test.png", "reliability_test.png", "test_metrics.json"} <= artifacts(services, child.info.run_id)


def test_nestor_and_fused_recipes_log_per_class_metrics(services, data):
    from indai.trainers.reports import metric_name

    ref, manifest = data["nestor"]
    _, result = train_cli(services, "nestor_failure_mode.yaml", f"data.dataset={ref}", "optim.epochs=1", "model.text.max_len=16",
                          "optim.batch_size=64", "compare.scratch=false", "run.name=it-recipe-nestor", "run.register_as=null")
    run = client(services).get_run(result["run_id"])
    assert run.data.params["model.text.kind"] == "hf" and run.data.params["model.text.pretrained"] == "all-minilm-l6-v2"
    m = run.data.metrics
    assert 0 <= m["test_macro_f1"] <= 1 and 0 <= m["test_accuracy"] <= 1
    per_class = {k for k in m if k.startswith("test_f1.")}
    conf = np.array(json.loads(Path(client(services).download_artifacts(result["run_id"], "test_metrics.json")).read_text())["confusion"])
    seen = [c for i, c in enumerate(manifest["classes"]) if conf[i].sum() or conf[:, i].sum()]
    assert per_class == {f"test_f1.{metric_name(c)}" for c in seen}  # e.g. test_f1.Missing_Loose
    assert "test_f1.Missing_Loose" in per_class and len(seen) < len(manifest["classes"])  # the long tail is not all in test

    ref, manifest = data["typed"]
    _, result = train_cli(services, "fused.yaml", f"data.dataset={ref}", "optim.epochs=1", "data.image_size=32",
                          "compare.scratch=false", "run.name=it-fused", "run.register_as=null")
    run = client(services).get_run(result["run_id"])
    assert run.data.params["model.modalities"] == "['image', 'text']"
    assert 0 <= run.data.metrics["test_accuracy"] <= 1 and "test_f1.defective" in run.data.metrics


def test_cwru_sensor_recipe_logs_calibration_and_per_class_metrics(services, trained_model, cwru_dataset):
    _, result = trained_model
    _, _, manifest = cwru_dataset
    m = client(services).get_run(result.run_id).data.metrics
    assert result.task == "classification" and result.test_metrics["accuracy"] == pytest.approx(m["test_accuracy"])
    assert len([k for k in m if k.startswith("test_f1.")]) == len(manifest["classes"]) == 10
    assert min(m[f"test_recall.{c}"] for c in manifest["classes"]) >= 0.5 and 0 <= m["test_ece"] <= 0.5
    assert {"reliability_test.png", "test_metrics.json"} <= artifacts(services, result.run_id)
