"""`indai models mirror ...` as a researcher runs it (a fresh INDAI_HOME, the embedded local
store): mirror the packaged weights, list, show, verify, see tampering, get one-line refusals;
and the same mirror on a real MinIO bucket."""
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

INDAI = str(Path(sys.executable).parent / "indai")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("mirror-cli-home")


def indai(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INDAI_")}
    done = subprocess.run([INDAI, *args], capture_output=True, text=True, timeout=300, env={**env, "INDAI_HOME": str(home)})
    if ok:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_mirror_the_packaged_weights_list_show_and_verify(home):
    added = indai(home, "models", "mirror", "add-packaged", "--quiet").stdout.splitlines()
    assert added[0].startswith("mirrored all-minilm-l6-v2: hf BertModel, 13 file(s), 87.4 MiB")
    assert added[1].startswith("mirrored efficientnet-lite0: timm tf_efficientnet_lite0, 1 file(s), 17.9 MiB")
    table = indai(home, "models", "mirror", "ls").stdout.splitlines()
    assert table[0].split() == ["NAME", "FORMAT", "ARCHITECTURE", "FILES", "SIZE", "CREATED", "LICENCE"]
    assert [row.split()[:4] for row in table[1:]] == [["all-minilm-l6-v2", "hf", "BertModel", "13"],
                                                     ["efficientnet-lite0", "timm", "tf_efficientnet_lite0", "1"]]
    card = json.loads(indai(home, "models", "mirror", "show", "efficientnet-lite0").stdout)
    assert card["converted_from"]["converter"] == "efficientnet-lite0" and card["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    stored = home / "store" / "models" / "pretrained" / "efficientnet-lite0" / "files" / "model.safetensors"
    assert card["files"]["model.safetensors"]["size"] == stored.stat().st_size
    verified = indai(home, "models", "mirror", "verify", "--quiet").stdout
    assert verified.count("ok      ") == 2 and "18802848 bytes match their card" in verified

    data = bytearray(stored.read_bytes())
    data[1000] ^= 0xFF
    stored.write_bytes(bytes(data))
    failed = indai(home, "models", "mirror", "verify", "--quiet", ok=False)
    assert failed.returncode == 1
    assert "FAILED  efficientnet-lite0: model.safetensors: changed (sha256" in failed.stdout
    assert "ok      all-minilm-l6-v2" in failed.stdout and "1 mirror entry altered" in failed.stderr
    stored.unlink()
    missing = indai(home, "models", "mirror", "verify", "efficientnet-lite0", "--quiet", ok=False)
    assert missing.returncode == 1 and "model.safetensors: missing" in missing.stdout


def test_add_and_its_refusals(home, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    refused = indai(home, "models", "mirror", "add", "my-bert", str(folder), "--source", "lab", "--licence", "MIT", ok=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith("indai: error: refusing 'pytorch_model.bin': it is a Python pickle")
    bad = indai(home, "models", "mirror", "add", "../up", str(folder), "--source", "lab", "--licence", "MIT", ok=False)
    assert bad.returncode == 2 and "mirror name '../up' is not valid" in bad.stderr
    unknown = indai(home, "models", "mirror", "show", "nothing-here", ok=False)
    assert unknown.returncode == 2 and "no pretrained weights named 'nothing-here'" in unknown.stderr

    from safetensors.torch import save_file
    import timm

    weights = tmp_path / "tiny.safetensors"
    save_file(timm.create_model("test_efficientnet", pretrained=False).state_dict(), str(weights))
    out = indai(home, "models", "mirror", "add", "tiny-effnet", str(weights), "--architecture", "test_efficientnet",
                "--source", "unit test", "--licence", "Apache-2.0", "--quiet").stdout
    assert out.startswith("mirrored tiny-effnet: timm test_efficientnet, 1 file(s)")
    assert "ok      tiny-effnet" in indai(home, "models", "mirror", "verify", "tiny-effnet", "--quiet").stdout


def test_the_mirror_on_a_minio_bucket(minio, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import timm

    from indai.platform import mirror
    from indai.platform.storage import S3Store

    monkeypatch.setenv("INDAI_HOME", str(tmp_path / "home"))
    store = S3Store(f"s3://indai-mirror-{uuid.uuid4().hex[:10]}", endpoint=minio.endpoint, access_key=minio.access_key,
                    secret_key=minio.secret_key, secure=False)
    weights = tmp_path / "model.safetensors"
    save_file(timm.create_model("test_efficientnet", pretrained=False).state_dict(), str(weights))
    card = mirror.add(store, "tiny", [weights], "timm", architecture="test_efficientnet", source="s", licence="l")
    assert [c["name"] for c in mirror.ls(store)] == ["tiny"] and mirror.verify(store, "tiny")["ok"]
    folder = mirror.local_dir(store, "tiny")
    assert (folder / "model.safetensors").read_bytes() == weights.read_bytes()
    store.put_bytes("models/pretrained/tiny/files/model.safetensors", b"swapped")
    report = mirror.verify(store, "tiny")
    assert not report["ok"] and report["problems"][0]["problem"].startswith("changed")
    assert mirror.card(store, "tiny")["card_sha256"] == card["card_sha256"]
