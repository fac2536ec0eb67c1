"""Task kinds of the multimodal family: the loss, how a split is scored, and the final metrics.

Why one module: the train loop is one function for every task. It asks the task for the split's
arrays, the loss of a batch and a scorer for evaluation, and never branches on the task itself.
Metrics are exact functions of plain counts (unit-tested on hand-made numbers); under several
workers each rank scores its own shard, counts and sums are all-reduced, and the per-sample
values a metric needs whole (anomaly scores for AUROC and the threshold's quantile, a capped set
of regression points for the residual plot) are all-gathered.

classification
    Cross-entropy (with the recipe's label smoothing). Scored by the confusion matrix: accuracy,
    per-class precision, recall and F1, macro F1 (over the classes that occur in the truth or the
    predictions, as scikit-learn does), and calibration: the expected calibration error over 15
    equal-width confidence bins (Guo et al., 2017) with the bins of a reliability diagram.

regression
    The head predicts the target standardised with the training split's mean and std; the model
    keeps both as buffers and answers in the target's own units, so a served model does too.
    Huber (default) or squared error on the standardised scale. Scored by MAE, RMSE and R^2
    (1 - SSE/SST over the split), plus (target, prediction) pairs for the residual plot.

anomaly (trained on normal data only; no anomaly is ever seen in training)
    Score: the Mahalanobis distance of the fused embedding z to a Gaussian fitted on the training
    split's normal samples (their mean, and their covariance shrunk toward a scaled identity so
    it stays invertible with few samples). It needs no anomalies, it works on any embedding —
    a pretrained encoder's features already describe normal data well (Rippel et al., 2020,
    "Modeling the distribution of normal data in pre-trained deep features") — and it is one
    closed-form fit, stored in the model as buffers, so the exported model returns the score
    from one forward pass.
    Training from scratch needs an objective without anomalies: a self-supervised pretext task
    on the normal samples (Golan & El-Yaniv, 2018; Hendrycks et al., 2019). Each training sample
    gets one of four transforms — of its sensor window: identity, time reversal, sign flip, both;
    of its image: rotation by 0, 90, 180 or 270 degrees — and the head learns which one. To tell
    them apart the encoders must learn what normal signals look like (how vibration decays after
    an impact, which way busbars run), which is what makes z a description of normal data; the
    same objective fine-tunes a pretrained encoder. Deep SVDD was not chosen: this model's
    biases, learned fusion token and LayerNorm let it map every input onto the centre (collapse).
    Threshold: the score above which at most `anomaly.false_alarm_rate` of the validation split's
    normal samples lie; it is recorded in the model card. Scored on the test split (normal class
    against every other class): AUROC, and precision, recall, F1 and false-alarm rate at the
    threshold.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from indai.platform.errors import UserError
from indai.trainers.models.multimodal.config import ANOMALY_PRETEXT, ModelConfig

ECE_BINS = 15
MAX_POINTS = 20_000  # regression pairs each rank keeps for the residual plot
HEADLINE = {"classification": "accuracy", "regression": "mae", "anomaly": "auroc"}
COMPARED = {"classification": ["accuracy", "macro_f1", "ece"], "regression": ["mae", "rmse", "r2"],
            "anomaly": ["auroc", "f1", "false_alarm_rate"]}
LOWER_IS_BETTER = {"ece", "mae", "rmse", "false_alarm_rate", "loss"}


# ---- exact metrics on plain numbers ----------------------------------------------------------------

def per_class_metrics(confusion) -> dict:
    """Accuracy, per-class precision/recall/F1/support and macro F1 of a confusion matrix
    (rows: true class, columns: predicted). An undefined ratio counts as 0 (no prediction of a
    class: precision 0); macro F1 averages the classes present in the truth or the predictions."""
    c = np.asarray(confusion, dtype=np.float64)
    tp, support, predicted = np.diag(c), c.sum(axis=1), c.sum(axis=0)
    zero = np.zeros_like(tp)
    precision = np.divide(tp, predicted, out=zero.copy(), where=predicted > 0)
    recall = np.divide(tp, support, out=zero.copy(), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=zero.copy(), where=(precision + recall) > 0)
    seen = (support > 0) | (predicted > 0)
    n = c.sum()
    return {"accuracy": float(tp.sum() / n) if n else math.nan, "precision": precision.tolist(), "recall": recall.tolist(),
            "f1": f1.tolist(), "support": support.astype(int).tolist(),
            "macro_f1": float(f1[seen].mean()) if seen.any() else math.nan}


def calibration_bin(confidence: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Bin index of each confidence: bin m holds ((m)/B, (m+1)/B] (Guo et al.; 0 goes to bin 0)."""
    return (confidence * bins).ceil().long().clamp(1, bins) - 1


