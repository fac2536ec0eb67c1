"""Dataset names and `@latest` on the real local-folder store: a name belongs to the member of its
first commit, `@latest` is the owner's version committed (or re-committed) last, stores written
before owners were recorded still resolve (to the owner's versions only), and a shard that cannot
be read back is refused before any of it is written."""
import hashlib
import json

import numpy as np
import pytest

from indai.platform import datasets
from indai.platform.errors import UserError
from indai.platform.storage import open_store


def arrays(value: int) -> dict:
    return {"train": {"label": np.full(4, value, np.int64)}, "test": {"label": np.full(2, value, np.int64)}}


def write(store, name: str, member: str | None, value: int) -> str:
    return datasets.write_version(store, name, {"member": member, "stage": "raw"}, arrays(value))[0]


def latest(store, name: str) -> str:
    return datasets.resolve(store, datasets.parse_ref(f"{name}@latest")).version


def old_write(store, name: str, member: str, value: int) -> str:
    """A version as the code before owners wrote it: blobs, manifest, a marker without member, no owner record."""
    files = {}
    for split, arrs in arrays(value).items():
        for key, arr in arrs.items():
            data = datasets._npy_bytes(arr)
            sha = hashlib.sha256(data).hexdigest()
            store.put_bytes(f"datasets/{name}/blobs/{sha}.npy", data)
            files[f"{split}/00000/{key}.npy"] = sha
    body = {"member": member, "stage": "raw", "name": name, "files": dict(sorted(files.items()))}
    version = hashlib.sha256(datasets._canonical(body)).hexdigest()[:16]
    body["version"] = version
    data = json.dumps(body, indent=2).encode()
    store.put_bytes(f"datasets/{name}/{version}/manifest.json", data)
    store.commit(f"datasets/{name}/{version}", {"version": version, "manifest_sha256": hashlib.sha256(data).hexdigest()})
    return version


def test_a_name_belongs_to_the_member_of_its_first_commit(tmp_path):
    store = open_store(tmp_path / "store")
    mine = write(store, "shared-name", "victim", 1)
    assert json.loads(store.get_bytes("datasets/shared-name/owner.json")) == {"member": "victim"}
    with pytest.raises(UserError, match="^dataset shared-name belongs to member victim: choose another name") as e:
        write(store, "shared-name", "evil", 2)
    assert "\n" not in str(e.value)
    assert [v for _, v in datasets.list_versions(store)] == [mine]  # nothing of evil's was committed
    assert latest(store, "shared-name") == mine
    newer = write(store, "shared-name", "victim", 3)  # the owner goes on committing
    assert latest(store, "shared-name") == newer
    # a consortium-owned name (industry-common data: no member) is no member's either
    write(store, "steel-common", None, 4)
    with pytest.raises(UserError, match="dataset steel-common belongs to no member .*: choose another name"):
        write(store, "steel-common", "evil", 5)


def test_recommitting_content_makes_it_latest_again(tmp_path):
    store = open_store(tmp_path / "store")
    a = write(store, "orders", "m1", 1)
    first = store.read_commit(f"datasets/orders/{a}")
    b = write(store, "orders", "m1", 2)
    assert latest(store, "orders") == b
    again = write(store, "orders", "m1", 1)  # the member went back to the first content
    assert again == a and latest(store, "orders") == a
    # the layout older readers know: still ordered by the commit markers' times
    assert store.committed_children("datasets/orders") == [b, a]
    record = store.read_commit(f"datasets/orders/{a}")
    assert record["manifest_sha256"] == first["manifest_sha256"] and record["first_committed_at"] == first["committed_at"]
    assert record["committed_at"] > first["committed_at"]
    assert datasets.read_manifest(store, datasets.DatasetRef("orders", a))["version"] == a  # still verifies


def test_a_store_from_before_owners_resolves_to_the_first_members_versions(tmp_path):
    store = open_store(tmp_path / "store")
    mine = old_write(store, "shared-name", "victim", 1)
    theirs = old_write(store, "shared-name", "evil", 2)  # taken over before names had owners
    assert store.committed_children("datasets/shared-name") == [mine, theirs]
    assert latest(store, "shared-name") == mine
    # an explicit version is still there for whoever may read it
    assert datasets.resolve(store, datasets.DatasetRef("shared-name", theirs)).version == theirs
    with pytest.raises(UserError, match="belongs to member victim: choose another name"):
        write(store, "shared-name", "evil", 3)
    newer = write(store, "shared-name", "victim", 4)
    assert json.loads(store.get_bytes("datasets/shared-name/owner.json")) == {"member": "victim"}
    assert latest(store, "shared-name") == newer
    # re-committing the first version makes it newest; the recorded owner keeps evil out even then
    assert write(store, "shared-name", "victim", 1) == mine and latest(store, "shared-name") == mine
    with pytest.raises(UserError, match="belongs to member victim"):
        write(store, "shared-name", "evil", 2)


@pytest.mark.parametrize("column", ["P/N", "L/min", "a\nb", ".."])
def test_an_array_name_that_cannot_be_read_back_is_refused_before_any_blob(tmp_path, column):
    store = open_store(tmp_path / "store")
    writer = datasets.VersionWriter(store, "mes")
    shard = {"label": np.zeros(3, np.int64), f"tab_{column}": np.array(["a", "b", "c"])}
    if column == "..":
        shard = {"label": np.zeros(3, np.int64), "..": np.zeros(3)}
    with pytest.raises(UserError, match="cannot be stored") as e:
        writer.put_shard("train", 0, shard)
    if column != "..":
        assert f"from the typed column {column!r}" in str(e.value) and "rename the column" in str(e.value)
    assert store.list("datasets") == [] and writer.files == {}
    # names in any script, with spaces and punctuation, are fine
    fine = {"tab_압력 (bar)": np.array([1.5, 2.5]), "tab_L·min⁻¹": np.array([3.0, 4.0]), "label": np.array([0, 1])}
    version, _ = datasets.write_version(store, "mes", {"member": "m1"}, {"train": fine})
    got = datasets.load_split(store, datasets.DatasetRef("mes", version), "train")
    assert sorted(got) == sorted(fine) and got["tab_압력 (bar)"].tolist() == [1.5, 2.5]


def test_a_bad_shard_id_is_refused_before_any_blob(tmp_path):
    store = open_store(tmp_path / "store")
    writer = datasets.VersionWriter(store, "mes")
    with pytest.raises(ValueError, match="shard id 'Bad/Id' is not valid"):
        writer.put_shard("train", "Bad/Id", {"label": np.zeros(3, np.int64)})
    assert store.list("datasets") == []
