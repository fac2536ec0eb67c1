"""Task kinds (trainers.tasks): losses, metrics exact on hand-made numbers, the anomaly pretext
and Gaussian, the same numbers under two gloo processes as in one, and the served answer of
each task through a real exported program (platform.model_format)."""
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from indai.platform.config import load_config, recipe_command
from indai.platform.errors import UserError
from indai.trainers import tasks
from indai.trainers.models.multimodal.config import ANOMALY_PRETEXT, ModelConfig

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def model_cfg(task: str, **extra) -> ModelConfig:
    return ModelConfig.model_validate({"flavour": "debug", "modalities": ["sensor"], "task": task, "num_classes": 3,
                                       "sensor": {"channels": 2, "length": 256}, **extra})


# ---- classification --------------------------------------------------------------------------------

def test_per_class_precision_recall_f1_by_hand():
    m = tasks.per_class_metrics([[3, 1], [2, 4]])
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx([3 / 5, 4 / 5]) and m["recall"] == pytest.approx([3 / 4, 4 / 6])
    assert m["f1"] == pytest.approx([2 * 0.6 * 0.75 / 1.35, 2 * 0.8 * (2 / 3) / (0.8 + 2 / 3)])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 8 / 11) / 2)
    assert m["support"] == [4, 6]


def test_a_class_never_predicted_scores_zero_and_an_absent_class_is_left_out_of_macro_f1():
    # class 1 is never predicted (precision undefined -> 0); class 3 neither occurs nor is predicted
    conf = [[2, 0, 1, 0], [0, 0, 2, 0], [0, 0, 3, 0], [0, 0, 0, 0]]
    m = tasks.per_class_metrics(conf)
    assert m["precision"] == pytest.approx([1.0, 0.0, 0.5, 0.0]) and m["recall"] == pytest.approx([2 / 3, 0.0, 1.0, 0.0])
    assert m["f1"] == pytest.approx([0.8, 0.0, 2 / 3, 0.0])
    assert m["macro_f1"] == pytest.approx((0.8 + 0.0 + 2 / 3) / 3)
    from sklearn.metrics import f1_score

    truth = [0, 0, 0, 1, 1, 2, 2, 2]
    pred = [0, 0, 2, 2, 2, 2, 2, 2]
    assert m["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro", zero_division=0))


def test_calibration_bins_are_right_closed():
    conf = torch.tensor([0.0, 1 / 15, 1 / 15 + 1e-6, 0.5, 1.0])
    assert tasks.calibration_bin(conf).tolist() == [0, 0, 1, 7, 14]


def _two_class_logits(confidence: list[float], predicted: list[int]) -> torch.Tensor:
    """Logits whose softmax gives `confidence` to class `predicted`."""
    c = torch.tensor(confidence, dtype=torch.float64)
    margin = torch.log(c / (1 - c))
    logits = torch.zeros(len(c), 2, dtype=torch.float64)
    logits[torch.arange(len(c)), torch.tensor(predicted)] = margin
    return logits.float()


def test_expected_calibration_error_by_hand():
    # confidences 0.95, 0.95 (bin 14: one right, one wrong), 0.55 (bin 8, right), 0.65 (bin 9, right)
    scorer = tasks.ClassificationScorer(2, CPU)
    logits = _two_class_logits([0.95, 0.95, 0.55, 0.65], [1, 1, 0, 0])
    scorer.add(logits, {"label": torch.tensor([1, 0, 0, 0])})
    r = scorer.result()
    assert r["ece"] == pytest.approx((abs(1 - 1.9) + abs(1 - 0.55) + abs(1 - 0.65)) / 4, abs=1e-6)
    assert r["reliability"]["count"][14] == 2 and r["reliability"]["accuracy"][14] == pytest.approx(0.5)
    assert r["reliability"]["confidence"][8] == pytest.approx(0.55, abs=1e-6)
    assert sum(r["reliability"]["count"]) == 4 and math.isnan(r["reliability"]["accuracy"][0])
    assert r["accuracy"] == pytest.approx(0.75) and r["confusion"] == [[2, 1], [0, 1]]
    assert math.isnan(tasks.expected_calibration_error([0, 0], [0, 0], [0, 0]))  # no prediction: undefined


def test_classification_loss_is_cross_entropy_with_label_smoothing():
    task = tasks.make(model_cfg("classification"), ["a", "b", "c"], label_smoothing=0.1)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)[0]
    expected = -(0.9 + 0.1 / 3) * torch.log(p[0]) - (0.1 / 3) * (torch.log(p[1]) + torch.log(p[2]))
    assert task.loss(logits, {"label": torch.tensor([0])}).item() == pytest.approx(expected.item(), rel=1e-5)