def expected_calibration_error(count, confidence_sum, correct_sum) -> float:
    """ECE = sum over bins of n_b/N * |accuracy_b - confidence_b| = sum |correct_b - conf_b| / N."""
    count, conf, correct = (np.asarray(x, dtype=np.float64) for x in (count, confidence_sum, correct_sum))
    n = count.sum()
    return float(np.abs(correct - conf).sum() / n) if n else math.nan


def regression_metrics(n: float, abs_error: float, sq_error: float, target_sum: float, target_sq: float) -> dict:
    """MAE, RMSE and R^2 = 1 - SSE/SST from the split's sums (SST from the split's own mean)."""
    if n <= 0:
        return {"mae": math.nan, "rmse": math.nan, "r2": math.nan}
    sst = target_sq - target_sum * target_sum / n
    return {"mae": abs_error / n, "rmse": math.sqrt(sq_error / n), "r2": 1.0 - sq_error / sst if sst > 0 else math.nan}


def auroc(scores, is_anomaly) -> float:
    """Area under the ROC curve: the probability that an anomaly outscores a normal sample, ties
    counted half (Mann-Whitney U with average ranks). NaN when a class is missing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_anomaly, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty_like(s)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average rank of each tie group
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def threshold_at(normal_scores, false_alarm_rate: float) -> float:
    """The smallest of the normal scores that at most floor(rate * n) normal scores exceed:
    flagging `score > threshold` then raises at most that share of false alarms on them."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise UserError("task anomaly calibrates its threshold on the validation split's normal samples, and it has none: "
                        "give the val split a share of the normal class (split fractions)")
    allowed = int(math.floor(false_alarm_rate * s.size + 1e-9))
    return float(s[min(allowed, s.size - 1)])


def detection_metrics(scores, is_anomaly, threshold: float) -> dict:
    """Precision, recall, F1 and false-alarm rate of `score > threshold` (undefined ratios: 0)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_anomaly, dtype=bool)
    flag = s > threshold
    tp, fp = int((flag & y).sum()), int((flag & ~y).sum())
    fn, tn = int((~flag & y).sum()), int((~flag & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "false_alarm_rate": fp / (fp + tn) if fp + tn else math.nan,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def gaussian(n: torch.Tensor, total: torch.Tensor, outer: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, precision) of samples given their count, sum and sum of outer products; the
    covariance is shrunk toward tr(cov)/d * I by `shrinkage` (and kept positive definite)."""
    n = float(n)
    if n < 2:
        raise UserError(f"task anomaly fits the normal class's Gaussian on {int(n)} training sample(s): it needs at least 2")
    mean = total.double() / n
    cov = (outer.double() - n * torch.outer(mean, mean)) / (n - 1)
    d = cov.shape[0]
    scale = torch.trace(cov) / d
    eye = torch.eye(d, dtype=torch.float64, device=cov.device)
    cov = (1 - shrinkage) * cov + shrinkage * scale * eye + 1e-6 * max(float(scale), 1e-12) * eye
    return mean, torch.linalg.inv(cov)


