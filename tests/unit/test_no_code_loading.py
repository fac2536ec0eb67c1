"""No pickle or other code-executing format is loaded from anything a member or researcher supplied.

Two halves:
- a scan of the source (the AST, so aliases such as `import numpy as np` or `from pickle import
  loads` are resolved and comments or strings never count): every `torch.load` in the repository
  passes `weights_only=True`; in platform/, trainers/ and serving/ nothing calls a pickle loader
  (pickle, dill, cloudpickle, joblib, shelve, marshal, pandas.read_pickle, torch.jit.load),
  `np.load(allow_pickle=True)`, `yaml.load` without a safe loader, eval/exec/compile, dynamic
  imports, or `trust_remote_code=True`. The few calls that must load a pickle-based format are
  allow-listed below with the reason each is safe; an allow-list entry that no longer matches
  anything fails too, so the list cannot rot. A self-test shows the scanner flags each pattern.
- ingest against pickles disguised as dataset sources (an object-dtype .npy or .npz, a pickle
  named .csv/.parquet/.json/.wav/.png, a torch.save archive named .npz, a Parquet file carrying a
  pickled `arrow.py_extension_type`): each is refused with a message naming the file (or, for
  the Parquet extension, read as plain bytes), and the payload, which creates a marker file when
  unpickled, never runs.
"""
from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import yaml

from indai.platform import datasets
from indai.platform.errors import UserError
from indai.platform.ingest import ingest
from indai.platform.storage import open_store

REPO = Path(__file__).resolve().parents[2]
OURS = ("platform", "trainers", "serving")

# qualified call -> why it is refused
FORBIDDEN = {
    **{f"{m}.{f}": "unpickles its input" for m in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
       for f in ("load", "loads", "Unpickler")},
    "joblib.load": "unpickles its input", "shelve.open": "unpickles its values", "marshal.load": "loads code objects",
    "marshal.loads": "loads code objects", "pandas.read_pickle": "unpickles its input",
    "torch.jit.load": "loads TorchScript code", "torch.package.PackageImporter": "imports pickled code",
    "yaml.unsafe_load": "builds any Python object", "yaml.full_load": "builds Python objects",
    "yaml.unsafe_load_all": "builds any Python object", "yaml.full_load_all": "builds Python objects",
    "eval": "runs code", "exec": "runs code", "compile": "builds code", "__import__": "imports by name",
    "importlib.import_module": "imports by name", "pydoc.locate": "imports by name", "runpy.run_path": "runs code",
    "runpy.run_module": "runs code",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "BoundedLoader"}

# (file, qualified call or .method) -> why this load of a pickle-based format is safe
ALLOWED = {
    ("platform/model_format.py", "torch.export.load"):
        "load_program, the one place indai loads an exported program (model.pt2, the report writer's prefixes): "
        "check_program_archive refuses any pickled payload first and every torch.load inside runs weights-only",
    ("trainers/checkpoint.py", ".load_checkpoint"):
        "DeepSpeed's own checkpoint of this run, written by indai under checkpoints/<run>/ and committed; never a user file",
}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else f".{node.attr}"
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the module path it stands for, from every import in the file."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def findings(source: str, *, ours: bool) -> Iterator[tuple[int, str, str]]:
    """(line, qualified call, problem) of every code-loading call in `source`. `ours`: platform,
    trainers or serving code, where every rule applies; elsewhere only the torch.load rule does."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or (name := _dotted(node.func)) is None:
            continue
        head, dot, rest = name.partition(".")
        qual = (aliases.get(head, head) + dot + rest) if head else name
        if qual in ("torch.load", "torch.serialization.load") and not _is_const(_keyword(node, "weights_only"), True):
            yield node.lineno, qual, "torch.load without weights_only=True unpickles any object"
        if not ours:
            continue
        if qual in FORBIDDEN:
            yield node.lineno, qual, FORBIDDEN[qual]
        elif qual in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if (_dotted(loader) or "").rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                yield node.lineno, qual, "yaml.load without a safe Loader builds Python objects"
        elif qual == "numpy.load" and not (_keyword(node, "allow_pickle") is None or _is_const(_keyword(node, "allow_pickle"), False)):
            yield node.lineno, qual, "np.load with allow_pickle unpickles object arrays"
        elif qual in ("torch.export.load",) or name.endswith(".load_checkpoint"):
            yield node.lineno, qual if qual == "torch.export.load" else ".load_checkpoint", "loads a pickle-based format"
        if _is_const(_keyword(node, "trust_remote_code"), True):
            yield node.lineno, qual, "trust_remote_code=True runs code shipped with the weights"


def _python_files() -> Iterator[Path]:
    skip = {".venv", ".git", "node_modules", "build", "dist", ".indai", "__pycache__"}
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for f in files:
            if f.endswith(".py"):
                yield Path(folder) / f


def test_the_scanner_flags_each_pattern():
    bad = """
