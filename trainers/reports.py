"""Evaluation reports of a run: the plots and tables a researcher opens in MLflow.

Why a module of its own: the launcher, the fine-tuned-vs-scratch comparison and the tests all
draw the same figures from the same scoring results (trainers.tasks), so a figure looks the
same wherever it comes from. Everything renders with matplotlib's Agg backend into PNG files of
a fixed pixel size (no display, no `bbox_inches="tight"` that would change the size), which the
launcher logs as MLflow artefacts. Metric names are sanitised for MLflow, which accepts only
letters, digits and `_ - . / space` in a key.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

DPI = 100
CONFUSION_PNG = "confusion_matrix_test.png"
RELIABILITY_PNG = "reliability_test.png"
RESIDUALS_PNG = "residuals_test.png"
ANOMALY_PNG = "anomaly_scores_test.png"
COMPARISON_PNG = "comparison.png"
METRICS_JSON = "test_metrics.json"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_name(text: str) -> str:
    """A class name as part of an MLflow metric key: runs of other characters become one '_'."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))).strip("_") or "_"


def class_metrics(result: dict, classes: list[str], prefix: str = "test_") -> dict[str, float]:
    """Per-class precision, recall and F1 as flat MLflow metrics, e.g. test_f1.ir_007 (names
    made unique if sanitising merges two). A class the split neither holds nor predicts has no
    defined metric and gets none (it is also left out of macro F1)."""
    out: dict[str, float] = {}
    used: dict[str, int] = {}
    conf = np.asarray(result.get("confusion") or [], dtype=np.float64)
    for i, name in enumerate(classes):
        key = metric_name(name)
        used[key] = used.get(key, 0) + 1
        key = key if used[key] == 1 else f"{key}_{used[key]}"
        if conf.ndim == 2 and i < len(conf) and conf[i].sum() == 0 and conf[:, i].sum() == 0:
            continue
        for metric in ("precision", "recall", "f1"):
            values = result.get(metric) or []
            if i < len(values):
                out[f"{prefix}{metric}.{key}"] = float(values[i])
    return out


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, format="png")
    _plt().close(fig)
    return path


def confusion_png(confusion, classes: list[str], path: Path, title: str = "") -> Path:
    """Counts and the row-normalised matrix (recall on the diagonal), side by side."""
    plt = _plt()
    conf = np.asarray(confusion, dtype=np.float64)
    k = len(classes)
    side = max(4.0, 1.5 + 0.45 * k)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    for ax, data, fmt, name in ((axes[0], conf, "{:.0f}", "counts"), (axes[1], norm, "{:.2f}", "share of the true class")):
        ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        top = data.max() if data.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if top and data[i, j] > top / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.15, right=0.98, bottom=0.22, top=0.88, wspace=0.45)
    return _save(fig, path)


