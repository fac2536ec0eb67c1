"""Looking for secrets in what a run leaves behind: files on disk and records fetched from
services (MLflow runs, Ray jobs, HTTP error bodies).

Not a test module. A secret is reported when its whole value, or its first 16 characters (a
truncated copy in a log line is still a leak), appears anywhere; and any string shaped like
an indai API token (`indai_<id>_<secret>`) is reported even if it is none of the secrets we
know of, so a token that the run created without telling us is caught too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

TOKEN_SHAPE = re.compile(rb"indai_[a-z0-9]{16}_[A-Za-z0-9_-]{16,}")
PREFIX = 16
MAX_FILE = 256 * 1024 * 1024


@dataclass
class SecretScan:
    """The secrets of a run (name -> value) and what the scan found (where, which secret)."""

    secrets: dict[str, str] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    records: int = 0

    def add(self, name: str, value: str | None) -> None:
        if not value:
            return
        if len(value) < 12:
            raise ValueError(f"secret {name} is too short ({len(value)} chars) to scan for without false hits")
        self.secrets[name] = value

    def _needles(self) -> list[tuple[str, bytes]]:
        out = []
        for name, value in self.secrets.items():
            out.append((name, value.encode()))
            if len(value) > PREFIX:
                out.append((f"{name} (its first {PREFIX} characters)", value[:PREFIX].encode()))
        return out

    def scan_bytes(self, where: str, data: bytes) -> None:
        self.bytes += len(data)
        for name, needle in self._needles():
            if needle in data:
                at = data.index(needle)
                context = data[max(0, at - 60):at].decode(errors="replace").replace("\n", " ")
                self.findings.append(f"{where}: {name} after {context!r}")
        for m in TOKEN_SHAPE.finditer(data):
            self.findings.append(f"{where}: an API token ({m.group(0)[:12].decode()}...)")

    def scan_record(self, where: str, record) -> None:
        """Any JSON-able record (a run's params, a job's metadata, a response body)."""
        self.records += 1
        text = record if isinstance(record, (str, bytes)) else json.dumps(record, default=str, sort_keys=True)
        self.scan_bytes(where, text if isinstance(text, bytes) else text.encode())

    def scan_tree(self, root: Path, skip: tuple[Path, ...] = ()) -> None:
        """Every regular file below root (links are not followed), except the paths in skip
        (the places where secrets are kept on purpose) and what lies below them."""
        skip = tuple(p.resolve() for p in skip)
        for path in sorted(Path(root).rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            if any(path.resolve() == s or s in path.resolve().parents for s in skip):
                continue
            try:
                if path.stat().st_size > MAX_FILE:
                    self.findings.append(f"{path}: too large to scan ({path.stat().st_size} bytes)")
                    continue
                data = path.read_bytes()
            except (FileNotFoundError, PermissionError):  # a log rotated away or a socket-like file
                continue
            self.files += 1
            self.scan_bytes(str(path), data)
