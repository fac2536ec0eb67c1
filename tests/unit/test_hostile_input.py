"""Every entry point that takes a name, key, path, version or URI against the shared hostile corpus
(tests/hostile.py): each input is either refused with a UserError whose one-line message says which
input is wrong, or accepted only if it stays inside its root / matches the safe pattern.

Each entry point has one check function, run twice: over the deterministic corpus (every fragment
alone and at the start, middle and end of a few valid names: 2-3 thousand inputs each), and over
200 hypothesis mixtures of fragments and names (hostile.HOSTILE_SETTINGS: derandomized, no deadline,
no example database). The accepted-side checks are written independently of each validator's own
regex (hostile.is_plain_name, has_unsafe_character), so a validator that lets something through
fails here.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from hostile import (HOSTILE_SETTINGS, check_refusal, corpus, has_unsafe_character, hostile_strings,
                     is_plain_name)
from hypothesis import given
from pydantic import ValidationError

from indai.platform import datasets, gateway, mirror, registry, tenancy
from indai.platform.config import parse_override
from indai.platform.errors import UserError
from indai.platform.storage import LocalStore, S3Store, StoreError, parse_s3_uri, validate_key


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A store root / data folder holding real files and a symlink `link` that points out of it."""
    top = tmp_path_factory.mktemp("hostile")
    outside, inside = top / "outside", top / "root"
    outside.mkdir()
    (inside / "sub").mkdir(parents=True)
    (outside / "secret.npz").write_bytes(b"secret")
    (inside / "data.csv").write_text("a\n1\n")
    (inside / "sub" / "file.npz").write_bytes(b"x")
    (inside / "link").symlink_to(outside)
    return inside


def _key_is_clean(key: str) -> bool:
    return not has_unsafe_character(key) and not key.startswith("~") and \
        all(s not in ("", ".", "..") and not s.isspace() for s in key.split("/"))


# ---- object store keys: the local and the S3 backend share validate_key -----------------------------

def check_local_key(key: str, root: Path) -> None:
    try:
        path = LocalStore(root)._path(key)
    except StoreError as e:
        check_refusal(e, "object key", "resolves outside")
        return
    assert path.is_relative_to(root.resolve()) and path != root.resolve(), (key, path)
    assert _key_is_clean(key), key


_S3 = S3Store("s3://bucket/base", endpoint="127.0.0.1:9", access_key="a", secret_key="b", secure=False)  # connects to nothing


def check_s3_key(key: str, root: Path) -> None:
    try:
        name = _S3._name(key)
    except StoreError as e:
        check_refusal(e, "object key")
        return
    assert name == f"base/{key}" and _key_is_clean(key), key


def check_s3_uri(rest: str, root: Path) -> None:
    try:
        bucket, base = parse_s3_uri("s3://" + rest)
    except StoreError as e:
        check_refusal(e, "bucket", "prefix")
        return
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) and ".." not in bucket, bucket
    assert base == "" or _key_is_clean(base), base


# ---- dataset references, mirror names, member ids -----------------------------------------------------

def check_dataset_ref(text: str, root: Path) -> None:
    try:
        ref = datasets.parse_ref(text)
    except UserError as e:
        check_refusal(e, "dataset name", "dataset version")
        return
    assert is_plain_name(ref.name, 64) and ref.name == ref.name.lower(), ref
    assert ref.version == "latest" or re.fullmatch(r"[0-9a-f]{16}", ref.version), ref
    validate_key(f"datasets/{ref.name}/{ref.version}/manifest.json")


def check_mirror_name(name: str, root: Path) -> None:
    try:
        mirror.check_name(name)
    except UserError as e:
        check_refusal(e, "mirror name")
        return
    assert is_plain_name(name, 128) and name == name.lower(), name
    validate_key(mirror._file_key(name, "model.safetensors"))


def check_member_id(member: str, root: Path) -> None:
    try:
        tenancy.check_id("member", member)
    except UserError as e:
        check_refusal(e, "member id")
        return
    assert is_plain_name(member, 64) and member == member.lower(), member
    validate_key(f"raw/{member}/x")


# ---- registered models: the registry's parser, which the serving ingress uses ---------------------

def _check_model_ref(ref: registry.ModelRef) -> None:
    assert is_plain_name(ref.name, 128), ref
    if ref.alias is not None:
        assert re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", ref.alias) and ref.version is None, ref
        assert ref.uri == f"models:/{ref.name}@{ref.alias}"
    else:
        assert isinstance(ref.version, int) and ref.version >= 1, ref
        assert ref.uri == f"models:/{ref.name}/{ref.version}"


