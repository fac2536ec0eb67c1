"""The hostile-input corpus shared by every property test of names, keys, paths, versions and URIs.

Why one corpus: the tricks that produced MLflow's path-traversal CVEs (and the classic web ones)
are the same whatever the entry point, so each validator is tested against the same list, and a
trick added here is tried everywhere at once (issue 9). Not a test module: the tests import it
(tests/ is on sys.path, see conftest.py).

`hostile_strings()` builds inputs by mixing these fragments with benign names, so a trick also
appears in the middle or at the end of something that otherwise looks right (`cwru@..`,
`models/../x`, `champion\\n`). `HOSTILE_SETTINGS` is the one bounded, reproducible setting every
property test uses: 200 examples, no deadline, derandomized (the same examples on every run and in
CI), no example database.
"""
from __future__ import annotations

import re
import unicodedata

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

TRAVERSAL = ("..", "../", "/..", "..\\", "../../../../etc/passwd", "....//", "..;/", ".%2e", "%2e%2e", "%2E%2E/",
             "%2e%2e%2f", "%252e%252e", "%252e%252e%252f", "..%2f", "%2f", "%5c", "%00", "..%00", "%c0%ae%c0%ae")
URL_PARTS = ("#", "#frag", "?", "?x=1", "&a=b", ";", "@", ":", "@evil")
SCHEMES = ("file://", "file:///etc/passwd", "file:", "s3://", "s3://other-bucket/x", "gs://b/", "gcs://", "gcs://_ray_pkg_",
           "http://169.254.169.254/latest/meta-data/", "https://evil.example/", "models:/", "runs:/", "mlflow-artifacts:/",
           "data:", "javascript:")
ABSOLUTE = ("/", "/etc/passwd", "//proc/self/root", "//proc/self/root/etc/passwd", "/proc/self/environ", "\\",
            "\\\\server\\share", "C:\\", "C:/", "c:", "D:relative", "~", "~/", "~root/")
CONTROL = ("\x00", "\n", "\r", "\r\n", "\t", "\x1b[2J", "\x7f", "\x85", "\u200b", "\u200d", "\u202e", "\u2028", "\ufeff")
# fullwidth and look-alike dots and slashes, fullwidth letters, a dotted capital I
UNICODE = ("\uff0e", "\uff0e\uff0e", "\uff0e\uff0e\uff0f", "\uff0f", "\uff3c", "\u2215", "\u2044", "\u29f8", "\u2024\u2024",
           "\ufe52", "\u3002", "\u0130", "\uff4c\uff4f\uff43\uff41\uff4c")
TRAILING = (".", " ", ". ", " .", "...", "x.", "x ", " x", "\u00a0", "\u3000")
OVERLONG = ("x" * 256, "y" * 1100)

FRAGMENTS = TRAVERSAL + URL_PARTS + SCHEMES + ABSOLUTE + CONTROL + UNICODE + TRAILING + OVERLONG
# names that pass on their own: the tricks hide among them; "link" is a symlink out of the root
# in the tests that set one up
BENIGN = ("cwru", "bearing-monitor", "model", "v1", "2024", "a", "data.csv", "img.png", "latest", "champion", "3",
          "0123456789abcdef", "link", "x_y", "raysubmit_ABC123", "_ray_pkg_0123456789abcdef.zip", "lr", "optim")

HOSTILE_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                            suppress_health_check=[HealthCheck.too_slow])

_SEPARATORS = ("", "/", "@", ".", "-", "\\")


@st.composite
def _mixed(draw, benign: tuple[str, ...]) -> str:
    piece = st.one_of(st.sampled_from(benign), st.sampled_from(FRAGMENTS))
    before = draw(st.lists(piece, max_size=3))
    trick = draw(st.sampled_from(FRAGMENTS))
    after = draw(st.lists(piece, max_size=3))
    return draw(st.sampled_from(_SEPARATORS)).join([*before, trick, *after])


def hostile_strings(benign: tuple[str, ...] = BENIGN) -> st.SearchStrategy[str]:
    """A fragment alone, a fragment among benign names, or a short random string."""
    return st.one_of(st.sampled_from(FRAGMENTS), _mixed(benign), _mixed(benign), st.text(max_size=12))


def corpus(benign: tuple[str, ...]) -> list[str]:
    """The deterministic part: every fragment alone, and at the start, the end and in the middle of
    each benign name, bare or after a separator. A valid name with one trick at its edge ("cwru\\n",
    "cwru@champion#x") is the case random mixing hits least often, so it is enumerated."""
    out = list(FRAGMENTS)
    for b in benign:
        for f in FRAGMENTS:
            half = len(b) // 2
            out += [b + f, f + b, b[:half] + f + b[half:], f"{b}/{f}", f"{f}/{b}", f"{b}@{f}"]
    return list(dict.fromkeys(out))


# ---- what an accepted input must look like (independent of each validator's own regex) ----------

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_plain_name(text: str, max_len: int) -> bool:
    """ASCII letters, digits, '.', '_', '-'; starts with a letter or digit; no '..'; bounded."""
    return isinstance(text, str) and len(text) <= max_len and _PLAIN.fullmatch(text) is not None and ".." not in text


def has_unsafe_character(text: str) -> bool:
    """Separators, URL syntax, control or invisible characters: what no accepted name or key segment holds."""
    return any(ch in "\\%#?:" or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def check_refusal(err: BaseException, *what: str) -> None:
    """A refusal's message is one line and names the kind of input it refused (one of `what`)."""
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, f"message is not one line: {message!r}"
    assert any(w in message for w in what), f"message {message[:200]!r} does not say which input ({what}) is wrong"
