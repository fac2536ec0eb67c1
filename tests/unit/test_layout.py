"""The layout promises of DESIGN.md: import names, no shadowing of `platform`, dependency direction."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_standard_platform_module_imports_from_repo_root():
    out = subprocess.run([sys.executable, "-c", "import platform, sys; print(platform.__file__); print(platform.python_version())"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert not Path(out[0]).resolve().is_relative_to(REPO), out[0]
    assert out[1] == ".".join(map(str, sys.version_info[:3]))


def test_no_init_at_top_of_platform_or_mlflow():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not (REPO / "mlflow" / "__init__.py").exists()


def test_import_names_map_to_folders():
    import indai.platform.storage
    import indai.serving.app
    import indai.trainers.loop

    assert Path(indai.platform.storage.__file__).parent == REPO / "platform"
    assert Path(indai.trainers.loop.__file__).parent == REPO / "trainers"
    assert Path(indai.serving.app.__file__).parent == REPO / "serving"


def _module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_dependency_direction():
    for f in (REPO / "platform").rglob("*.py"):
        bad = {n for n in _module_level_imports(f) if n.startswith(("indai.trainers", "indai.serving"))}
        assert not bad, f"{f} imports {bad} at module level; platform must not depend on trainers or serving"
    for f in (REPO / "serving").rglob("*.py"):
        bad = {n for n in _all_imports(f) if n.startswith("indai.trainers")}
        assert not bad, f"{f} imports training code {bad}; serving loads what the registry holds"


def test_the_wheel_holds_every_file_the_package_reads_and_builds_without_warnings(tmp_path):
    """The images and the GPU machine install indai from a wheel, not from this checkout: every
    file of its three folders that is not a test's (modules, Alembic's migrations and template, the
    recipes, the instruction templates) must be in it, or the cluster's database never gets its
    schema. And the build prints no setuptools warning: `make install` showed 60 lines of them, about
    folders that hold package data but were not listed as packages."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy: setuptools writes build/ and egg-info beside the sources
    for folder in ("platform", "trainers", "serving"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    (wheel,) = tmp_path.glob("indai-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = set()
    for folder, package in (("platform", "platform"), ("trainers", "trainers"), ("serving", "serving")):
        for f in (REPO / folder).rglob("*"):
            if f.is_file() and f.suffix in (".py", ".yaml", ".mako") and "__pycache__" not in f.parts:
                wanted.add(f"indai/{package}/{f.relative_to(REPO / folder).as_posix()}")
    assert {"indai/platform/migrations/env.py", "indai/platform/migrations/script.py.mako",
            "indai/trainers/recipes/cwru_sensor.yaml", "indai/platform/instruct_templates.yaml"} <= wanted
    assert wanted - names == set()
