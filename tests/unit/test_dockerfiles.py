"""The images the chart names: no container engine runs here, so check what can be checked —
the Dockerfiles parse, pin their bases and packages, copy files that exist, run as a numeric
non-root user, and the pinned packages they install exist on the package index."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"platform": (REPO / "docker/platform.Dockerfile", REPO), "mlflow": (REPO / "mlflow/Dockerfile", REPO / "mlflow")}
KNOWN = {"FROM", "ARG", "RUN", "COPY", "USER", "WORKDIR", "ENV", "CMD", "ENTRYPOINT", "EXPOSE", "LABEL"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        buf += " " + line.rstrip("\\").strip()
        if line.endswith("\\"):
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_pinned_and_non_root(name):
    path, context = DOCKERFILES[name]
    ins = instructions(path)
    assert all(word in KNOWN for word, _ in ins), [w for w, _ in ins if w not in KNOWN]
    args = {m.group(1): m.group(2) for w, a in ins if w == "ARG" for m in [re.match(r"(\w+)=(\S+)", a)] if m}
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0]) for w, a in ins if w == "FROM"]
    for base in bases:
        image, _, tag = base.rpartition(":")
        assert image and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: base {base!r} is not pinned"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) > 0, f"{name}: last USER must be a numeric non-root uid"
    last_user = max(i for i, (w, _) in enumerate(ins) if w == "USER")
    assert all(w not in ("CMD", "ENTRYPOINT") for w, _ in ins[:last_user]), "CMD/ENTRYPOINT before the final USER"
    for w, a in ins:
        if w == "RUN" and "pip install" in a:
            pkgs = [t for t in a.split("pip install", 1)[1].split("&&")[0].split() if not t.startswith("-") and t != "."]
            pinned = "-c requirements.lock" in a or (pkgs and all("==" in p for p in pkgs))
            assert pinned, f"{name}: unpinned pip install: {a}"
        if w == "COPY":
            for src in a.split()[:-1]:
                assert (context / src).exists(), f"{name}: COPY source {src} is not in the build context"


def test_platform_image_ray_matches_the_lock():
    lock = (REPO / "requirements.lock").read_text()
    ray = re.search(r"^ray==(\S+)$", lock, re.M).group(1)
    text = (REPO / "docker/platform.Dockerfile").read_text()
    assert f"rayproject/ray:{ray}-" in text


@pytest.mark.integration
def test_mlflow_image_packages_resolve(tmp_path):
    ins = instructions(DOCKERFILES["mlflow"][0])
    run = next(a for w, a in ins if w == "RUN" and "pip install" in a)
    pkgs = [t for t in run.split("pip install", 1)[1].split("&&")[0].split() if "==" in t]
    assert len(pkgs) == 3
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
                           "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "-d", str(tmp_path), *pkgs],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert len(list(tmp_path.iterdir())) == 3
