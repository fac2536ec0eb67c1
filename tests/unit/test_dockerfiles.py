"""The images the chart names: no container engine runs here, so check what can be checked —
the Dockerfiles parse, pin their bases and packages, copy files that exist, run as a numeric
non-root user, agree with requirements.lock (Ray version, CUDA major), and the pinned packages
the MLflow image installs exist on the package index (integration: needs PyPI)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"platform": (REPO / "docker/platform.Dockerfile", REPO), "mlflow": (REPO / "mlflow/Dockerfile", REPO / "mlflow")}
KNOWN = {"FROM", "ARG", "RUN", "COPY", "USER", "WORKDIR", "ENV", "CMD", "ENTRYPOINT", "EXPOSE", "LABEL"}
LOCK = (REPO / "requirements.lock").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments may sit inside a continued instruction too
            continue
        buf += " " + line.removesuffix("\\").strip()
        if line.endswith("\\"):
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    if buf:
        raise ValueError("dangling line continuation at the end")
    return out


def base_images(ins: list[tuple[str, str]]) -> list[str]:
    """FROM images with ${ARG} defaults substituted."""
    args = {m.group(1): m.group(2) for w, a in ins if w == "ARG" for m in [re.match(r"(\w+)=(\S+)", a)] if m}
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], a.split()[0]) for w, a in ins if w == "FROM"]


def pip_installs(ins: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments of every `pip install` in RUN instructions (up to the next shell operator)."""
    found = []
    for w, a in ins:
        if w != "RUN":
            continue
        words = shlex.split(a)
        for i in range(len(words) - 1):
            if words[i] == "pip" and words[i + 1] == "install":
                rest = []
                for t in words[i + 2:]:
                    if t in ("&&", "||", ";", "|"):
                        break
                    rest.append(t)
                found.append(rest)
    return found


def unpinned(args: list[str]) -> list[str]:
    """Package arguments of one pip install that are not pinned (`==` or `-c requirements.lock`)."""
    if "-c" in args and args[args.index("-c") + 1] == "requirements.lock":
        return []
    skip_next = {"-c", "-r", "--constraint", "--requirement", "-i", "--index-url"}
    pkgs, skip = [], False
    for t in args:
        if skip:
            skip = False
        elif t in skip_next:
            skip = True
        elif not t.startswith("-"):
            pkgs.append(t)
    return [p for p in pkgs if not re.fullmatch(r"[A-Za-z0-9._-]+(\[[A-Za-z0-9,._-]+\])?==[0-9][A-Za-z0-9.+!-]*", p)]


def copy_sources(args: str) -> list[str]:
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1]


# ---- the parser itself ------------------------------------------------------------------------

def test_parser_joins_continuations_and_finds_unpinned_installs():
    ins = instructions("FROM python:3.11\n# note\nRUN pip install a==1 \\\n  # inline comment\n  b && echo ok\nUSER 1000\n")
    assert [w for w, _ in ins] == ["FROM", "RUN", "USER"]
    assert pip_installs(ins) == [["a==1", "b"]]
    assert unpinned(["a==1", "b", "c[x]==2.0"]) == ["b"]
    assert unpinned(["--no-cache-dir", "-c", "requirements.lock", "."]) == []
    assert unpinned(["-c", "other.txt", "."]) == ["."]
    assert base_images(instructions("ARG BASE=img:1.2\nFROM ${BASE}\n")) == ["img:1.2"]
    with pytest.raises(ValueError):
        instructions("RUN echo \\\n")


# ---- the Dockerfiles ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_pinned_and_non_root(name):
    path, context = DOCKERFILES[name]
    ins = instructions(path.read_text())
    assert all(word in KNOWN for word, _ in ins), [w for w, _ in ins if w not in KNOWN]
    for base in base_images(ins):
        image, _, tag = base.rpartition(":")
        assert image and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: base {base!r} is not pinned to a version"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) > 0, f"{name}: last USER must be a numeric non-root uid"
    last_user = max(i for i, (w, _) in enumerate(ins) if w == "USER")
    assert all(w not in ("CMD", "ENTRYPOINT") for w, _ in ins[:last_user]), "CMD/ENTRYPOINT before the final USER"
    assert any(w in ("CMD", "ENTRYPOINT") for w, _ in ins[last_user:]), f"{name}: no CMD/ENTRYPOINT"
    installs = pip_installs(ins)
    assert installs, f"{name}: installs nothing with pip"
    for args in installs:
        assert not unpinned(args), f"{name}: unpinned pip install: {unpinned(args)}"
    for w, a in ins:
        if w == "COPY":
            for src in copy_sources(a):
                assert (context / src).exists(), f"{name}: COPY source {src} is not in the build context"


def test_platform_image_matches_the_lock():
    """Ray in the base image is the locked Ray; the GPU base's CUDA major is the torch wheels'."""
    ray = re.search(r"^ray==(\S+)$", LOCK, re.M).group(1)
    ins = instructions(DOCKERFILES["platform"][0].read_text())
    (base,) = base_images(ins)
    assert base.startswith(f"rayproject/ray:{ray}-py311-"), base
    cuda = re.search(r"-cu(\d\d)(\d)$", base)
    assert cuda, f"GPU base {base} names no CUDA version"
    lock_majors = set(re.findall(r"^nvidia-[a-z-]+-cu(\d+)==", LOCK, re.M))
    assert lock_majors == {cuda.group(1)}, (base, lock_majors)
    assert f"BASE=rayproject/ray:{ray}-py311-cpu" in DOCKERFILES["platform"][0].read_text()  # the CPU variant's build


def test_mlflow_image_can_run_basic_auth():
    """`--app-name basic-auth` imports flask_wtf: the image must install mlflow[auth]; the start
    script and the auth template it fills in are shipped."""
    ins = instructions(DOCKERFILES["mlflow"][0].read_text())
    pkgs = [p.lower() for args in pip_installs(ins) for p in args if "==" in p]
    mlflow_pin = re.search(r"^mlflow==(\S+)$", LOCK, re.M).group(1)
    assert f"mlflow[auth]=={mlflow_pin}" in pkgs
    assert any(p.startswith("flask-wtf==") for p in pkgs) and any(p.startswith("psycopg2-binary==") for p in pkgs)
    copied = {src for w, a in ins if w == "COPY" for src in copy_sources(a)}
    assert {"start-server.sh", "basic_auth.ini"} <= copied
    ini = (REPO / "mlflow/basic_auth.ini").read_text()
    for key in ("admin_password", "database_uri"):  # the lines start-server.sh replaces
        assert re.search(rf"^{key} = ", ini, re.M), key
    assert "--app-name" in (REPO / "mlflow/start-server.sh").read_text()


@pytest.mark.integration
def test_mlflow_image_packages_resolve(tmp_path):
    ins = instructions(DOCKERFILES["mlflow"][0].read_text())
    pkgs = [re.sub(r"\[.*\]", "", p) for args in pip_installs(ins) for p in args if "==" in p]
    assert len(pkgs) == 4
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
                           "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "-d", str(tmp_path), *pkgs],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert len(list(tmp_path.iterdir())) == 4
