"""The pretrained-weight mirror on a local-folder store: adding, listing, verifying, tamper
detection, what is refused, the EfficientNet-Lite0 converter (proved against an independent
definition of the network written from its original key names), the trainers' loaders, and
that loading from the mirror never touches the network."""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from indai.platform import mirror
from indai.platform.errors import UserError
from indai.platform.storage import LocalStore, StoreError
from mirror_store import packaged_mirror

REPO = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path, monkeypatch) -> LocalStore:
    monkeypatch.setenv("INDAI_HOME", str(tmp_path / "home"))
    return LocalStore(tmp_path / "store")


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """The two packaged weights mirrored once into a store of their own (INDAI_HOME in tmp)."""
    with packaged_mirror(tmp_path_factory.mktemp("mirror")) as (store, cards):
        yield store, cards


def tiny_timm_weights(folder: Path, seed: int = 0) -> Path:
    """A real timm model's weights (timm's tiny test EfficientNet) as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def add_tiny(store, name="tiny", seed=0, folder=None, licence="Apache-2.0"):
    path = tiny_timm_weights(folder or Path(store.root).parent / f"src-{name}-{seed}", seed)
    return mirror.add(store, name, [path], "timm", architecture="test_efficientnet", source="unit test",
                      licence=licence), path


# ---- adding, listing, verifying -------------------------------------------------------------------

def test_add_writes_files_card_and_commit_last(store):
    card, path = add_tiny(store)
    assert card["format"] == "timm" and card["architecture"] == "test_efficientnet" and card["num_classes"] == 1000
    assert card["files"] == {"model.safetensors": {"sha256": _sha(path), "size": path.stat().st_size}}
    assert card["source"] == "unit test" and card["licence"] == "Apache-2.0" and card["created"].endswith("+00:00")
    keys = store.list("models/pretrained/tiny")
    assert keys == ["models/pretrained/tiny/_COMMITTED", "models/pretrained/tiny/card.json",
                    "models/pretrained/tiny/files/model.safetensors"]
    marker = store.read_commit("models/pretrained/tiny")
    assert marker["card_sha256"] == hashlib.sha256(store.get_bytes("models/pretrained/tiny/card.json")).hexdigest()
    assert [c["name"] for c in mirror.ls(store)] == ["tiny"]
    assert mirror.card(store, "tiny") == card
    report = mirror.verify(store, "tiny")
    assert report["ok"] and report["problems"] == [] and report["bytes"] == path.stat().st_size


def test_adding_again_is_idempotent_and_other_content_is_refused(store):
    first, _ = add_tiny(store)
    again, _ = add_tiny(store)
    assert again["card_sha256"] == first["card_sha256"] and again["created"] == first["created"]
    with pytest.raises(UserError, match="already exists with other content"):
        add_tiny(store, seed=1)
    with pytest.raises(UserError, match="already exists with other content"):
        mirror.add(store, "tiny", [tiny_timm_weights(Path(store.root).parent / "again")], "timm",
                   architecture="test_efficientnet", source="unit test", licence="MIT")
    assert mirror.card(store, "tiny")["card_sha256"] == first["card_sha256"]


class CardWriteFails(LocalStore):
    """A store whose writer dies after the weights, before the card (a crashed `add`)."""

    def put_bytes(self, key, data):
        if key.endswith("/card.json"):
            raise OSError("writer died")
        super().put_bytes(key, data)


def test_an_entry_whose_writer_died_is_invisible_and_can_be_added_again(store):
    broken = CardWriteFails(store.root)
    with pytest.raises(OSError):
        add_tiny(broken)
    assert store.list("models/pretrained/tiny") == ["models/pretrained/tiny/files/model.safetensors"]
    assert mirror.ls(store) == []
    with pytest.raises(UserError, match="no pretrained weights named 'tiny'"):
        mirror.card(store, "tiny")
    card, _ = add_tiny(store)
    assert mirror.verify(store, "tiny")["ok"] and card["name"] == "tiny"


def test_verify_reports_changed_missing_and_extra_files(store):
    add_tiny(store)
    stored = Path(store.root) / "models/pretrained/tiny/files/model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.write_bytes(bytes(data))
    report = mirror.verify(store, "tiny")
    assert not report["ok"] and report["problems"][0]["path"] == "model.safetensors"
    assert report["problems"][0]["problem"].startswith("changed (sha256 ")
    with pytest.raises(StoreError, match="does not match its card"):
        mirror.local_dir(store, "tiny")
    stored.unlink()
    (stored.parent / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    problems = {p["path"]: p["problem"] for p in mirror.verify(store, "tiny")["problems"]}
    assert problems == {"model.safetensors": "missing", "pytorch_model.bin": "not on the card"}


def test_a_changed_card_is_detected(store):
    add_tiny(store)
    card_file = Path(store.root) / "models/pretrained/tiny/card.json"
    card = json.loads(card_file.read_text())
    card["licence"] = "public domain"
    card_file.write_text(json.dumps(card))
    with pytest.raises(StoreError, match="does not match its commit record"):
        mirror.card(store, "tiny")


def test_local_dir_checks_hashes_reuses_an_intact_copy_and_replaces_a_damaged_one(store):
    card, path = add_tiny(store)
    folder = mirror.local_dir(store, "tiny")
    assert folder.parent == Path(os.environ["INDAI_HOME"]) / "cache" / "pretrained"
    assert folder.name == f"tiny-{card['card_sha256'][:12]}"
    cached = folder / "model.safetensors"
    assert _sha(cached) == _sha(path)
    stamp = cached.stat().st_mtime_ns
    assert mirror.local_dir(store, "tiny") == folder and cached.stat().st_mtime_ns == stamp  # reused, not fetched again
    cached.chmod(0o644)
    cached.write_bytes(b"not the weights")
    assert mirror.local_dir(store, "tiny") == folder
    assert _sha(folder / "model.safetensors") == _sha(path)


# ---- what is refused -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "Tiny", "../evil", "a/b", "-x", ".hidden", "a..b", "x" * 129, "tab\tname", "s3:x"])
def test_bad_names_are_refused(store, name):
    with pytest.raises(UserError, match="mirror name .* is not valid"):
        add_tiny(store, name=name, folder=Path(store.root).parent / "src")


def hf_folder(folder: Path) -> Path:
    """A small real Hugging Face folder (a 1-layer BERT) saved as safetensors."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    return folder


