"""Tables exported by MES, ERP and QA systems: CSV, Parquet, JSON and JSON Lines.

Tables are read in chunks of rows, so a table larger than memory streams. Columns are typed
by the dataset spec (str, int, float, datetime with a time zone, category) and a missing
column, a value that does not parse, or a file in the wrong encoding is reported with the
file, the column and the row, never as a traceback.
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from indai.platform.errors import UserError

SNIFF_BYTES = 1 << 16
MISSING_TOKENS = {"", "na", "n/a", "nan", "none", "null", "-", "nat"}
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def detect_encoding(path: Path, declared: str = "auto") -> str:
    """UTF-8 (with or without BOM) or CP949, which Korean Windows exports use; strict."""
    if declared != "auto":
        return declared
    head = path.read_bytes()[:SNIFF_BYTES] if path.stat().st_size <= SNIFF_BYTES else path.open("rb").read(SNIFF_BYTES)
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    for enc in ("utf-8", "cp949"):
        try:
            codecs.getincrementaldecoder(enc)().decode(head, final=False)
            return enc
        except UnicodeDecodeError:
            continue
    raise UserError(f"{path.name}: wrong encoding: neither UTF-8 nor CP949 (EUC-KR); save the export as UTF-8")


def table_format(path: Path, declared: str = "auto") -> str:
    fmt = declared if declared != "auto" else FORMATS.get(path.suffix.lower())
    if not fmt:
        raise UserError(f"{path.name}: unknown table type {path.suffix!r}; use .csv, .parquet, .json or .jsonl (or set format:)")
    return fmt


def _missing(path: Path, wanted: list[str], have: list[str]) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise UserError(f"{path.name}: missing column(s) {missing}; the file has {have[:40]}: fix the spec's column names")


def iter_table(path: Path, columns: list[str], fmt: str = "auto", encoding: str = "auto",
               chunk_rows: int = 50_000) -> Iterator:
    """Chunks of the named columns, all as strings (typing is the spec's job, see `typed`)."""
    import pandas as pd

    fmt = table_format(path, fmt)
    columns = list(dict.fromkeys(columns))
    try:
        if fmt == "csv":
            enc = detect_encoding(path, encoding)
            header = pd.read_csv(path, nrows=0, encoding=enc).columns.tolist()
            _missing(path, columns, header)
            row = 0
            reader = pd.read_csv(path, usecols=columns, dtype=str, keep_default_na=False, encoding=enc,
                                 chunksize=chunk_rows, on_bad_lines="error")
            try:
                for chunk in reader:
                    chunk.index = pd.RangeIndex(row, row + len(chunk))
                    row += len(chunk)
                    yield chunk
            except UnicodeDecodeError:
                raise UserError(f"{path.name}: wrong encoding after row {row}: the file mixes encodings; save it as UTF-8") from None
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            _missing(path, columns, pf.schema_arrow.names)
            row = 0
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
                chunk = batch.to_pandas().astype(str).replace({"None": "", "nan": "", "NaT": ""})
                chunk.index = pd.RangeIndex(row, row + len(chunk))
                row += len(chunk)
                yield chunk
        else:
            yield from _iter_json(path, columns, fmt, chunk_rows)
    except UserError:
        raise
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise UserError(f"{path.name} could not be read as {fmt}: {str(e).splitlines()[0][:300]}") from None


def _iter_json(path: Path, columns: list[str], fmt: str, chunk_rows: int):
    import pandas as pd

    def rows():
        if fmt == "jsonl":
            with path.open(encoding=detect_encoding(path)) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield n, json.loads(line)
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path.name} line {n} is not JSON ({e.msg}): fix or remove that line") from None
        else:
            try:
                data = json.loads(path.read_text(encoding=detect_encoding(path)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path.name} is not JSON ({e.msg} at line {e.lineno}); a large export should be JSON Lines") from None
            if isinstance(data, dict):  # {"records": [...]} or similar: the one list inside
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else None
            if not isinstance(data, list):
                raise UserError(f"{path.name}: a JSON table must be a list of records (or an object holding one list)")
            yield from enumerate(data, 1)

    buf, start = [], 0
    for n, rec in rows():
        if not isinstance(rec, dict):
            raise UserError(f"{path.name} record {n} is not an object")
        if not buf:
            missing = [c for c in columns if c not in rec]
            if missing and start == 0:
                raise UserError(f"{path.name}: missing field(s) {missing}; records have {sorted(rec)[:40]}: fix the spec's column names")
        buf.append({c: "" if rec.get(c) is None else (rec[c] if isinstance(rec.get(c), str) else json.dumps(rec[c], ensure_ascii=False)
                                                          if isinstance(rec.get(c), (dict, list)) else str(rec[c])) for c in columns})
        if len(buf) >= chunk_rows:
            yield pd.DataFrame(buf, columns=columns, index=pd.RangeIndex(start, start + len(buf)))
            start, buf = start + len(buf), []
    if buf:
        yield pd.DataFrame(buf, columns=columns, index=pd.RangeIndex(start, start + len(buf)))


def read_csv_frame(path: Path, columns: list[str], numeric: list[str]):
    """A whole (small) CSV, e.g. one sensor recording; `numeric` columns become float64."""
    import pandas as pd

    chunks = list(iter_table(path, columns, "csv"))
    frame = pd.concat(chunks) if chunks else pd.DataFrame(columns=columns)
    for c in numeric:
        frame[c] = typed(path, frame, c, "float")
    return frame


def typed(path: Path, chunk, name: str, kind: str, tz: str | None = None, fmt: str | None = None,
          invalid: str = "error", bad_counts: dict | None = None) -> np.ndarray:
    """One column of a chunk as a typed array; a value that does not parse names its row, or,
    with invalid="missing", becomes missing (NaN / no time) and is counted in `bad_counts`."""
    import pandas as pd

    col = chunk[name]
    empty = col.str.strip().str.lower().isin(MISSING_TOKENS)
    if kind in ("str", "category"):
        return col.to_numpy(dtype=str)
    if kind in ("int", "float"):
        values = pd.to_numeric(col.where(~empty), errors="coerce")
        bad = values.isna() & ~empty
        if bad.any() and invalid == "missing" and bad_counts is not None:
            bad_counts[name] = bad_counts.get(name, 0) + int(bad.sum())
        elif bad.any():
            row = bad.idxmax()
            raise UserError(f"{path.name}: column {name!r} row {row + 2} is not a number ({col[row]!r}); fix it, type the column as str, "
                            "or set invalid: missing on the column")
        return values.to_numpy(dtype=np.float64)
    if kind == "datetime":
        try:
            values = pd.to_datetime(col.where(~empty), format=fmt, errors="coerce", utc=False)
        except (ValueError, TypeError) as e:
            raise UserError(f"{path.name}: column {name!r}: {e}") from None
        bad = values.isna() & ~empty
        if bad.any() and invalid == "missing" and bad_counts is not None:
            bad_counts[name] = bad_counts.get(name, 0) + int(bad.sum())
        elif bad.any():
            row = bad.idxmax()
            raise UserError(f"{path.name}: column {name!r} row {row + 2} is not a date/time ({col[row]!r}); set format: in the spec "
                            "or invalid: missing on the column")
        if values.dt.tz is None:
            values = values.dt.tz_localize(tz or "UTC", ambiguous="NaT", nonexistent="shift_forward")
        values = values.dt.tz_convert("UTC")
        out = values.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        out[values.isna().to_numpy()] = np.iinfo(np.int64).min
        return out
    raise UserError(f"column type {kind!r} is not one of str, int, float, datetime, category")