def scalars(result: dict) -> dict[str, float]:
    """The finite numbers of a scoring result (what goes to MLflow as metrics)."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# ---- across ranks ------------------------------------------------------------------------------------

def _sum_across(*tensors: torch.Tensor) -> None:
    if dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def _gather(values: np.ndarray) -> np.ndarray:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return np.concatenate(parts)


def select_rows(arrays: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """The rows `keep` of a split's arrays (a windowed recording's signal stays whole: its
    window starts are what is selected)."""
    n = len(arrays["label"])
    return {k: (v[keep] if k != "sensor_signal" and isinstance(v, np.ndarray) and v.shape[:1] == (n,) else v)
            for k, v in arrays.items()}


# ---- the tasks -----------------------------------------------------------------------------------------

class Task:
    """What the loop needs of a task; classification is the base behaviour."""

    name = "classification"

    def __init__(self, model_cfg: ModelConfig, classes: list[str], label_smoothing: float = 0.0):
        self.cfg, self.classes, self.label_smoothing = model_cfg, list(classes), label_smoothing

    needs_fit = False  # anomaly: fit the normal Gaussian on the training split before scoring

    def split_arrays(self, arrays: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
        return arrays

    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def loss(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(out.float(), batch["label"], label_smoothing=self.label_smoothing)

    def scorer(self, device: torch.device) -> "ClassificationScorer":
        return ClassificationScorer(len(self.classes) or self.cfg.num_classes, device)

    def fit(self, outputs: Iterable[tuple[torch.Tensor, dict]], model: torch.nn.Module) -> None:
        pass

    def finish(self, test: dict, val: dict | None) -> dict:
        return test


class ClassificationScorer:
    def __init__(self, num_classes: int, device: torch.device):
        self.k = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        self.loss = torch.zeros(1, dtype=torch.float64, device=device)
        self.bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)  # count, confidence, correct

    def add(self, out: torch.Tensor, batch: dict) -> None:
        logits, label = out.float(), batch["label"]
        self.loss += F.cross_entropy(logits, label, reduction="sum").double()
        confidence, predicted = torch.softmax(logits, dim=-1).max(dim=-1)
        idx = label * self.k + predicted
        self.confusion += torch.bincount(idx, minlength=self.k * self.k).view(self.k, self.k).double()
        b = calibration_bin(confidence)
        self.bins[0] += torch.bincount(b, minlength=ECE_BINS).double()
        self.bins[1] += torch.bincount(b, weights=confidence.double(), minlength=ECE_BINS)
        self.bins[2] += torch.bincount(b, weights=(predicted == label).double(), minlength=ECE_BINS)

    def result(self) -> dict:
        _sum_across(self.confusion, self.loss, self.bins)
        n = self.confusion.sum().item()
        count, conf, correct = self.bins.cpu().numpy()
        out = {"loss": self.loss.item() / max(n, 1), "n": int(n), "confusion": self.confusion.long().cpu().tolist(),
               **per_class_metrics(self.confusion.cpu().numpy()), "ece": expected_calibration_error(count, conf, correct)}
        with np.errstate(invalid="ignore", divide="ignore"):
            out["reliability"] = {"count": count.astype(int).tolist(), "confidence": (conf / count).tolist(),
                                  "accuracy": (correct / count).tolist()}
        return out


class RegressionTask(Task):
    name = "regression"

    def split_arrays(self, arrays: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
        if "target" not in arrays:
            raise UserError("task regression needs a dataset with numeric targets: ingest it with labels.type: regression")
        return dict(arrays, label=np.asarray(arrays["target"], dtype=np.float32))

    def _standardised(self, value: torch.Tensor) -> torch.Tensor:
        return (value - (self.cfg.target_mean or 0.0)) / (self.cfg.target_std or 1.0)

    def loss(self, out: torch.Tensor, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        pred, target = self._standardised(out.float()), self._standardised(batch["label"].float())
        if self.cfg.regression.loss == "mse":
            return F.mse_loss(pred, target, reduction=reduction)
        return F.huber_loss(pred, target, delta=self.cfg.regression.huber_delta, reduction=reduction)

    def scorer(self, device: torch.device) -> "RegressionScorer":
        return RegressionScorer(self, device)


def target_stats(train_targets: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the training targets (std floored, so a constant target still trains)."""
    t = np.asarray(train_targets, dtype=np.float64)
    t = t[np.isfinite(t)]
    if t.size == 0:
        raise UserError("task regression: the training split has no numeric target")
    return float(t.mean()), float(max(t.std(), 1e-6 * max(1.0, abs(t.mean()))))


class RegressionScorer:
    def __init__(self, task: RegressionTask, device: torch.device):
        self.task = task
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)  # n, loss, |e|, e^2, y, y^2
        self.points: list[np.ndarray] = []
        self.kept = 0

    def add(self, out: torch.Tensor, batch: dict) -> None:
        pred, target = out.float(), batch["label"].float()
        err = (pred - target).double()
        t = target.double()
        self.sums += torch.stack([torch.tensor(float(len(t)), dtype=torch.float64, device=t.device),
                                  self.task.loss(pred, batch, reduction="sum").double(), err.abs().sum(), (err * err).sum(),
                                  t.sum(), (t * t).sum()])
        if self.kept < MAX_POINTS:
            pair = torch.stack([target, pred], dim=1)[: MAX_POINTS - self.kept].cpu().numpy()
            self.points.append(pair)
            self.kept += len(pair)

    def result(self) -> dict:
        _sum_across(self.sums)
        n, loss, abs_e, sq_e, y, y2 = self.sums.tolist()
        pairs = _gather(np.concatenate(self.points) if self.points else np.zeros((0, 2), np.float32))
        return {"loss": loss / max(n, 1), "n": int(n), **regression_metrics(n, abs_e, sq_e, y, y2),
                "points": {"target": pairs[:, 0].tolist(), "prediction": pairs[:, 1].tolist()}}