# ---- regression ------------------------------------------------------------------------------------

def test_regression_metrics_and_loss_by_hand():
    y, pred = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.5, 2.0, 2.0, 5.0])
    task = tasks.make(model_cfg("regression", target_mean=2.5, target_std=2.0), [])
    scorer = task.scorer(CPU)
    scorer.add(pred[:2], {"label": y[:2]})
    scorer.add(pred[2:], {"label": y[2:]})
    r = scorer.result()
    assert r["mae"] == pytest.approx(0.625) and r["rmse"] == pytest.approx(0.75) and r["r2"] == pytest.approx(1 - 2.25 / 5)
    assert r["points"] == {"target": [1.0, 2.0, 3.0, 4.0], "prediction": [1.5, 2.0, 2.0, 5.0]}
    # Huber (delta 1) on errors standardised by the target std: 0.25, 0, 0.5, 0.5 -> 0.5 e^2
    assert task.loss(pred, {"label": y}).item() == pytest.approx(np.mean([0.03125, 0, 0.125, 0.125]))
    assert r["loss"] == pytest.approx(np.mean([0.03125, 0, 0.125, 0.125]))
    mse = tasks.make(model_cfg("regression", target_mean=2.5, target_std=2.0, regression={"loss": "mse"}), [])
    assert mse.loss(pred, {"label": y}).item() == pytest.approx(np.mean([0.0625, 0, 0.25, 0.25]))
    assert math.isnan(tasks.regression_metrics(2, 0.0, 0.0, 2.0, 2.0)["r2"])  # constant target: R^2 undefined


def test_regression_arrays_take_the_target_and_its_statistics():
    task = tasks.make(model_cfg("regression"), [])
    out = task.split_arrays({"label": np.zeros(3, np.int64), "target": np.array([0.0, 1 / 3, 1.0])}, "train")
    assert out["label"].dtype == np.float32 and out["label"].tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    mean, std = tasks.target_stats(np.array([0.0, 1.0, 2.0, np.nan]))
    assert mean == pytest.approx(1.0) and std == pytest.approx(np.std([0.0, 1.0, 2.0]))
    with pytest.raises(UserError, match="labels.type: regression"):
        task.split_arrays({"label": np.zeros(3, np.int64)}, "train")


def test_regression_model_answers_in_the_targets_units():
    from indai.trainers.models import create_model

    cfg = model_cfg("regression", target_mean=10.0, target_std=4.0)
    model = create_model(cfg).eval()
    x = {"sensor": torch.randn(3, 2, 256), "mask": torch.ones(3, 3)}
    with torch.no_grad():
        z_head = model.head(torch.zeros(1, cfg.dim))[0, 0]  # the head's output for z = 0 ...
        out = model(**x)
    assert out.shape == (3,)
    assert model.task_output(torch.zeros(1, cfg.dim)).item() == pytest.approx(z_head.item() * 4.0 + 10.0)  # ... scaled back


# ---- anomaly -----------------------------------------------------------------------------------------