def check_model_ref(text: str, root: Path) -> None:
    try:
        ref = registry.parse_model_ref(text)
    except UserError as e:
        check_refusal(e, "model name", "model version", "model reference", "alias")
        return
    _check_model_ref(ref)


def check_alias(alias: str, root: Path) -> None:
    try:
        registry.check_alias(alias)
    except UserError as e:
        check_refusal(e, "alias")
        return
    assert re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", alias) and alias != "latest", alias


# ---- the job gateway: job ids and working_dir packages from request paths (a bool: 404 / 400) ----

def check_job_id(job_id: str, root: Path) -> None:
    if gateway.valid_job_id(job_id):
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,100}", job_id), job_id  # nothing that changes /api/jobs/{job_id}


def check_package_name(name: str, root: Path) -> None:
    if gateway.valid_package("gcs", name):
        assert re.fullmatch(r"_ray_pkg_[0-9a-f]{16,64}\.zip", name), name
    assert not gateway.valid_package(name, "_ray_pkg_0123456789abcdef.zip") or name == "gcs", name


# ---- dataset spec source paths: relative to the spec folder, symlinks out refused ---------------------

def check_spec_path(rel: str, root: Path) -> None:
    from indai.platform.ingest import SensorSource, TableSource, resolve_path

    try:
        SensorSource(path=rel, label="x", sampling_rate_hz=1)
        TableSource(kind="table", path=rel)
    except ValidationError as e:
        assert "path" in str(e)
        with pytest.raises(UserError):  # the same check where a table row names a file
            resolve_path(root, rel)
        return
    try:
        path = resolve_path(root, rel)
    except UserError as e:
        check_refusal(e, "does not exist", "outside the data folder", "path")
        return
    assert path.is_relative_to(root.resolve()) and path.is_file(), (rel, path)


def check_spec_glob(pattern: str, root: Path) -> None:
    from indai.platform.ingest import FilesSource, _files_of

    try:
        FilesSource(kind="files", glob=pattern, modality="image", label="x")
    except ValidationError as e:
        assert "glob" in str(e)
        return
    try:
        files = _files_of(root, SimpleNamespace(glob=pattern))
    except UserError as e:
        check_refusal(e, "matches no file", "outside the data folder")
        return
    assert all(f.resolve().is_relative_to(root.resolve()) for f in files), (pattern, files)


# ---- config overrides (`a.b=c` on the command line and in job arguments) ---------------------------

def check_override_key(key: str, root: Path) -> None:
    try:
        parts, value = parse_override(f"{key}=1")
    except UserError as e:
        check_refusal(e, "override")
        return
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts), parts


# ---- KPI report file names (the member and the industry reach the path) -------------------------------

def check_kpi_member(member: str, root: Path) -> None:
    from indai.platform import kpi

    for industry, who in ((member, None), ("steel", member)):
        try:
            name = kpi.report_name({"industry": industry, "member": who, "period": {"from": "2026-11-01", "to": "2026-11-30"}})
        except UserError as e:
            check_refusal(e, "member", "industry")
            continue
        assert is_plain_name(name, 200) and name.endswith("-2026-11-01-2026-11-30"), name


# ---- backups: a snapshot id (`--snapshot`) and a backup key (INDAI_BACKUP_KEY, or its file) ---------

def check_snapshot_id(snapshot: str, root: Path) -> None:
    from indai.platform import backup

    repo = backup.Repository(LocalStore(root / "backups"), None)
    try:
        backup.read_manifest(repo, snapshot)
    except UserError as e:
        check_refusal(e, "is not a snapshot id", "no complete snapshot")
        if "no complete snapshot" in str(e):  # looked for: only an id of the pattern, a plain folder name
            assert re.fullmatch(r"\d{8}T\d{9}Z-[0-9a-f]{6}", snapshot), snapshot
        return
    raise AssertionError(f"{snapshot!r} named a snapshot in an empty backup store")


def check_backup_key(text: str, root: Path) -> None:
    from indai.platform.encryption import Key, SealError, refusal

    try:
        key = Key.parse(text)
    except SealError as e:
        check_refusal(e, "backup key")
        assert str(e) == refusal("the backup key", text.strip()), "a refused key says only its length, never its text"
        return
    assert re.fullmatch(r"ibk1-[A-Za-z0-9_-]{43}", text.strip()) and re.fullmatch(r"[0-9a-f]{16}", key.id), text