class AnomalyTask(Task):
    name = "anomaly"
    needs_fit = True

    def __init__(self, model_cfg: ModelConfig, classes: list[str], label_smoothing: float = 0.0):
        super().__init__(model_cfg, classes, label_smoothing)
        normal = model_cfg.anomaly.normal_class
        if normal is None or normal not in self.classes:
            raise UserError(f"task anomaly needs model.anomaly.normal_class set to the normal class, one of {self.classes}"
                            + (f" (not {normal!r})" if normal is not None else ""))
        self.normal = self.classes.index(normal)

    def split_arrays(self, arrays: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
        """Training keeps only the normal class; validation and test label 1 = anomaly, 0 = normal."""
        normal = np.asarray(arrays["label"]) == self.normal
        if split == "train":
            if not normal.any():
                raise UserError(f"task anomaly: the training split holds no sample of the normal class {self.classes[self.normal]!r}")
            kept = select_rows(arrays, normal)
            return dict(kept, label=np.zeros(int(normal.sum()), dtype=np.int64))
        return dict(arrays, label=(~normal).astype(np.int64))

    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each sample gets a random pretext transform k (see the module doc); the head learns k."""
        ref = batch["label"]
        k = torch.randint(0, ANOMALY_PRETEXT, (ref.shape[0],), device=ref.device)
        out = dict(batch, pretext=k)
        if "sensor" in batch:
            x = batch["sensor"]
            x = torch.where((k & 1).bool()[:, None, None], x.flip(-1), x)
            out["sensor"] = torch.where((k & 2).bool()[:, None, None], -x, x)
        if "image" in batch:
            x = batch["image"].clone()
            for turn in range(1, ANOMALY_PRETEXT):
                rows = k == turn
                if rows.any():
                    x[rows] = torch.rot90(batch["image"][rows], turn, dims=(-2, -1))
            out["image"] = x
        return out

    def loss(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(out[:, 1: 1 + ANOMALY_PRETEXT].float(), batch["pretext"])

    def scorer(self, device: torch.device) -> "AnomalyScorer":
        return AnomalyScorer()

    @torch.no_grad()
    def fit(self, outputs: Iterable[tuple[torch.Tensor, dict]], model: torch.nn.Module) -> None:
        """Fit the normal Gaussian on the training split's fused embeddings (summed across ranks)
        and write it into the model's buffers, on every rank alike."""
        d = self.cfg.dim
        device = model.anomaly_mean.device
        n = torch.zeros(1, dtype=torch.float64, device=device)
        total = torch.zeros(d, dtype=torch.float64, device=device)
        outer = torch.zeros(d, d, dtype=torch.float64, device=device)
        for out, _ in outputs:
            z = out[:, 1 + ANOMALY_PRETEXT:].double()
            n += z.shape[0]
            total += z.sum(dim=0)
            outer += z.T @ z
        _sum_across(n, total, outer)
        mean, precision = gaussian(n.item(), total, outer, self.cfg.anomaly.shrinkage)
        model.anomaly_mean.copy_(mean.to(model.anomaly_mean.dtype))
        model.anomaly_precision.copy_(precision.to(model.anomaly_precision.dtype))

    def finish(self, test: dict, val: dict | None) -> dict:
        """The threshold from the validation normals, and the test split's detection at it."""
        if not val or "scores" not in val:
            raise UserError("task anomaly calibrates its threshold on the validation split: the dataset has none")
        v_scores, v_anom = np.asarray(val["scores"]), np.asarray(val["is_anomaly"], dtype=bool)
        rate = self.cfg.anomaly.false_alarm_rate
        threshold = threshold_at(v_scores[~v_anom], rate)
        out = dict(test, threshold=threshold, target_false_alarm_rate=rate, calibration_normals=int((~v_anom).sum()))
        out.update(detection_metrics(test["scores"], test["is_anomaly"], threshold))
        out["calibration_false_alarm_rate"] = detection_metrics(v_scores[~v_anom], v_anom[~v_anom], threshold)["false_alarm_rate"]
        return out


class AnomalyScorer:
    def __init__(self):
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, out: torch.Tensor, batch: dict) -> None:
        self.scores.append(out[:, 0].float().cpu().numpy())
        self.labels.append(batch["label"].cpu().numpy().astype(bool))

    def result(self) -> dict:
        scores = _gather(np.concatenate(self.scores) if self.scores else np.zeros(0, np.float32))
        labels = _gather(np.concatenate(self.labels) if self.labels else np.zeros(0, bool))
        return {"n": int(scores.size), "n_normal": int((~labels).sum()), "n_anomalous": int(labels.sum()),
                "auroc": auroc(scores, labels), "scores": scores.tolist(), "is_anomaly": labels.astype(int).tolist()}


TASKS = {"classification": Task, "regression": RegressionTask, "anomaly": AnomalyTask}


def make(model_cfg: ModelConfig, classes: list[str], label_smoothing: float = 0.0) -> Task:
    """The task object of a model config (classes: the dataset's, in manifest order)."""
    return TASKS[model_cfg.task](model_cfg, classes, label_smoothing)
