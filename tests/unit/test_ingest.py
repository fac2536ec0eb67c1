"""Ingest: resampling, split by time without crossing windows, content addressing, clean failures."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from indai.platform import datasets
from indai.platform.errors import UserError
from indai.platform.ingest import ingest, resample
from indai.platform.storage import StoreError, open_store

REPO = Path(__file__).resolve().parents[2]


def write_spec(folder: Path, sources: list[dict], **sensor) -> Path:
    spec = {"name": "toy", "member": "m1", "sensor": {"channels": ["a", "b"], "sampling_rate_hz": 1000, "window": 50,
                                                       "hop": 10, **sensor},
            "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "sources": sources}
    path = folder / "spec.yaml"
    path.write_text("# indai data ingest spec.yaml\n" + yaml.safe_dump(spec))
    return path


def ramp_source(folder: Path, name: str, n: int, offset: float) -> None:
    """Channel a counts samples (so a window reveals where in the recording it came from)."""
    t = np.arange(n, dtype=np.float64)
    np.savez(folder / name, a=t + offset, b=np.sin(t))


@pytest.fixture
def toy(tmp_path):
    ramp_source(tmp_path, "r0.npz", 1000, 0.0)
    ramp_source(tmp_path, "r1.npz", 1000, 1e6)
    spec = write_spec(tmp_path, [{"path": "r0.npz", "label": "ok", "sampling_rate_hz": 1000},
                                 {"path": "r1.npz", "label": "bad", "sampling_rate_hz": 1000}])
    return tmp_path, spec, open_store(tmp_path / "store")


def test_resample_keeps_frequency_and_duration():
    t = np.arange(48000) / 48000
    x = np.sin(2 * np.pi * 100 * t)[None]
    y = resample(x, 48000, 12000)
    assert y.shape == (1, 12000)
    spectrum = np.abs(np.fft.rfft(y[0]))
    assert np.argmax(spectrum) == 100  # 1 s at 12 kHz: bin k is k Hz


def test_split_by_time_and_no_window_crosses_it(toy):
    folder, spec, store = toy
    name, version, manifest = ingest(spec, store, progress=False)
    bounds = {"train": (0, 600), "val": (600, 800), "test": (800, 1000)}
    for split, (lo, hi) in bounds.items():
        arrays = datasets.load_split(store, datasets.DatasetRef(name, version), split)
        sig, starts, labels = arrays["sensor_signal"], arrays["sensor_starts"], arrays["label"]
        for s, label in zip(starts, labels):
            w = sig[0, s: s + 50] - (1e6 if label == 1 else 0)
            assert lo <= w.min() and w.max() < hi, f"{split} window spans samples {w.min()}..{w.max()}"
            assert np.all(np.diff(w) == 1)  # one contiguous stretch of one recording
    w = manifest["split"]["windows"]
    assert w == {"train": 2 * ((600 - 50) // 10 + 1), "val": 2 * 4, "test": 2 * 4}
    # statistics from the train part only
    assert manifest["modalities"]["sensor"]["norm"]["mean"][0] == pytest.approx((299.5 + 1e6 + 299.5) / 2, rel=1e-6)


def test_content_addressed_and_immutable(toy, tmp_path):
    folder, spec, store = toy
    _, v1, _ = ingest(spec, store, progress=False)
    _, v2, _ = ingest(spec, store, progress=False)
    assert v1 == v2 and datasets.list_versions(store) == [("toy", v1)]
    ramp_source(folder, "r1.npz", 1000, 2e6)  # the member's data changed
    _, v3, _ = ingest(spec, store, progress=False)
    assert v3 != v1 and [v for _, v in datasets.list_versions(store)] == [v1, v3]
    assert datasets.resolve(store, datasets.parse_ref("toy@latest")).version == v3


def test_tampered_file_is_detected(toy):
    folder, spec, store = toy
    name, version, manifest = ingest(spec, store, progress=False)
    key = f"datasets/{name}/blobs/{next(sha for path, sha in manifest['files'].items() if path.startswith('train/') and path.endswith('/label.npy'))}.npy"
    data = bytearray(store.get_bytes(key))
    data[-1] ^= 1
    store.put_bytes(key, bytes(data))
    with pytest.raises(StoreError, match="does not match its recorded hash"):
        datasets.load_split(store, datasets.DatasetRef(name, version), "train")


def test_uncommitted_version_is_invisible(toy):
    folder, spec, store = toy
    name, version, _ = ingest(spec, store, progress=False)
    store.put_bytes("datasets/toy/ffffffffffffffff/manifest.json", b"{}")  # a writer killed half-way
    assert datasets.resolve(store, datasets.parse_ref("toy")).version == version
    with pytest.raises(UserError, match="never finished"):
        datasets.resolve(store, datasets.parse_ref("toy@ffffffffffffffff"))


@pytest.mark.parametrize("source,message", [
    ({"path": "missing.npz", "label": "x", "sampling_rate_hz": 1000}, "does not exist"),
    ({"path": "../r0.npz", "label": "x", "sampling_rate_hz": 1000}, "may not contain '..'"),
    ({"path": "/etc/passwd", "label": "x", "sampling_rate_hz": 1000}, "must be relative"),
    ({"path": "wrong.npz", "label": "x", "sampling_rate_hz": 1000}, "lacks channel"),
    ({"path": "short.npz", "label": "x", "sampling_rate_hz": 1000}, "fewer than one window"),
    ({"path": "pickled.npy", "label": "x", "sampling_rate_hz": 1000}, "pickled arrays are never loaded"),
    ({"path": "r0.npz", "label": "x", "sampling_rate_hz": -5}, "sampling_rate_hz"),
])
def test_bad_sources_fail_cleanly_and_leave_no_version(tmp_path, source, message):
    ramp_source(tmp_path, "r0.npz", 1000, 0)
    np.savez(tmp_path / "wrong.npz", a=np.zeros(1000), c=np.zeros(1000))
    ramp_source(tmp_path, "short.npz", 60, 0)
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    spec = write_spec(tmp_path, [{"path": "r0.npz", "label": "ok", "sampling_rate_hz": 1000}, source])
    store = open_store(tmp_path / "store")
    with pytest.raises(UserError, match=message) as e:
        ingest(spec, store, progress=False)
    assert "\n" not in str(e.value)
    # files that fail the checks made before any work leave nothing; a file that fails while
    # streaming leaves only blobs and the journal (for a resume), never a readable version
    assert datasets.list_versions(store) == []
    assert all("/blobs/" in k or "/journal/" in k for k in store.list(""))


def test_symlink_out_of_the_spec_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    ramp_source(outside, "r.npz", 1000, 0)
    (inside / "r.npz").symlink_to(outside / "r.npz")
    spec = write_spec(inside, [{"path": "r.npz", "label": "ok", "sampling_rate_hz": 1000}])
    with pytest.raises(UserError, match="outside the data folder"):
        ingest(spec, open_store(tmp_path / "store"), progress=False)


def test_cwru_example_is_resampled_and_split_by_time(tmp_path):
    store = open_store(tmp_path / "store")
    name, version, manifest = ingest(REPO / "examples" / "cwru-0hp" / "dataset.yaml", store, progress=False)
    normal = next(s for s in manifest["sources"] if s["label"] == "normal")
    assert normal["sampling_rate_hz"] == 48000 and normal["samples_resampled"] == pytest.approx(normal["samples"] / 4, abs=1)
    faults = [s for s in manifest["sources"] if s["label"] != "normal"]
    assert all(abs(s["seconds"] - 10.1) < 0.2 for s in faults) and abs(normal["seconds"] - 5.08) < 0.05
    assert len(manifest["classes"]) == 10
    assert manifest["split"]["windows"]["test"] == sum(manifest["split"]["per_class"]["test"]) > 200
    assert "CC BY-SA 4.0" in manifest["attribution"]
    assert json.loads(store.get_bytes(f"datasets/{name}/{version}/manifest.json"))["version"] == version


def _as_member(spec: Path, member: str, folder: Path) -> Path:
    """The same spec (same name, same sources) claiming another member."""
    doc = yaml.safe_load(spec.read_text())
    path = folder / f"spec-{member}.yaml"
    path.write_text("# indai data ingest " + path.name + "\n" + yaml.safe_dump({**doc, "member": member}))
    return path


def test_a_job_ingests_only_for_its_own_member(toy, monkeypatch):
    folder, spec, store = toy  # the spec says member: m1
    monkeypatch.setenv("INDAI_JOB_MEMBER", "evil")
    monkeypatch.setenv("INDAI_JOB_ROLE", "researcher")
    with pytest.raises(UserError, match="this job runs for member 'evil' and may write only that member's data, but the spec "
                                        "says member: m1: set member: evil in the spec") as e:
        ingest(spec, store, progress=False)
    assert "\n" not in str(e.value) and store.list("") == []  # refused before any work
    monkeypatch.setenv("INDAI_JOB_MEMBER", "m1")  # its own member's data
    name, version, manifest = ingest(spec, store, progress=False)
    assert manifest["member"] == "m1" and datasets.resolve(store, datasets.parse_ref("toy")).version == version
    monkeypatch.setenv("INDAI_JOB_MEMBER", "ops")  # the admin ingests for any member
    monkeypatch.setenv("INDAI_JOB_ROLE", "admin")
    assert ingest(spec, store, progress=False)[1] == version


def test_another_member_cannot_take_over_a_name(toy):
    folder, spec, store = toy
    _, mine, _ = ingest(spec, store, progress=False)
    ramp_source(folder, "r1.npz", 1000, 5e6)  # other content, the same name
    with pytest.raises(UserError, match="^dataset toy belongs to member m1: choose another name"):
        ingest(_as_member(spec, "evil", folder), store, progress=False)
    assert datasets.resolve(store, datasets.parse_ref("toy@latest")).version == mine
    assert datasets.list_versions(store) == [("toy", mine)]
    assert [k for k in store.list("datasets/toy") if "/journal/" in k] == []  # refused before the journal was started


def test_ingesting_earlier_content_again_makes_it_latest(toy):
    folder, spec, store = toy
    _, a, _ = ingest(spec, store, progress=False)
    ramp_source(folder, "r1.npz", 1000, 2e6)
    _, b, _ = ingest(spec, store, progress=False)
    ramp_source(folder, "r1.npz", 1000, 1e6)  # back to the first content
    _, again, _ = ingest(spec, store, progress=False)
    assert again == a != b
    assert datasets.resolve(store, datasets.parse_ref("toy@latest")).version == a