def reliability_png(reliability: dict, ece: float, path: Path) -> Path:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), and how many
    predictions fall in each bin."""
    plt = _plt()
    count = np.asarray(reliability["count"], dtype=np.float64)
    acc = np.asarray(reliability["accuracy"], dtype=np.float64)
    conf = np.asarray(reliability["confidence"], dtype=np.float64)
    bins = len(count)
    centres = (np.arange(bins) + 0.5) / bins
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]})
    has = count > 0
    top.bar(centres[has], acc[has], width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    top.plot(conf[has], acc[has], "o", color="tab:red", label="mean confidence of the bin")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability (test), ECE {ece:.4f}" if math.isfinite(ece) else "reliability (test)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, count, width=1 / bins, edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("predictions")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.09, top=0.94, hspace=0.3)
    return _save(fig, path)


def residual_png(points: dict, metrics: dict, path: Path, unit: str = "") -> Path:
    """Prediction against truth (with the identity line) and the residual against the prediction."""
    plt = _plt()
    y = np.asarray(points["target"], dtype=np.float64)
    p = np.asarray(points["prediction"], dtype=np.float64)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    left.scatter(y, p, s=6, alpha=0.4)
    if y.size:
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        left.plot([lo, hi], [lo, hi], "--", color="grey")
    suffix = f" [{unit}]" if unit else ""
    left.set_xlabel("true" + suffix)
    left.set_ylabel("predicted" + suffix)
    left.set_title("MAE {mae:.4g}, RMSE {rmse:.4g}, R² {r2:.3f}".format(**{k: metrics.get(k, math.nan) for k in ("mae", "rmse", "r2")}))
    right.scatter(p, p - y, s=6, alpha=0.4)
    right.axhline(0, color="grey", linestyle="--")
    right.set_xlabel("predicted" + suffix)
    right.set_ylabel("residual (predicted - true)")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.11, top=0.92, wspace=0.28)
    return _save(fig, path)


def roc_curve(scores, is_anomaly) -> tuple[np.ndarray, np.ndarray]:
    """False-positive and true-positive rates at every distinct threshold, from (0,0) to (1,1)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_anomaly, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)  # end of each tie group
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def anomaly_png(scores, is_anomaly, threshold: float | None, metrics: dict, path: Path) -> Path:
    """Score histograms of normal and anomalous test samples with the threshold, and the ROC."""
    plt = _plt()
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_anomaly, dtype=bool)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    edges = np.histogram_bin_edges(s, bins=40) if s.size else np.linspace(0, 1, 41)
    left.hist(s[~y], bins=edges, alpha=0.6, label=f"normal ({int((~y).sum())})", density=True)
    left.hist(s[y], bins=edges, alpha=0.6, label=f"anomalous ({int(y.sum())})", density=True)
    if threshold is not None:
        left.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    left.set_xlabel("anomaly score (Mahalanobis distance)")
    left.set_ylabel("density")
    left.legend(fontsize=8)
    left.set_title("F1 {:.3f}, false alarms {:.3f} at the threshold".format(metrics.get("f1", math.nan),
                                                                            metrics.get("false_alarm_rate", math.nan)))
    fpr, tpr = roc_curve(s, y)
    right.plot(fpr, tpr)
    right.plot([0, 1], [0, 1], "--", color="grey")
    right.set_xlabel("false-positive rate")
    right.set_ylabel("true-positive rate")
    right.set_title(f"ROC, AUROC {metrics.get('auroc', math.nan):.4f}")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.11, top=0.92, wspace=0.25)
    return _save(fig, path)


def comparison_png(rows: list[dict], metrics: list[str], path: Path, title: str = "") -> Path:
    """Grouped bars: one group per metric, one bar per run (e.g. fine-tuned and from scratch)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = [row["metrics"].get(m, math.nan) for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + i * width, [0 if not math.isfinite(v) else v for v in values], width,
                      label=row["variant"])
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.3f}" if math.isfinite(v) else "n/a",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(rows) - 1) / 2, metrics)
    ax.set_ylabel("test value")
    ax.set_title(title)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.9)
    return _save(fig, path)


def _finite(value):
    """JSON without NaN: undefined numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(data, path: Path) -> Path:
    Path(path).write_text(json.dumps(_finite(data), indent=2, ensure_ascii=False))
    return Path(path)


def write_test_reports(task: str, test: dict, classes: list[str], folder: Path, unit: str = "") -> list[Path]:
    """The plots and the metrics JSON of a test result (trainers.tasks) in `folder`."""
    folder = Path(folder)
    per_sample = ("scores", "is_anomaly", "points")
    files = [write_json({k: v for k, v in test.items() if k not in per_sample}, folder / METRICS_JSON)]
    if task == "classification":
        files.append(confusion_png(test["confusion"], classes, folder / CONFUSION_PNG,
                                   f"test accuracy {test['accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} (n={test['n']})"))
        files.append(reliability_png(test["reliability"], test["ece"], folder / RELIABILITY_PNG))
    elif task == "regression":
        files.append(residual_png(test["points"], test, folder / RESIDUALS_PNG, unit))
    elif task == "anomaly":
        files.append(anomaly_png(test["scores"], test["is_anomaly"], test.get("threshold"), test, folder / ANOMALY_PNG))
    return files
