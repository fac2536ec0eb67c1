"""Builds, on this machine, a folder that holds only the Python packages the lent GPU machine has.

Checking the carried wheels (.whl/) costs no device time when it is done here first: this script
links into DEST every distribution of the running interpreter's environment whose name the
package list of KINDS.md holds, and nothing else. A Python started without site-packages and
with DEST on its path then sees roughly what python3 sees there (other versions, same names),
so an import that fails because the GPU machine lacks a package fails here too.

Usage: .venv/bin/python bench/gpu/gpu_like_site.py DEST [KINDS.md]
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

KINDS_DEFAULT = Path("/work/.library/device/KINDS.md")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_package_names(kinds_md: Path) -> set[str]:
    """The names in the 'Packages: a, b, c.' line of KINDS.md's last section."""
    match = re.search(r"Packages: (.+?)\.\s*$", kinds_md.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"{kinds_md}: no 'Packages: ...' line found")
    return {normalized(n.strip()) for n in match.group(1).split(",")}


def top_level_entries(dist: md.Distribution) -> set[str]:
    """The first path component of each file the distribution installed in site-packages."""
    entries = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first != ".." and not first.endswith(".pth") and first != "__pycache__":
            entries.add(first)
    return entries


def main() -> None:
    dest = Path(sys.argv[1])
    kinds = gpu_package_names(Path(sys.argv[2]) if len(sys.argv) > 2 else KINDS_DEFAULT)
    dest.mkdir(parents=True, exist_ok=True)
    linked, left = [], []
    for dist in md.distributions():
        name = normalized(dist.metadata["Name"])
        if name not in kinds:
            left.append(name)
            continue
        site = Path(dist.locate_file(""))
        for entry in top_level_entries(dist):
            link = dest / entry
            if (site / entry).exists() and not link.exists():
                link.symlink_to(site / entry)
        linked.append(name)
    print(f"linked {len(linked)} distributions into {dest}; left out {len(left)}: {' '.join(sorted(left))}")
    missing = sorted(kinds - set(linked))
    print(f"on the GPU machine but not here ({len(missing)}): {' '.join(missing)}")


if __name__ == "__main__":
    main()