def test_auroc_by_hand_with_ties():
    assert tasks.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert tasks.auroc([1, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(2.5 / 4)  # the 1-1 tie counts half
    assert math.isnan(tasks.auroc([1, 2], [0, 0]))
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200).astype(float), rng.integers(0, 2, 200)
    assert tasks.auroc(s, y) == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("rate,threshold", [(0.1, 9.0), (0.05, 10.0), (0.25, 8.0), (0.999, 1.0)])
def test_threshold_keeps_false_alarms_at_most_the_target_rate(rate, threshold):
    normal = np.arange(1.0, 11.0)
    t = tasks.threshold_at(normal, rate)
    assert t == threshold
    assert (normal > t).mean() <= rate


def test_threshold_with_ties_never_exceeds_the_rate():
    t = tasks.threshold_at([5, 5, 5, 1], 0.5)
    assert t == 5 and tasks.detection_metrics([5, 5, 5, 1], [0, 0, 0, 0], t)["false_alarm_rate"] == 0.0
    with pytest.raises(UserError, match="no"):
        tasks.threshold_at([], 0.05)


def test_detection_metrics_by_hand():
    m = tasks.detection_metrics([1, 2, 3, 4], [0, 0, 1, 1], 1.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 0, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0 and m["f1"] == pytest.approx(0.8)
    assert m["false_alarm_rate"] == 0.5
    assert tasks.detection_metrics([1, 2], [1, 1], 5.0)["precision"] == 0.0  # nothing flagged


def test_gaussian_mean_precision_and_shrinkage():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    args = (4, x.sum(0), x.T @ x)
    mean, precision = tasks.gaussian(*args, shrinkage=0.0)
    assert mean.tolist() == [0.0, 0.0]
    assert torch.allclose(precision, torch.diag(torch.tensor([1.5, 0.375], dtype=torch.float64)), rtol=1e-4)
    _, full = tasks.gaussian(*args, shrinkage=1.0)  # all the way to tr(cov)/d = 5/3
    assert torch.allclose(full, 0.6 * torch.eye(2, dtype=torch.float64), rtol=1e-4)
    with pytest.raises(UserError, match="at least 2"):
        tasks.gaussian(1, x[0], torch.outer(x[0], x[0]), 0.1)


def test_anomaly_fit_makes_the_score_a_mahalanobis_distance():
    """Fitted on the same embeddings without shrinkage, the mean squared score is d (n-1)/n."""
    from indai.trainers.models import create_model

    torch.manual_seed(0)
    cfg = model_cfg("anomaly", anomaly={"normal_class": "a", "shrinkage": 0.0})
    model = create_model(cfg).eval()
    with torch.no_grad():
        out = model(sensor=torch.randn(5, 2, 256), mask=torch.ones(5, 3))
        assert out.shape == (5, 1 + ANOMALY_PRETEXT + cfg.dim)
        assert torch.allclose(out[:, 0], out[:, 1 + ANOMALY_PRETEXT:].norm(dim=1), rtol=1e-4)  # unfitted: |z|
        n, d = 300, cfg.dim
        z = torch.randn(n, d) @ torch.randn(d, d) + 3.0  # correlated, off-centre embeddings
        outputs = torch.cat([torch.zeros(n, 1 + ANOMALY_PRETEXT), z], dim=1)
        tasks.make(cfg, ["a", "b"]).fit([(outputs[:100], {}), (outputs[100:], {})], model)  # batches, as a loader gives
        score = model.task_output(z)[:, 0].double()
    assert model.anomaly_mean.tolist() == pytest.approx(z.mean(0).tolist(), abs=1e-4)
    assert (score ** 2).mean().item() == pytest.approx(d * (n - 1) / n, rel=1e-3)


def test_anomaly_trains_on_the_normal_class_only():
    task = tasks.make(model_cfg("anomaly", anomaly={"normal_class": "normal"}), ["fault", "normal"])
    signal = np.arange(20, dtype=np.float32).reshape(1, 20)
    arrays = {"sensor_signal": signal, "sensor_starts": np.array([0, 4, 8, 12]), "label": np.array([1, 0, 1, 0])}
    train = task.split_arrays(arrays, "train")
    assert train["sensor_starts"].tolist() == [0, 8] and train["sensor_signal"] is signal and train["label"].tolist() == [0, 0]
    assert task.split_arrays(arrays, "test")["label"].tolist() == [0, 1, 0, 1]  # 1 = anomaly
    with pytest.raises(UserError, match="normal_class"):
        tasks.make(model_cfg("anomaly", anomaly={"normal_class": "nope"}), ["fault", "normal"])
    with pytest.raises(UserError, match="no sample of the normal class"):
        task.split_arrays(dict(arrays, label=np.array([0, 0, 0, 0])), "train")


def test_anomaly_pretext_transforms_each_sample_as_labelled():
    task = tasks.make(model_cfg("anomaly", anomaly={"normal_class": "a"}), ["a", "b"])
    torch.manual_seed(1)
    sensor, image = torch.randn(64, 2, 8), torch.rand(64, 3, 5, 5)
    out = task.train_batch({"sensor": sensor, "image": image, "label": torch.zeros(64, dtype=torch.long)})
    k = out["pretext"]
    assert set(k.tolist()) == set(range(ANOMALY_PRETEXT))
    for i in range(64):
        expected = sensor[i].flip(-1) if k[i] & 1 else sensor[i]
        expected = -expected if k[i] & 2 else expected
        assert torch.equal(out["sensor"][i], expected)
        assert torch.equal(out["image"][i], torch.rot90(image[i], int(k[i]), dims=(-2, -1)))
    logits = torch.zeros(64, 1 + ANOMALY_PRETEXT + 4)
    logits[torch.arange(64), 1 + k] = 20.0  # the right transform, confidently
    assert task.loss(logits, out).item() < 1e-6
    assert task.loss(torch.zeros_like(logits), out).item() == pytest.approx(math.log(ANOMALY_PRETEXT))


def test_anomaly_needs_a_transformable_modality():
    with pytest.raises(ValueError, match="sensor or image"):
        ModelConfig.model_validate({"modalities": ["text"], "task": "anomaly"})


def test_anomaly_threshold_and_detection_from_validation_normals():
    task = tasks.make(model_cfg("anomaly", anomaly={"normal_class": "a", "false_alarm_rate": 0.1}), ["a", "b"])
    val = {"scores": list(np.arange(1.0, 11.0)) + [50.0], "is_anomaly": [0] * 10 + [1]}
    test = {"scores": [2.0, 9.5, 12.0, 3.0], "is_anomaly": [0, 0, 1, 1], "auroc": 0.5}
    out = task.finish(test, val)
    assert out["threshold"] == 9.0 and out["calibration_normals"] == 10 and out["calibration_false_alarm_rate"] == pytest.approx(0.1)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (1, 1, 1, 1)
    with pytest.raises(UserError, match="validation"):
        task.finish(test, {})


# ---- the same numbers under two processes ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _score_shard(rank: int, world: int, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        json.dump(_all_scores(rank, world), open(f"{out_dir}/rank{rank}.json", "w"))
    finally:
        dist.destroy_process_group()


def _all_scores(rank: int, world: int) -> dict:
    """Each task scored on rows rank::world of the same fixed data."""
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(30, 3, generator=g), torch.randint(0, 3, (30,), generator=g)
    target, pred = torch.randn(30, generator=g), torch.randn(30, generator=g)
    scores, anomalous = torch.randn(30, generator=g), torch.randint(0, 2, (30,), generator=g)
    rows = torch.arange(rank, 30, world)
    c = tasks.ClassificationScorer(3, CPU)
    c.add(logits[rows], {"label": labels[rows]})
    r = tasks.make(model_cfg("regression"), []).scorer(CPU)
    r.add(pred[rows], {"label": target[rows]})
    a = tasks.AnomalyScorer()
    a.add(scores[rows][:, None], {"label": anomalous[rows]})
    cr, rr, ar = c.result(), r.result(), a.result()
    return {"confusion": cr["confusion"], "ece": cr["ece"], "macro_f1": cr["macro_f1"], "mae": rr["mae"], "r2": rr["r2"],
            "points": sorted(rr["points"]["target"]), "auroc": ar["auroc"], "n": ar["n"], "scores": sorted(ar["scores"])}


def test_two_gloo_ranks_score_like_one_process(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_score_shard, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _all_scores(0, 1)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["confusion"] == single["confusion"] and got["n"] == 30 and got["points"] == pytest.approx(single["points"])
        for key in ("ece", "macro_f1", "mae", "r2", "auroc"):
            assert got[key] == pytest.approx(single[key], rel=1e-6), key
        assert got["scores"] == pytest.approx(single["scores"])


# ---- what a served model answers, by task --------------------------------------------------------------

@pytest.mark.parametrize("task", ["classification", "regression", "anomaly"])
def test_exported_model_answers_with_the_fields_of_its_task(task, tmp_path):
    from indai.platform.model_format import IndaiModel, write_card
    from indai.trainers.launch import task_card
    from indai.trainers.models import create_model
    from indai.trainers.models.multimodal.export import card_inputs, export

    cfg = model_cfg(task, target_mean=3.0, target_std=0.5, anomaly={"normal_class": "a"})
    model = create_model(cfg)
    export(model, tmp_path)
    result = {"test": {"threshold": 1.25, "target_false_alarm_rate": 0.05, "calibration_normals": 40}}
    card = {**task_card(cfg, result, {"classes": ["a", "b", "c"]}), "modalities": ["sensor"], "inputs": card_inputs(cfg, None)}
    write_card(tmp_path, card)
    loaded = IndaiModel.load(tmp_path)
    window = np.random.default_rng(0).normal(size=(2, 256)).tolist()
    [answer] = loaded.predict([{"sensor": window}])
    with torch.no_grad():
        direct = model.eval()(sensor=torch.tensor([window], dtype=torch.float32), mask=torch.tensor([[1.0, 0, 0]]))
    if task == "classification":
        assert set(answer) == {"label", "probabilities"} and set(answer["probabilities"]) == {"a", "b", "c"}
    elif task == "regression":
        assert set(answer) == {"value"} and answer["value"] == pytest.approx(direct.item(), rel=1e-4)
    else:
        assert set(answer) == {"score", "anomaly", "threshold"} and answer["threshold"] == 1.25
        assert answer["score"] == pytest.approx(direct[0, 0].item(), rel=1e-4)
        assert answer["anomaly"] == (answer["score"] > 1.25)
    assert IndaiModel.load(tmp_path).card["task"] == task


def test_a_card_without_task_is_a_classifier(tmp_path):
    import json

    from indai.platform.model_format import CARD, IndaiModel, write_card
    from indai.trainers.models import create_model
    from indai.trainers.models.multimodal.export import card_inputs, export

    cfg = model_cfg("classification")
    export(create_model(cfg), tmp_path)
    write_card(tmp_path, {"classes": ["a", "b", "c"], "modalities": ["sensor"], "inputs": card_inputs(cfg, None)})
    assert "task" not in json.loads((tmp_path / CARD).read_text())
    [answer] = IndaiModel.load(tmp_path).predict([{"sensor": np.zeros((2, 256)).tolist()}])
    assert set(answer) == {"label", "probabilities"}


# ---- recipes, dataset specs and the from-scratch twin ------------------------------------------------

SPECS = ["examples/elpv/quality.yaml", "examples/elpv/typed.yaml", "examples/cwru-0hp/anomaly.yaml"]


@pytest.mark.parametrize("spec", SPECS)
def test_new_dataset_specs_load_and_begin_with_their_command(spec):
    from indai.platform.ingest import DatasetSpec

    loaded = load_config(DatasetSpec, REPO / spec)
    assert recipe_command(REPO / spec) == f"indai data ingest {spec}"
    assert loaded.split.seed == 0 and loaded.sources


def recipe(name: str, *overrides: str):
    from indai.trainers.config import TrainConfig

    return load_config(TrainConfig, REPO / "trainers" / "recipes" / name, list(overrides))


def test_scratch_twin_drops_pretrained_weights_and_tuning():
    from indai.trainers.compare import scratch_config

    cfg = recipe("elpv_image.yaml")
    twin = scratch_config(cfg)
    assert cfg.model.image.pretrained == "efficientnet-lite0" and twin.model.image.pretrained is None
    assert twin.model.image.timm_name == cfg.model.image.timm_name and twin.model.image.tune.policy == "full"
    assert twin.model.image.tune.lr_mult == 1.0 and twin.run.name == "elpv-image-scratch" and twin.run.register_as is None
    assert twin.optim == cfg.optim and twin.run.seed == cfg.run.seed and twin.data == cfg.data and not twin.compare.scratch


def test_scratch_twin_of_a_hf_text_encoder():
    from indai.trainers.compare import scratch_config

    nestor = recipe("nestor_failure_mode.yaml")
    twin = scratch_config(nestor)  # the recipe's overrides: our byte transformer from scratch
    assert twin.model.text.kind == "byte_transformer" and twin.model.text.max_len == 64
    assert twin.model.text.pretrained is None and twin.model.text.config_from is None
    same_arch = scratch_config(recipe("nestor_failure_mode.yaml", "compare.scratch_overrides=[]"))
    assert same_arch.model.text.kind == "hf" and same_arch.model.text.config_from == "all-minilm-l6-v2"
    assert same_arch.model.text.pretrained is None


def test_a_recipe_without_pretrained_encoders_has_no_scratch_twin():
    from indai.trainers.compare import scratch_config

    with pytest.raises(UserError, match="no pretrained encoder"):
        scratch_config(recipe("cwru_sensor.yaml"))


def test_comparison_table_text():
    from indai.trainers.compare import format_table

    table = {"recipe": "r", "dataset": "d@v", "task": "regression", "seed": 0, "metrics": ["mae", "r2"],
             "rows": [{"variant": "fine-tuned", "metrics": {"mae": 0.25, "r2": float("nan")}, "train_seconds": 61.2,
                       "encoders": "image: x (m, full)"},
                      {"variant": "from scratch", "metrics": {"mae": 0.5, "r2": 0.1}, "train_seconds": 59.0,
                       "encoders": "image: x (scratch, full)"}]}
    lines = format_table(table).splitlines()
    assert lines[0] == "r on d@v (task regression, seed 0), test split:"
    assert lines[1].split() == ["variant", "mae", "r2", "train", "s", "encoders"]
    assert lines[2].split()[:4] == ["fine-tuned", "0.2500", "n/a", "61"] and lines[3].split()[:5] == ["from", "scratch", "0.5000",
                                                                                                      "0.1000", "59"]


def test_complete_from_manifest_checks_the_task_against_the_labels():
    from indai.trainers.launch import complete_from_manifest

    with pytest.raises(UserError, match="labels.type: regression"):
        complete_from_manifest(recipe("elpv_quality.yaml"), {"name": "x", "classes": ["a", "b"], "label_type": "classification"})
    done = complete_from_manifest(recipe("elpv_quality.yaml"), {"name": "x", "classes": [], "label_type": "regression",
                                                                "modalities": {"image": {"size": 128}}})
    assert done.model.image.size == 96  # the recipe's data.image_size, not the ingested 128
