"""The indai model artefact: an exported torch program plus a card, and how to run it.

Training writes `model.pt2` (a `torch.export` program: graph and weights as raw tensors, no
Python code and no pickle; `load_program` refuses an archive holding any pickled payload) and `indai_model.json` (the card: inputs per modality, classes, the program's
sha256); a model with a Hugging Face text encoder also has its `tokenizer.json`, named with its
sha256 in the card's `inputs.text.tokenizer` (modalities.TextTokenizer). Serving and
`mlflow.pyfunc` both load it with `IndaiModel.load`, which checks the hashes before anything is
deserialised, and call `predict` with one dict per sample. What a prediction holds follows the
card's `task` (cards without one are classifiers): classification {"label", "probabilities"},
regression {"value"} in the target's units, anomaly {"score", "anomaly", "threshold"}.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np

from indai.platform.errors import UserError
from indai.platform.modalities import MODALITIES, TextTokenizer, check_sensor, decode_image, images_to_tensor_layout
from indai.platform.storage import sha256_file  # noqa: F401  (report_format and mirror take it from here)

FORMAT = "indai-torch-export/1"
PROGRAM = "model.pt2"
CARD = "indai_model.json"


def write_card(folder: Path, card: dict) -> Path:
    card = dict(card, format=FORMAT, program_sha256=sha256_file(folder / PROGRAM))
    path = folder / CARD
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False))
    return path


# Tensor payloads of a torch.export archive (pt2_archive) that are raw bytes plus metadata; every
# other kind (pickled tensors, torchbind and "opaque" objects, the legacy constants .pt) is a pickle.
_RAW_PAYLOAD_PREFIXES = ("weight_", "tensor_")
_force_weights_only = threading.Lock()


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load inside runs weights-only, whatever its caller asked (torch honours
    TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call). torch.export's own loader falls back to
    `weights_only=False` for the sample inputs when the weights-only load fails."""
    with _force_weights_only:
        old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def check_program_archive(path: Path) -> None:
    """Refuse a `.pt2` that would make torch.export.load unpickle anything.

    torch.export.save writes plain tensors as raw bytes and describes them in JSON configs,
    but its format also allows pickled payloads (`use_pickle`, custom and opaque objects, the
    legacy format), which torch.export.load reads with `weights_only=False` or `pickle.loads`:
    whoever writes the archive would run code in every process that loads it. indai never
    exports such payloads, so an archive holding one was not made by indai's training."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a torch.export archive ({e}): export the model again") from None
    with zf:
        names = zf.namelist()
        if not any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            raise UserError(f"{path} is not in torch.export's pt2 archive format (an older or foreign format, "
                            "which torch loads with pickle): refusing to load it; export the model again")
        for name in names:
            parts = name.split("/")
            if "constants" in parts and name.endswith(".pt"):
                raise UserError(f"{path} holds pickled constants ({name}): refusing to load it")
            if not (name.endswith("_config.json") and ("weights" in parts or "constants" in parts)):
                continue
            try:
                config = json.loads(zf.read(name)).get("config", {})
            except (ValueError, AttributeError):
                raise UserError(f"{path}: {name} is not valid JSON: refusing to load it") from None
            for fqn, meta in (config.items() if isinstance(config, dict) else ()):
                meta = meta if isinstance(meta, dict) else {}
                if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(_RAW_PAYLOAD_PREFIXES):
                    raise UserError(f"{path}: {fqn!r} is stored as a pickled object ({meta.get('path_name')!r}), "
                                    "which loading would run as code: refusing to load it; indai exports plain tensors only")


def load_program(path: str | Path):
    """torch.export.load of an archive that check_program_archive accepted, with every torch.load
    inside it weights-only: the one way indai loads an exported program."""
    import torch

    path = Path(path)
    check_program_archive(path)
    with _weights_only_loads():
        try:
            return torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 - a file from a registry: any failure means "not loadable"
            raise UserError(f"{path} could not be loaded as an exported program ({type(e).__name__}: "
                            f"{str(e)[:300]}): export and register the model again") from None


def task_of(card: dict) -> str:
    return card.get("task", "classification")


def mlflow_signature(card: dict):
    """Signature over all three modalities (each optional) and the prediction of the card's task."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([
        ColSpec(Array(Array(DataType.double)), "sensor", required=False),
        ColSpec(DataType.string, "image", required=False),
        ColSpec(DataType.string, "text", required=False),
    ])
    outputs = {"regression": Schema([ColSpec(DataType.double, "value")]),
               "anomaly": Schema([ColSpec(DataType.double, "score"), ColSpec(DataType.boolean, "anomaly"),
                                  ColSpec(DataType.double, "threshold")])}.get(
        task_of(card), Schema([ColSpec(DataType.string, "label"), ColSpec(Array(DataType.double), "probabilities")]))
    return ModelSignature(inputs=inputs, outputs=outputs)