def test_hf_folder_is_added_with_model_type_and_every_file(store, tmp_path):
    src = hf_folder(tmp_path / "bert")
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("x")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    card = mirror.add(store, "tiny-bert", [src], "hf", architecture=None, source="unit test", licence="MIT")
    assert card["format"] == "hf" and card["model_type"] == "bert" and card["architecture"] == "BertModel"
    assert sorted(card["files"]) == ["config.json", "model.safetensors", "sub/notes.txt", "vocab.txt"]
    assert card["files"]["model.safetensors"]["sha256"] == _sha(src / "model.safetensors")


@pytest.mark.parametrize("bad", ["pytorch_model.bin", "weights.pt", "x.pkl", "innocent.dat"])
def test_pickles_are_refused_whatever_they_are_called(store, tmp_path, bad):
    src = hf_folder(tmp_path / "bert")
    (src / bad).write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with pytest.raises(UserError, match=f"refusing '{bad}': it is a Python pickle"):
        mirror.add(store, "bert", [src], "hf", architecture=None, source="s", licence="l")
    assert mirror.ls(store) == [] and store.list("models") == []


def test_links_out_of_the_folder_and_odd_file_names_are_refused(store, tmp_path):
    src = hf_folder(tmp_path / "bert")
    (tmp_path / "secret.txt").write_text("do not mirror")
    (src / "inside.txt").symlink_to(src / "config.json")  # a link inside the folder is fine
    card = mirror.add(store, "ok", [src], "hf", architecture=None, source="s", licence="l")
    assert card["files"]["inside.txt"]["sha256"] == _sha(src / "config.json")
    (src / "leak.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(UserError, match="is a link to a file outside"):
        mirror.add(store, "leak", [src], "hf", architecture=None, source="s", licence="l")
    (src / "leak.txt").unlink()
    (src / "up").symlink_to("..")  # a way up and out of the folder
    with pytest.raises(UserError, match="is a link to a folder outside"):
        mirror.add(store, "up", [src], "hf", architecture=None, source="s", licence="l")
    (src / "up").unlink()
    (src / "two words.txt").write_text("x")
    with pytest.raises(UserError, match="cannot be mirrored under that name"):
        mirror.add(store, "space", [src], "hf", architecture=None, source="s", licence="l")


def test_wrong_formats_and_fields_are_refused(store, tmp_path):
    src = hf_folder(tmp_path / "bert")
    with pytest.raises(UserError, match="not a timm model name"):
        mirror.add(store, "t", [src / "model.safetensors"], "timm", architecture="no_such_net", source="s", licence="l")
    with pytest.raises(UserError, match="do not load into timm's test_efficientnet: .*missing"):
        mirror.add(store, "t", [src / "model.safetensors"], "timm", architecture="test_efficientnet", source="s", licence="l")
    (src / "config.json").unlink()
    with pytest.raises(UserError, match="needs config.json"):
        mirror.add(store, "t", [src], "hf", architecture=None, source="s", licence="l")
    with pytest.raises(UserError, match="needs a licence"):
        add_tiny(store, licence="")
    with pytest.raises(UserError, match="not one of timm, hf, torch"):
        mirror.add(store, "t", [src], "onnx", architecture=None, source="s", licence="l")


class RunsCode:
    """Unpickling this object with full pickle would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torch_state_dict_is_read_without_running_code(store, tmp_path):
    import timm

    model = timm.create_model("test_efficientnet", pretrained=False)
    good = tmp_path / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, good)
    card = mirror.add(store, "from-pth", [good], "torch", architecture="test_efficientnet", source="s", licence="l")
    assert card["format"] == "timm" and list(card["files"]) == ["model.safetensors"]
    assert card["converted_from"] == {"file": "tiny.pth", "sha256": _sha(good)}
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": RunsCode(marker)}, evil)
    with pytest.raises(UserError, match="holds more than tensors"):
        mirror.add(store, "evil", [evil], "torch", architecture=None, source="s", licence="l")
    assert not marker.exists()


# ---- EfficientNet-Lite0: the converter against an independent definition ----------------------------

# EfficientNet-Lite0 from its published architecture: (repeats, stride) of the seven stages. Kernel
# sizes, channels and whether a block expands are read from the original weights themselves.
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def _tf_same_pad(x, k, s):
    """TensorFlow 'SAME' padding: output size ceil(in / stride), the extra pixel at the end."""
    pads = []
    for size in reversed(x.shape[-2:]):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def reference_lite0(sd: dict, x: torch.Tensor, eps: float = 1e-3, same_padding: bool = True) -> torch.Tensor:
    """EfficientNet-Lite0 logits computed straight from the original checkpoint's keys."""
    def conv(t, w, stride=1, groups=1):
        k = w.shape[-1]
        if same_padding:
            return F.conv2d(_tf_same_pad(t, k, stride), w, stride=stride, groups=groups)
        return F.conv2d(t, w, stride=stride, padding=k // 2, groups=groups)

    def bn(t, name):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=eps)

    x = F.relu6(bn(conv(x, sd["_conv_stem.weight"], stride=2), "_bn0"))
    strides = [s if i == 0 else 1 for repeats, s in LITE0_STAGES for i in range(repeats)]
    for n, stride in enumerate(strides):
        b = f"_blocks.{n}"
        inp = x
        if f"{b}._expand_conv.weight" in sd:
            x = F.relu6(bn(conv(x, sd[f"{b}._expand_conv.weight"]), f"{b}._bn0"))
        dw = sd[f"{b}._depthwise_conv.weight"]
        x = F.relu6(bn(conv(x, dw, stride=stride, groups=dw.shape[0]), f"{b}._bn1"))
        x = bn(conv(x, sd[f"{b}._project_conv.weight"]), f"{b}._bn2")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
    x = F.relu6(bn(conv(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def real_images() -> dict[str, Path]:
    import matplotlib
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    return {"grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
            "flower": images / "flower.jpg", "china": images / "china.jpg"}


def image_batch(model) -> torch.Tensor:
    """The real images preprocessed the way the model's config says (resize, centre crop, normalise)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in real_images().values()])


@pytest.fixture(scope="module")
def original_lite0():
    return mirror.read_state_dict(mirror.packaged_path("efficientnet-lite0"))


@pytest.fixture(scope="module")
def mirrored_lite0(packaged):
    from indai.trainers.pretrained import timm_backbone

    return timm_backbone(None, "efficientnet-lite0", packaged[0]).eval()


@pytest.fixture(scope="module")
def lite0_images(mirrored_lite0):
    return image_batch(mirrored_lite0)


def test_converted_lite0_computes_what_the_original_definition_computes(original_lite0, mirrored_lite0, lite0_images):
    torch.manual_seed(0)
    images = lite0_images
    noise = torch.randn(2, 3, 97, 131)  # odd sizes: where SAME padding puts the extra pixel matters
    with torch.no_grad():
        for x in (images, noise):
            ours, ref = mirrored_lite0(x), reference_lite0(original_lite0, x)
            assert (ours - ref).abs().max().item() < 1e-4
            assert torch.equal(ours.argmax(1), ref.argmax(1))
        # the comparison is sharp enough to tell the near-miss variants apart
        ref = reference_lite0(original_lite0, images)
        symmetric = reference_lite0(original_lite0, images, same_padding=False)
        eps_1e5 = reference_lite0(original_lite0, images, eps=1e-5)
    assert (symmetric - ref).abs().max().item() > 0.05
    assert (eps_1e5 - ref).abs().max().item() > 0.05


def test_mirrored_lite0_recognises_real_images(mirrored_lite0, lite0_images):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    with torch.no_grad():
        probs = mirrored_lite0(lite0_images).softmax(-1)
    top5 = {name: [info.index_to_description(int(i)) for i in p.topk(5).indices]
            for name, p in zip(real_images(), probs)}
    assert top5["flower"][0] == "daisy"
    assert top5["china"][0] == "palace"
    assert "military uniform" in top5["grace_hopper"]


def test_the_weights_own_batchnorm_statistics_prefer_tf_same_padding(packaged, lite0_images):
    """Why tf_efficientnet_lite0 and not efficientnet_lite0: with the same weights and inputs, the
    activations entering each BatchNorm sit closer to the statistics it learnt when the network
    pads like TensorFlow (the weights come from the TensorFlow release)."""
    import timm
    from safetensors.torch import load_file

    store, cards = packaged
    state = load_file(str(mirror.local_dir(store, "efficientnet-lite0") / "model.safetensors"))

    def mismatch(arch):
        model = timm.create_model(arch, pretrained=False, bn_eps=1e-3).eval()
        model.load_state_dict(state)
        gaps = []
        hooks = [m.register_forward_pre_hook(lambda m, a: gaps.append(
            ((a[0].mean((0, 2, 3)) - m.running_mean).abs() / (m.running_var + 1e-3).sqrt()).median().item()))
            for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            model(lite0_images)
        for h in hooks:
            h.remove()
        return sum(gaps) / len(gaps)

    assert cards["efficientnet-lite0"]["architecture"] == "tf_efficientnet_lite0"
    assert mismatch("tf_efficientnet_lite0") < mismatch("efficientnet_lite0")


# ---- the trainers' loaders ------------------------------------------------------------------------

def test_timm_backbone_loads_the_mirror_and_refuses_mismatches(packaged, mirrored_lite0, lite0_images):
    import timm
    from safetensors.torch import load_file

    from indai.trainers.pretrained import timm_backbone

    store, cards = packaged
    features = timm_backbone("tf_efficientnet_lite0", "efficientnet-lite0", store, num_classes=0).eval()
    random = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    stored = load_file(str(mirror.local_dir(store, "efficientnet-lite0") / "model.safetensors"))
    assert all(torch.equal(v, stored[k]) for k, v in features.state_dict().items())
    x = lite0_images
    with torch.no_grad():
        f, r = features(x), random(x)
        logits_from_features = mirrored_lite0.get_classifier()(f)
    assert f.shape == (3, 1280) and (f - r).abs().mean() > 0.1
    assert torch.allclose(logits_from_features, mirrored_lite0(x), atol=1e-4)
    assert features.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and features.pretrained_cfg["indai_mirror"] == "efficientnet-lite0"
    new_head = timm_backbone(None, "efficientnet-lite0", store, num_classes=7)
    assert new_head.classifier.out_features == 7 and torch.equal(new_head.conv_stem.weight, stored["conv_stem.weight"])
    with pytest.raises(UserError, match="holds weights for tf_efficientnet_lite0, not efficientnet_lite0"):
        timm_backbone("efficientnet_lite0", "efficientnet-lite0", store)
    with pytest.raises(UserError, match=r"other shape \(conv_stem.weight"):
        timm_backbone(None, "efficientnet-lite0", store, in_chans=1)
    with pytest.raises(UserError, match="would ask a hub"):
        timm_backbone("tf_efficientnet_lite0", "efficientnet-lite0", store, pretrained=True)
    with pytest.raises(UserError, match="holds hf weights, not a timm model"):
        timm_backbone(None, "all-minilm-l6-v2", store)
    assert timm_backbone("test_efficientnet", None, store).num_classes == 1000  # no mirror: random init


def mean_pooled(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_from_the_mirror_embeds_related_sentences_closer(packaged):
    from transformers import AutoModel, AutoTokenizer

    from indai.trainers.pretrained import hf_dir

    store, cards = packaged
    assert cards["all-minilm-l6-v2"]["model_type"] == "bert" and "tokenizer.json" in cards["all-minilm-l6-v2"]["files"]
    folder = hf_dir("all-minilm-l6-v2", store)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    e = mean_pooled(model, tokenizer, ["The pump bearing is overheating.", "The bearing of the pump runs hot.",
                                       "The invoice was paid on Friday."])
    assert e.shape == (3, 384)
    related, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert related > 0.6 and related > unrelated + 0.3
    with pytest.raises(UserError, match="holds timm weights, not a Hugging Face folder"):
        hf_dir("efficientnet-lite0", store)


NO_NETWORK = r'''
import json, os, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

from indai.trainers.pretrained import hf_dir, timm_backbone
import torch
from transformers import AutoModel, AutoTokenizer

store = sys.argv[1]
folder = hf_dir("all-minilm-l6-v2", store)
AutoModel.from_pretrained(folder, local_files_only=True)
AutoTokenizer.from_pretrained(folder, local_files_only=True)
timm_backbone(None, "efficientnet-lite0", store)(torch.zeros(1, 3, 224, 224))
try:
    AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    hub = "loaded"
except Exception as e:
    hub = type(e).__name__
import huggingface_hub
print(json.dumps({"attempts": attempts, "hub": hub, "offline": huggingface_hub.constants.is_offline_mode(),
                  "env": [os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]}))
'''


def test_loading_from_the_mirror_never_touches_the_network(packaged, tmp_path):
    """A fresh process without any offline setting of its own, behind an unreachable proxy, with
    every socket connection refused and recorded: the loaders switch the hub off themselves."""
    store, _ = packaged
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, store.uri], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["attempts"] == [] and out["offline"] is True and out["env"] == ["1", "1"]
    assert out["hub"] != "loaded"  # a hub id cannot load: nothing is fetched, nothing is cached here