import pickle as p, numpy as np, yaml, torch, dill, joblib
from pickle import loads
from torch import load as tload
p.load(f); loads(b); dill.loads(b); joblib.load(f)
np.load(f, allow_pickle=True); yaml.load(s); yaml.load(s, Loader=yaml.FullLoader); yaml.unsafe_load(s)
torch.load(f); torch.load(f, weights_only=False); tload(f)
eval("1"); exec("x=1"); __import__("os")
AutoModel.from_pretrained(d, trust_remote_code=True); torch.jit.load(f)
"""
    found = [q for _, q, _ in findings(bad, ours=True)]
    assert found.count("torch.load") == 3
    for qual in ("pickle.load", "pickle.loads", "dill.loads", "joblib.load", "numpy.load", "yaml.unsafe_load", "eval", "exec",
                 "__import__", "torch.jit.load", ".from_pretrained", "AutoModel.from_pretrained"):
        assert any(q == qual or q.endswith(qual) for q in found), (qual, found)
    assert found.count("yaml.load") == 2
    fine = """
import numpy as np, yaml, torch, re
np.load(f, allow_pickle=False); np.load(f); yaml.safe_load(s); yaml.load(s, Loader=yaml.SafeLoader)
torch.load(f, map_location="cpu", weights_only=True); re.compile("x"); model.eval(); "eval(x)"  # eval(x)
"""
    assert list(findings(fine, ours=True)) == []
    assert [q for _, q, _ in findings("import pickle\npickle.loads(b)\ntorch.load(f)\nimport torch", ours=False)] == ["torch.load"]


def test_no_code_executing_loader_outside_the_allow_list():
    problems, used = [], set()
    scanned = 0
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        ours = rel.split("/", 1)[0] in OURS
        scanned += ours
        for line, qual, problem in findings(path.read_text(encoding="utf-8"), ours=ours):
            if (rel, qual) in ALLOWED:
                used.add((rel, qual))
            else:
                problems.append(f"{rel}:{line}: {qual}: {problem}")
    assert scanned >= 60  # platform, trainers and serving were really read
    assert problems == [], "\n".join(problems)
    assert used == set(ALLOWED), f"allow-list entries that match nothing any more: {set(ALLOWED) - used}"


# ---- pickles disguised as dataset sources ----------------------------------------------------------

class _Payload:
    """Creates `marker` when unpickled: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"a": [_Payload(marker)]}, protocol=4)


def _write_spec(folder: Path, body: dict) -> Path:
    path = folder / "spec.yaml"
    path.write_text("# indai data ingest spec.yaml\n" + yaml.safe_dump({"name": "disguised", "member": "m1", **body}))
    return path


SENSOR = {"sensor": {"channels": ["a", "b"], "sampling_rate_hz": 1000, "window": 50}}


def _sensor(path: str) -> dict:
    return {**SENSOR, "sources": [{"path": path, "label": "x", "sampling_rate_hz": 1000}]}


def _table(path: str) -> dict:
    return {"split": {"by": "random"}, "sources": [{"kind": "table", "path": path, "label": "y", "text": ["t"]}]}


def _make_object_npy(p: Path, marker: Path) -> None:
    np.save(p, np.array([_Payload(marker)] * 4, dtype=object), allow_pickle=True)


def _make_object_npz(p: Path, marker: Path) -> None:
    with open(p, "wb") as f:
        np.savez(f, a=np.array([_Payload(marker)] * 4, dtype=object), b=np.zeros(4))