def check_backup_key_id(text: str, root: Path) -> None:
    from indai.platform import backup_store

    try:
        backup_store.change_keys(str(root / "no-backups"), remove=text, say=print)
    except UserError as e:
        check_refusal(e, "is not a key id", "is not an encrypted backup store")
        if "is not an encrypted backup store" in str(e):  # looked for: only an id of the pattern
            assert re.fullmatch(r"[0-9a-f]{16}", text), text
        return
    raise AssertionError(f"{text!r} removed a key from a store that has none")


# kind: (check, valid names the corpus hides its tricks in)
ENTRY_POINTS = {
    "local store key": (check_local_key, ("data.csv", "sub/file.npz", "link")),
    "s3 object key": (check_s3_key, ("datasets/cwru/v1", "a")),
    "s3 store uri": (check_s3_uri, ("bucket", "my-bucket/team")),
    "dataset ref": (check_dataset_ref, ("cwru", "cwru@latest", "cwru@0123456789abcdef")),
    "mirror name": (check_mirror_name, ("efficientnet-lite0", "minilm")),
    "member id": (check_member_id, ("steel-a", "demo")),
    "model ref": (check_model_ref, ("cwru-bearing@champion", "cwru-bearing/3")),
    "model alias": (check_alias, ("champion", "prod")),
    "gateway job id": (check_job_id, ("raysubmit_ABC123", "job-1")),
    "gateway package": (check_package_name, ("_ray_pkg_0123456789abcdef.zip", "gcs")),
    "spec source path": (check_spec_path, ("data.csv", "sub/file.npz", "link/secret.npz")),
    "spec glob": (check_spec_glob, ("*.csv", "sub/*", "link/*", "**/*.npz")),
    "override key": (check_override_key, ("optim.lr", "run")),
    "kpi report name": (check_kpi_member, ("steel-a", "steel")),
    "backup snapshot id": (check_snapshot_id, ("20261129T203000123Z-1a2b3c", "latest")),
    "backup key": (check_backup_key, ("ibk1-" + "A" * 43, "ibk1-0123456789abcdefghijklmnopqrstuvwxyz-_ABCDE")),
    "backup key id": (check_backup_key_id, ("0123456789abcdef", "a8d62b23bdec635d")),
}


@pytest.mark.parametrize("kind", ENTRY_POINTS)
def test_the_whole_corpus_is_refused_or_safe(kind, root):
    check, benign = ENTRY_POINTS[kind]
    inputs = corpus(benign)
    assert len(inputs) > 1000
    for text in inputs:
        check(text, root)


@pytest.mark.parametrize("kind", ENTRY_POINTS)
def test_generated_mixtures_are_refused_or_safe(kind, root):
    check, benign = ENTRY_POINTS[kind]

    @HOSTILE_SETTINGS
    @given(text=hostile_strings(benign))
    def mixture(text):
        check(text, root)

    mixture()


def test_valid_names_pass_every_check(root):
    """The checks refuse tricks, not the names the platform really uses."""
    from indai.platform import kpi
    from indai.platform.ingest import resolve_path

    assert LocalStore(root)._path("data.csv") == root.resolve() / "data.csv"
    assert _S3._name("datasets/cwru/v1") == "base/datasets/cwru/v1"
    assert parse_s3_uri("s3://my-bucket/team/a") == ("my-bucket", "team/a")
    assert datasets.parse_ref("cwru@0123456789abcdef") == datasets.DatasetRef("cwru", "0123456789abcdef")
    assert mirror.check_name("efficientnet-lite0") == "efficientnet-lite0"
    assert tenancy.check_id("member", "steel-a") == "steel-a"
    assert registry.parse_model_ref("cwru-bearing/12") == registry.ModelRef("cwru-bearing", version=12)
    assert gateway.valid_job_id("raysubmit_AbC123-x") and gateway.valid_package("gcs", "_ray_pkg_0123456789abcdef.zip")
    assert resolve_path(root, "sub/file.npz") == root.resolve() / "sub" / "file.npz"
    assert parse_override("optim.lr=0.1") == (["optim", "lr"], 0.1)
    period = {"from": "2026-11-01", "to": "2026-11-30"}
    assert kpi.report_name({"industry": "steel", "member": "steel-a", "period": period}) == "kpi-steel-steel-a-2026-11-01-2026-11-30"
    from indai.platform import backup
    from indai.platform.encryption import Key

    with pytest.raises(backup.BackupError, match="no complete snapshot 20261129T203000123Z-1a2b3c"):
        backup.read_manifest(backup.Repository(LocalStore(root / "backups"), None), "20261129T203000123Z-1a2b3c")
    assert len(Key.parse("ibk1-" + "A" * 43).id) == 16


