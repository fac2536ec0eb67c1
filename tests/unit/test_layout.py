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