def _make_torch_zip(p: Path, marker: Path) -> None:
    import torch

    torch.save({"a": _Payload(marker)}, p)


# file name, how to make it, spec body, what the refusal says
DISGUISED = {
    "object .npy": ("r.npy", _make_object_npy, _sensor("r.npy"), "pickled arrays are never loaded"),
    "object .npz": ("r.npz", _make_object_npz, _sensor("r.npz"), "pickled arrays are never loaded"),
    "torch.save named .npz": ("r.npz", _make_torch_zip, _sensor("r.npz"), "lacks channel"),
    "pickle named .wav": ("r.wav", lambda p, m: p.write_bytes(_pickle_bytes(m)), _sensor("r.wav"), "not a readable WAV"),
    "pickle named sensor .csv": ("r.csv", lambda p, m: p.write_bytes(_pickle_bytes(m)), _sensor("r.csv"), "r.csv"),
    "pickle named table .csv": ("t.csv", lambda p, m: p.write_bytes(_pickle_bytes(m)), _table("t.csv"), "t.csv"),
    "pickle named .parquet": ("t.parquet", lambda p, m: p.write_bytes(_pickle_bytes(m)), _table("t.parquet"),
                              "could not be read as parquet"),
    "pickle named .jsonl": ("t.jsonl", lambda p, m: p.write_bytes(_pickle_bytes(m)), _table("t.jsonl"), "t.jsonl"),
    "pickle named .png": ("img/x.png", lambda p, m: p.write_bytes(_pickle_bytes(m)),
                          {"split": {"by": "random"}, "sources": [{"kind": "files", "glob": "img/*.png", "modality": "image",
                                                                  "label": "x"}]}, "not an image file"),
}


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """Control: unpickling the payload creates the marker, so its absence below means nothing ran."""
    marker = tmp_path / "ran"
    pickle.loads(_pickle_bytes(marker))
    assert marker.exists()


@pytest.mark.parametrize("case", DISGUISED)
def test_pickles_disguised_as_sources_are_refused_and_never_run(tmp_path, case):
    name, make, body, says = DISGUISED[case]
    marker = tmp_path / "code-ran"
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    make(tmp_path / name, marker)
    store = open_store(tmp_path / "store")
    with pytest.raises(UserError, match=says) as refused:
        ingest(_write_spec(tmp_path, body), store, progress=False)
    assert Path(name).name in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists(), f"{case}: the pickled payload ran"
    assert datasets.list_versions(store) == []


def test_a_pickled_arrow_extension_type_in_parquet_is_never_unpickled(tmp_path):
    """CVE-2023-47248: pyarrow used to unpickle `arrow.py_extension_type` metadata while reading a
    schema. The installed pyarrow reads it as plain binary; the ingest completes without running it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = tmp_path / "code-ran"

    class Smuggled(pa.ExtensionType):
        def __init__(self):
            super().__init__(pa.binary(), "arrow.py_extension_type")

        def __arrow_ext_serialize__(self):
            return pickle.dumps(_Payload(marker))

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            return cls()

    n = 40
    table = pa.table({"t": [f"work order {i}" for i in range(n)], "y": ["ok", "bad"] * (n // 2),
                      "blob": pa.ExtensionArray.from_storage(Smuggled(), pa.array([b"x"] * n))})
    pq.write_table(table, tmp_path / "t.parquet")
    body = _table("t.parquet")
    body["sources"][0]["text"] = ["t", "blob"]
    store = open_store(tmp_path / "store")
    name, version, manifest = ingest(_write_spec(tmp_path, body), store, progress=False)
    assert not marker.exists(), "the pickled extension type was unpickled"
    assert sum(manifest["split"]["records"].values()) == n
    field = pq.read_schema(tmp_path / "t.parquet").field("blob")  # the smuggled type really is in the file
    assert field.metadata[b"ARROW:extension:name"] == b"arrow.py_extension_type" and field.type == pa.binary()
    assert not marker.exists()
    assert not hasattr(pa, "PyExtensionType") or not getattr(pa.PyExtensionType, "_auto_load", False)
