"""The multimodal model: masks, export, and the model artefact that serving loads."""
import base64
import io
import json

import numpy as np
import pytest
import torch

from indai.platform.errors import UserError
from indai.platform.model_format import CARD, PROGRAM, IndaiModel, write_card
from indai.trainers.models import create_model
from indai.trainers.models.multimodal import ModelConfig
from indai.trainers.models.multimodal.export import card_inputs, example_inputs, export


def cfg(**kw) -> ModelConfig:
    return ModelConfig(flavour="debug", modalities=["sensor", "image", "text"], num_classes=3,
                       sensor={"channels": 2, "length": 256}, dropout=0.0, **kw)


def test_absent_modality_does_not_change_the_output():
    torch.manual_seed(0)
    m = create_model(cfg()).eval()
    x = example_inputs(m.cfg, batch=3)
    x["mask"] = torch.tensor([[1.0, 0.0, 1.0]] * 3)
    a = m(**x)
    x2 = dict(x, image=torch.rand_like(x["image"]))
    assert torch.allclose(a, m(**x2), atol=1e-5)  # image is masked out
    x3 = dict(x, text=torch.randint(1, 200, x["text"].shape))
    assert not torch.allclose(a, m(**x3), atol=1e-4)  # text is present


def test_sensor_only_model_ignores_other_inputs():
    m = create_model(ModelConfig(flavour="debug", modalities=["sensor"], num_classes=4, sensor={"channels": 1, "length": 128}))
    assert set(m.encoders) == {"sensor"}
    assert m(sensor=torch.randn(2, 1, 128)).shape == (2, 4)


def test_unknown_encoder_is_a_clear_error():
    from indai.trainers.models import build

    with pytest.raises(UserError, match="unknown sensor component 'os.system'"):
        build("sensor", "os.system")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(1)
    c = cfg()
    m = create_model(c).eval()
    folder = tmp_path_factory.mktemp("model")
    export(m, folder)
    write_card(folder, {"classes": ["a", "b", "c"], "modalities": c.modalities,
                        "inputs": card_inputs(c, {"channels": ["x", "y"], "sampling_rate_hz": 1000.0})})
    return m, folder


def _png(size=40) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_exported_program_matches_eager_for_any_batch(exported):
    m, folder = exported
    loaded = IndaiModel.load(folder)
    for batch in (1, 5):
        x = example_inputs(m.cfg, batch=batch)
        with torch.no_grad():
            assert torch.allclose(m(**x), loaded.module(**x), atol=1e-5)


def test_predict_mixed_modalities(exported):
    _, folder = exported
    model = IndaiModel.load(folder)
    sensor = np.random.default_rng(0).normal(size=(2, 256)).tolist()
    out = model.predict([{"sensor": sensor, "channels": ["x", "y"], "sampling_rate_hz": 1000},
                         {"image": _png(), "text": "유압 펌프 씰 교체 replace hyd pump seal"},
                         {"text": ""}])
    assert len(out) == 3
    for o in out:
        assert o["label"] in {"a", "b", "c"} and sum(o["probabilities"].values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("sample,message", [
    ({"sensor": [[0.0] * 255, [0.0] * 255]}, r"shape \[2, 255\], the model expects \[2, 256\]"),
    ({"sensor": [[0.0] * 256, [0.0] * 256], "channels": ["y", "x"]}, "do not match the model's"),
    ({"sensor": [[0.0] * 256, [0.0] * 256], "sampling_rate_hz": 48000}, "resample before sending"),
    ({"sensor": [[float("nan")] * 256, [0.0] * 256]}, "NaN"),
    ({"sensor": [["a"] * 256, [0.0] * 256]}, "list of channels"),
    ({"image": "not base64!"}, "not valid base64"),
    ({"image": base64.b64encode(b"GIF89a....").decode()}, "could not be decoded"),
    ({}, "none of the model's modalities"),
    ({"audio": "x"}, "unknown input field"),
    ({"text": 5}, "text must be a string"),
])
def test_bad_samples_get_clear_errors(exported, sample, message):
    with pytest.raises(UserError, match=message):
        IndaiModel.load(exported[1]).prepare(sample)


def test_tampered_program_is_refused(exported, tmp_path):
    _, folder = exported
    for f in (PROGRAM, CARD):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    with open(tmp_path / PROGRAM, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(UserError, match="does not match the hash"):
        IndaiModel.load(tmp_path)
    card = json.loads((folder / CARD).read_text())
    card["format"] = "pickle"
    (tmp_path / CARD).write_text(json.dumps(card))
    with pytest.raises(UserError, match="model format"):
        IndaiModel.load(tmp_path)


class _Payload:
    """Unpickling this creates a marker file: proof that loading ran code from the archive."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_archive(src, dst, edit):
    """Copy the zip `src` to `dst`, passing each (name, bytes) through `edit` (which may add entries)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            for n, data in edit(name, zin.read(name)):
                zout.writestr(n, data)


def _config_edit(kind, path_name, payload):
    """Point the first entry of the weights or constants config at `path_name`, pickled, holding `payload`."""
    import pickle

    def edit(name, data):
        if name.endswith(f"data/{kind}/model_{kind}_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]), "planted")  # an exported model may have no constants
            config["config"].setdefault(first, {}).update(path_name=path_name, use_pickle=True)
            folder = name.rsplit("/", 1)[0]
            return [(name, json.dumps(config).encode()), (f"{folder}/{path_name}", pickle.dumps(payload))]
        return [(name, data)]
    return edit


def _sample_inputs_edit(payload):
    import pickle

    return lambda name, data: [(name, pickle.dumps(payload) if "sample_inputs/" in name else data)]


@pytest.mark.parametrize("how, message", [
    ("pickled weight", "stored as a pickled object"),
    ("opaque constant", "stored as a pickled object"),
    ("pickled sample inputs", "could not be loaded"),
])
def test_program_with_a_pickled_payload_is_refused_before_it_runs(exported, tmp_path, how, message):
    """A registered model is written by whoever registers it, and its card's hash is theirs too: the
    archive itself must not be able to run code in the serving replicas (torch.export.load reads
    pickled tensors with weights_only=False, opaque objects with pickle.loads, and falls back to
    weights_only=False for sample inputs)."""
    _, folder = exported
    marker = tmp_path / "ran"
    payload = _Payload(marker)
    edit = {"pickled weight": lambda: _config_edit("weights", "weight_999", payload),
            "opaque constant": lambda: _config_edit("constants", "opaque_obj_0", payload),
            "pickled sample inputs": lambda: _sample_inputs_edit(payload)}[how]()
    model = tmp_path / "model"
    model.mkdir()
    _rewrite_archive(folder / PROGRAM, model / PROGRAM, edit)
    write_card(model, {k: v for k, v in json.loads((folder / CARD).read_text()).items() if k != "program_sha256"})
    with pytest.raises(UserError, match=message):
        IndaiModel.load(model)
    assert not marker.exists(), "loading the archive ran the pickled payload"
    # the archive as exported loads: the edit alone is what is refused
    assert IndaiModel.load(folder).modalities == ["sensor", "image", "text"]
