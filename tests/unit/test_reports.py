"""Evaluation plots (trainers.reports): real PNG files of the pixel size they are drawn at,
metric names MLflow accepts, and the ROC curve's points."""
import json
import math
import struct

import numpy as np
import pytest

from indai.trainers import reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_confusion_matrix_png(tmp_path):
    classes = ["normal", "ball 007", "ir/014"]
    path = reports.confusion_png([[5, 1, 0], [0, 4, 2], [0, 0, 0]], classes, tmp_path / "c.png", "t")
    side = max(4.0, 1.5 + 0.45 * 3)
    assert png_size(path) == (int(2 * side * reports.DPI), int(side * reports.DPI))
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.min() < 100 and pixels.max() > 200  # something is drawn on a light background


def test_reliability_residual_anomaly_and_comparison_pngs(tmp_path):
    rel = {"count": [0] * 13 + [3, 7], "confidence": [math.nan] * 13 + [0.9, 0.97], "accuracy": [math.nan] * 13 + [0.66, 1.0]}
    assert png_size(reports.reliability_png(rel, 0.05, tmp_path / "r.png")) == (600, 700)
    points = {"target": [0.0, 1 / 3, 1.0], "prediction": [0.1, 0.2, 0.9]}
    assert png_size(reports.residual_png(points, {"mae": 0.1, "rmse": 0.1, "r2": 0.9}, tmp_path / "res.png", "p")) == (1100, 500)
    assert png_size(reports.anomaly_png([1, 2, 8, 9], [0, 0, 1, 1], 5.0, {"auroc": 1.0, "f1": 1.0}, tmp_path / "a.png")) == (1100, 500)
    rows = [{"variant": "fine-tuned", "metrics": {"accuracy": 0.9, "ece": math.nan}},
            {"variant": "from scratch", "metrics": {"accuracy": 0.8, "ece": 0.1}}]
    assert png_size(reports.comparison_png(rows, ["accuracy", "ece"], tmp_path / "cmp.png", "x")) == (800, 500)


@pytest.mark.parametrize("task,files", [
    ("classification", {reports.METRICS_JSON, reports.CONFUSION_PNG, reports.RELIABILITY_PNG}),
    ("regression", {reports.METRICS_JSON, reports.RESIDUALS_PNG}),
    ("anomaly", {reports.METRICS_JSON, reports.ANOMALY_PNG})])
def test_each_task_gets_its_plots_and_a_metrics_json_without_per_sample_data(task, files, tmp_path):
    test = {"classification": {"accuracy": 0.5, "macro_f1": 0.5, "n": 2, "confusion": [[1, 0], [1, 0]], "ece": math.nan,
                               "reliability": {"count": [2], "confidence": [0.6], "accuracy": [0.5]}},
            "regression": {"mae": 0.1, "rmse": 0.2, "r2": 0.3, "points": {"target": [0, 1], "prediction": [0.1, 0.9]}},
            "anomaly": {"auroc": 1.0, "threshold": 1.5, "scores": [1, 2], "is_anomaly": [0, 1]}}[task]
    written = reports.write_test_reports(task, test, ["ok", "bad"], tmp_path)
    assert {p.name for p in written} == files
    saved = json.loads((tmp_path / reports.METRICS_JSON).read_text())
    assert not {"scores", "is_anomaly", "points"} & set(saved)
    if task == "classification":
        assert saved["ece"] is None  # NaN is not JSON: undefined numbers are null


def test_metric_names_are_what_mlflow_accepts():
    assert reports.metric_name("Missing / Loose") == "Missing_Loose"
    assert reports.metric_name("Fail to Start_Unspecified") == "Fail_to_Start_Unspecified"
    assert reports.metric_name("정상") == "_"
    result = {"precision": [1.0, 0.5, 0.25], "recall": [0.5, 0.5, 0.5], "f1": [0.6, 0.5, 0.3]}
    got = reports.class_metrics(result, ["a b", "a/b", "ok"])
    assert got["test_f1.a_b"] == 0.6 and got["test_f1.a_b_2"] == 0.5 and got["test_precision.ok"] == 0.25
    assert len(got) == 9
    absent = reports.class_metrics(dict(result, confusion=[[1, 0, 0], [1, 1, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert {k.split(".")[1] for k in absent} == {"a", "b"}  # c: neither in the split nor predicted


def test_roc_curve_points():
    fpr, tpr = reports.roc_curve([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: the tie counts half
    from indai.trainers.tasks import auroc

    assert area == pytest.approx(auroc([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]))