def test_the_known_tricks_are_refused_where_they_matter(root):
    """Named regressions: each of these was accepted before issue 9 (a regex ending in '$' matched
    before a final newline; str.isdigit() took '²'; row paths raised ValueError, not UserError)."""
    from indai.platform import kpi
    from indai.platform.ingest import resolve_path

    for bad in ("cwru\n", "cwru@0123456789abcdef\n"):
        with pytest.raises(UserError, match="dataset"):
            datasets.parse_ref(bad)
    with pytest.raises(UserError, match="mirror name"):
        mirror.check_name("minilm\n")
    for bad in ("m\n@champion", "m@champion\n", "m/²", "m/３", "m/" + "9" * 5000, "m/03"):
        with pytest.raises(UserError, match="model|alias"):
            registry.parse_model_ref(bad)
    with pytest.raises(UserError, match="member id"):
        tenancy.check_id("member", "steel-a\n")
    assert not gateway.valid_job_id("raysubmit_1\n") and not gateway.valid_package("gcs", "_ray_pkg_0123456789abcdef.zip\n")
    for bad in ("logs/../../etc/passwd.csv", "logs/a\x00.csv", "/etc/passwd"):
        with pytest.raises(UserError, match="must be relative"):
            resolve_path(root, bad)
    with pytest.raises(UserError, match="industry"):
        kpi.report_name({"industry": "../../tmp", "member": None, "period": {"from": "2026-11-01", "to": "2026-11-30"}})
    with pytest.raises(UserError, match="override key"):
        parse_override("\u00ba=1")


def test_the_serving_ingress_refuses_a_hostile_model_before_any_lookup():
    """The ingress parses the request's model with parsed_model_ref before the access rule reads the
    database or the registry; a bad reference is a 400 naming the problem."""
    from indai.serving.app import Refused, parsed_model_ref

    accepted = []
    for text in corpus(("cwru-bearing@champion", "cwru/3")):
        try:
            ref = parsed_model_ref(text)
        except Refused as e:
            assert e.status == 400
            check_refusal(Exception(e.detail), "model name", "model version", "model reference", "alias")
        else:
            _check_model_ref(ref)
            accepted.append(text)
    # what passes is a plain name with a dot mixed in ("x.cwru/3"), never a trick of the corpus
    assert accepted and all(re.fullmatch(r"[a-z.-]+(@champion|/3)", t) for t in accepted), accepted
    assert parsed_model_ref("cwru-bearing@champion") == registry.ModelRef("cwru-bearing", alias="champion")


def test_a_hostile_backup_store_config_is_refused_or_well_formed(tmp_path_factory):
    """config.json comes from the backup store, which others may write: whatever it holds, reading
    it and opening a key slot in it either works or is a one-line BackupError naming the file or
    the slot, never another exception."""
    import json

    from hypothesis import strategies as st

    from indai.platform import backup_store
    from indai.platform.encryption import Key, new_key_text

    key = Key.parse(new_key_text())
    root = tmp_path_factory.mktemp("config")
    store = LocalStore(root)
    scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=24)
    anything = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                            max_leaves=8)
    slot_ids = st.sampled_from([key.id, "0123456789abcdef", "../../etc", "", key.id.upper()]) | st.text(max_size=20)
    slots = st.dictionaries(slot_ids, st.fixed_dictionaries({"sealed": st.text(max_size=80) | anything}) | anything, max_size=3)
    configs = st.fixed_dictionaries({}, optional={
        "format": st.sampled_from([1, 2, 3, "2", None, 2.0, True]),
        "encryption": st.sampled_from([None, "aes-256-gcm", "rot13", 1]),
        "key_id": st.sampled_from([key.id, "0123456789abcdef", "x"]) | anything,
        "keys": slots | anything}) | anything

    @HOSTILE_SETTINGS
    @given(config=configs)
    def one(config):
        store.put_bytes("config.json", json.dumps(config).encode())
        try:
            read = backup_store._read_config(store)
            assert type(read["format"]) is int and read["format"] in (1, 2), read  # not true, nor 2.0
            if read.get("encryption"):
                opened = backup_store._store_key(store.uri, read, key)
                assert isinstance(opened, Key) and key.id in backup_store.key_ids(read)
        except backup_store.BackupError as e:
            check_refusal(e, "config.json", "is not a key of", "key slot")

    one()
