"""Peak memory of a streaming ingest against loading the same table naively.

Writes a work-order table (CSV) of --rows rows with free text, then, each in its own process
so that peak RSS is its own: (1) the naive way, pandas.read_csv of the whole file; (2)
`indai data ingest` of a spec over it (time split, text records, progress off). Prints the
input size, both peak RSS values and their ratios, and appends a JSON line to
bench/results/ingest_memory.jsonl.

    .venv/bin/python bench/ingest_memory.py --rows 6000000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write  # noqa: E402

WORDS = ("hyd pump seal leaking replace bucket cylinder boom swing motor bearing noise overheating engine "
         "filter blocked hose burst grease line track tension pin worn idler crack weld repair sensor fault").split()


def make_table(path: Path, rows: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    start = np.datetime64("2010-01-01")
    with path.open("w") as f:
        f.write("order_id,asset,date,text,cost,failure_mode\n")
        block = 100_000
        for b in range(0, rows, block):
            n = min(block, rows - b)
            words = rng.integers(0, len(WORDS), size=(n, 9))
            days = rng.integers(0, 4000, size=n)
            assets = rng.integers(0, 40, size=n)
            costs = rng.gamma(2.0, 300.0, size=n)
            fm = rng.integers(0, 8, size=n)
            lines = [f"WO{b + i:09d},EX{assets[i]:02d},{start + days[i]},{' '.join(WORDS[w] for w in words[i])},{costs[i]:.2f},fm{fm[i]}\n"
                     for i in range(n)]
            f.writelines(lines)


SPEC = """# indai data ingest spec.yaml
name: bench-orders
member: bench
split: {by: time}
text: {max_chars: 128}
sources:
  - kind: table
    path: orders.csv
    event: order_id
    asset: asset
    time: date
    text: [text]
    label: failure_mode
    columns:
      date: {type: datetime, tz: Asia/Seoul}
      cost: {type: float, unit: KRW}
"""


def peak_rss_of(code: str, env: dict) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a child process running `code`; the child reports its
    own ru_maxrss, so each measurement is independent of the others."""
    t0 = time.perf_counter()
    code += "\nimport resource; print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    took = time.perf_counter() - t0
    kib = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return kib / 1024, took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=6_000_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="indai-bench-") as tmp:
        tmp = Path(tmp)
        make_table(tmp / "orders.csv", a.rows)
        (tmp / "spec.yaml").write_text(SPEC)
        size_mib = (tmp / "orders.csv").stat().st_size / 2**20
        ingest_rss, ingest_s = peak_rss_of(
            "from indai.platform.ingest import ingest; from indai.platform.storage import open_store; "
            f"print(ingest({str(tmp / 'spec.yaml')!r}, open_store({str(tmp / 'store')!r}), progress=False)[1])", {})
        naive_rss, naive_s = peak_rss_of(f"import pandas as pd; df = pd.read_csv({str(tmp / 'orders.csv')!r}); print(len(df))", {})
    result = {"rows": a.rows, "input_mib": round(size_mib, 1), "ingest_peak_rss_mib": round(ingest_rss, 1),
              "naive_peak_rss_mib": round(naive_rss, 1), "ingest_s": round(ingest_s, 1), "naive_s": round(naive_s, 1),
              "input_over_ingest_rss": round(size_mib / ingest_rss, 2), "naive_over_ingest_rss": round(naive_rss / ingest_rss, 2)}
    print(f"input {size_mib:.0f} MiB ({a.rows} rows); peak RSS: streaming ingest {ingest_rss:.0f} MiB in {ingest_s:.0f} s, "
          f"naive pandas.read_csv {naive_rss:.0f} MiB in {naive_s:.0f} s")
    print(f"naive / ingest memory: {naive_rss / ingest_rss:.1f}x; input / ingest memory: {size_mib / ingest_rss:.1f}x")
    print(f"-> {write('ingest_memory', result)}")


if __name__ == "__main__":
    main()
