"""One JSON line per benchmark result, with what is needed to compare runs: the date, the
machine, library versions and the git commit."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# INDAI_BENCH_RESULTS sends results elsewhere (the GPU machine writes them under $OUT)
RESULTS = Path(os.environ.get("INDAI_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def context() -> dict:
    def version(mod: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                        "load_average_1min": round(os.getloadavg()[0], 2)},  # other work on the machine skews timings
            "versions": {m: version(m) for m in ("torch", "ray", "deepspeed", "numpy", "pandas", "pyarrow",
                                                 "transformers", "peft", "timm")},
            "gpu": _gpu()}


def _gpu() -> str | None:
    """The accelerator, where torch is already loaded (not imported here just to ask)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()}x)"


def write(bench: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"bench": bench, **context(), **result}) + "\n")
    return path