class IndaiModel:
    """A loaded model: `predict([{"sensor": [[...]], "image": b64, "text": "..."}])`."""

    def __init__(self, card: dict, program, tokenizer: TextTokenizer | None = None):
        self.card = card
        self.program = program
        self.module = program.module()
        self.modalities = card["modalities"]
        self.classes = card["classes"]
        self.tokenizer = tokenizer  # load() builds it from the card and the folder (hash-checked)

    @classmethod
    def load(cls, folder: str | Path):
        """The model in `folder`, by its card's format: this class for exported programs, the
        report writer (platform.report_format) for generated text. Both offer prepare/run/predict."""
        folder = Path(folder)
        card_path = folder / CARD
        if not card_path.is_file():
            raise UserError(f"{folder} holds no {CARD}: it is not an indai model")
        card = json.loads(card_path.read_text())
        from indai.platform import report_format

        if card.get("format") == report_format.FORMAT:
            return report_format.ReportWriterModel.load(folder, card)
        if card.get("format") != FORMAT:
            raise UserError(f"{folder}: model format {card.get('format')!r} is not {FORMAT!r}")
        if sha256_file(folder / PROGRAM) != card.get("program_sha256"):
            raise UserError(f"{folder / PROGRAM} does not match the hash in its card: refusing to load it")
        text = card.get("inputs", {}).get("text")
        tokenizer = TextTokenizer.from_card(text, folder) if text and "text" in card.get("modalities", []) else None
        return cls(card, load_program(folder / PROGRAM), tokenizer)

    def prepare(self, sample: dict) -> dict:
        """Validate one sample against the card; raise UserError saying what is wrong."""
        if not isinstance(sample, dict):
            raise UserError("each input must be an object with sensor, image and/or text")
        unknown = set(sample) - set(MODALITIES) - {"channels", "sampling_rate_hz"}
        if unknown:
            raise UserError(f"unknown input field(s) {sorted(unknown)}: use sensor, image, text (and channels, sampling_rate_hz)")
        given = [m for m in MODALITIES if sample.get(m) is not None]
        if not given:
            raise UserError(f"input has none of the model's modalities {self.modalities}")
        extra = [m for m in given if m not in self.modalities]
        if extra:
            raise UserError(f"this model takes {self.modalities}, not {extra}")
        out = {}
        if "sensor" in given:
            s = self.card["inputs"]["sensor"]
            try:
                arr = np.asarray(sample["sensor"], dtype=np.float32)
            except (TypeError, ValueError):
                raise UserError("sensor must be a list of channels, each a list of numbers") from None
            out["sensor"] = check_sensor(arr, s["channels"], s["length"], sample.get("channels"),
                                         sample.get("sampling_rate_hz"), s.get("sampling_rate_hz"))
        if "image" in given:
            out["image"] = decode_image(sample["image"], self.card["inputs"]["image"]["size"])
        if "text" in given:
            if not isinstance(sample["text"], str):
                raise UserError("text must be a string")
            out["text"] = sample["text"]
        return out

    def run(self, prepared: list[dict]) -> list[dict]:
        """Predict a batch of prepared samples (see `prepare`)."""
        import torch

        n = len(prepared)
        inputs = self.card["inputs"]
        mask = np.zeros((n, 3), dtype=np.float32)
        kwargs = {}
        for i, m in enumerate(MODALITIES):
            if m not in self.modalities:
                continue
            mask[:, i] = [m in p for p in prepared]
            if m == "sensor":
                s = inputs["sensor"]
                zero = np.zeros((len(s["channels"]), s["length"]), np.float32)
                kwargs["sensor"] = torch.from_numpy(np.stack([p.get("sensor", zero) for p in prepared]))
            elif m == "image":
                size = inputs["image"]["size"]
                zero = np.zeros((size, size, 3), np.uint8)
                kwargs["image"] = torch.from_numpy(images_to_tensor_layout(np.stack([p.get("image", zero) for p in prepared])))
            else:
                kwargs["text"] = torch.from_numpy(self.tokenizer.encode([p.get("text", "") for p in prepared]))
        kwargs["mask"] = torch.from_numpy(mask)
        with torch.inference_mode():
            out = self.module(**kwargs).float()
        return self.answers(out)

    def answers(self, out) -> list[dict]:
        """The model's output tensor as one answer per sample, by the card's task."""
        task = task_of(self.card)
        if task == "regression":
            return [{"value": float(v)} for v in out.reshape(-1).tolist()]
        if task == "anomaly":  # column 0 is the score (trainers.models.multimodal.model.task_output)
            threshold = float(self.card["anomaly"]["threshold"])
            return [{"score": float(s), "anomaly": bool(s > threshold), "threshold": threshold} for s in out[:, 0].tolist()]
        import torch

        probs = torch.softmax(out, dim=-1).numpy()
        return [{"label": self.classes[int(p.argmax())], "probabilities": dict(zip(self.classes, map(float, p)))} for p in probs]

    def predict(self, samples: list[dict]) -> list[dict]:
        return self.run([self.prepare(s) for s in samples])
