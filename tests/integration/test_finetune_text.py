"""Fine-tuning a pretrained text encoder end to end: real excavator work orders (NIST Nestor, a
small subset), all-MiniLM-L6-v2 from the weight mirror with LoRA adapters, one epoch through
the real launcher (Ray Train + DeepSpeed, MLflow, the registry), then the registered model
loaded the way serving loads it, predicting from raw text with the tokenizer in its folder."""
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MODES = ["Leak", "Structural Integrity", "Missing / Loose"]
PER_MODE = 100


def small_nestor(folder: Path) -> Path:
    """A dataset spec over the first PER_MODE orders of three failure modes."""
    import pandas as pd

    csv = Path(metadata.distribution("nist-nestor").locate_file("nestor/datasets/excavators-cleaned.csv"))
    orders = pd.read_csv(csv)
    orders = orders[orders["FM"].isin(MODES) & orders["OriginalShorttext"].notna()]
    orders = orders.groupby("FM").head(PER_MODE).reset_index(drop=True)
    pd.DataFrame({"id": range(len(orders)), "text": orders["OriginalShorttext"], "mode": orders["FM"]}).to_csv(
        folder / "orders.csv", index=False)
    spec = folder / "dataset.yaml"
    spec.write_text("name: it-nestor-small\nmember: nist-demo\nlabels: {type: classification}\ntext: {max_chars: 128}\n"
                    "split: {by: random, train: 0.6, val: 0.2, test: 0.2}\n"
                    "sources: [{kind: table, path: orders.csv, event: id, text: [text], label: mode}]\n")
    return spec


def test_minilm_with_lora_trains_registers_and_serves(services, tmp_path):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from indai.platform import datasets, mirror
    from indai.platform.ingest import ingest
    from indai.platform.model_format import IndaiModel
    from indai.platform.storage import open_store
    from indai.trainers.config import TrainConfig
    from indai.trainers.launch import train

    store = open_store(services.store_uri)
    name, version, manifest = ingest(small_nestor(tmp_path), store, progress=False)
    assert sorted(manifest["classes"]) == sorted(MODES)
    mirror.add_packaged(store, ["all-minilm-l6-v2"])
    cfg = TrainConfig.model_validate({
        "recipe": "it_minilm_lora", "data": {"dataset": f"{name}@{version}"},
        "model": {"flavour": "debug", "modalities": ["text"], "dropout": 0.0,
                  "text": {"kind": "hf", "pretrained": "all-minilm-l6-v2", "max_len": 32,
                           "tune": {"policy": "lora", "lora": {"r": 8, "alpha": 16}}}},
        "optim": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_frac": 0.1},
        "run": {"name": "it-minilm", "register_as": "it-minilm", "workers": 1, "progress": False, "log_every": 5}})
    result = train(cfg, services)
    assert result.model_version == 1 and result.test_accuracy is not None

    params = MlflowClient(services.mlflow_uri).get_run(result.run_id).data.params
    assert params["model.text.tune.policy"] == "lora" and params["model.text.kind"] == "hf"
    trainable, total = int(params["tune.text.trainable_params"]), int(params["tune.text.total_params"])
    assert 0 < trainable < total // 20  # adapters and the projection only (MiniLM has 22.7 M)

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/it-minilm/{result.model_version}",
                                                      dst_path=str(tmp_path / "download"))) / "artifacts" / "indai_model"
    model = IndaiModel.load(folder)
    assert model.card["inputs"]["text"]["tokenizer"]["kind"] == "hf" and (folder / "tokenizer.json").is_file()
    assert set(model.module.state_dict()) and not any("lora" in k for k in model.module.state_dict())

    test = datasets.load_split(store, datasets.DatasetRef(name, version), "test", manifest)
    labels = [manifest["classes"][int(i)] for i in test["label"]]
    out = model.predict([{"text": str(t)} for t in test["text"]])
    served = float(np.mean([o["label"] == y for o, y in zip(out, labels)]))
    # the served model tokenises like training did: its accuracy is the one the run measured
    assert served == pytest.approx(result.test_accuracy, abs=1.5 / len(labels))
    assert served > 0.5, served  # three balanced failure modes: chance is 1/3
