"""Documents (PDF, DOCX, Markdown, plain text) into normalised text, and text into chunks.

Members hand in work instructions, inspection reports and maintenance logs written on Korean
Windows PCs, so plain text may be CP949 (EUC-KR) rather than UTF-8. The encoding is detected
strictly: a file that decodes in none of the accepted encodings is refused instead of being
read as mojibake, which would silently poison a text model.

Text is normalised to NFC (a Hangul syllable typed on macOS arrives decomposed, as jamo, and
would otherwise differ byte for byte from the same word typed on Windows), whitespace is
collapsed, and paragraphs are kept as blank-line-separated blocks so that chunk_text can cut
at them. PDFs without a text layer (scans) are refused: the platform does no OCR. Headers and
footers of DOCX files are not read: they typically hold the company, the author and the
revision, not content.
"""
from __future__ import annotations

import codecs
import re
import unicodedata
import zipfile
from pathlib import Path

from indai.platform.errors import UserError

MAX_DOCUMENT_BYTES = 200 * 1024 * 1024
FORMATS = {".pdf": "pdf", ".docx": "docx", ".md": "markdown", ".markdown": "markdown", ".txt": "text"}
MIN_CHUNK_CHARS = 16

# Unicode spaces other than the ASCII space, and invisible characters that only break matching.
_SPACES = re.compile(r"[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INVISIBLE = re.compile(r"[\u200b-\u200d\u2060\ufeff\u00ad]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def read_document(path: Path) -> str:
    """Text of one .pdf/.docx/.md/.markdown/.txt file, normalised (NFC, whitespace, paragraphs)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path.name}: document type {path.suffix or '(no extension)'} is not supported: "
                        f"use one of {', '.join(sorted(FORMATS))}")
    try:
        nbytes = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path.name}: document not found at {path}: check the path in the dataset spec") from None
    except OSError as e:
        raise UserError(f"{path.name}: cannot read the document ({e.strerror}): check its permissions") from None
    if path.is_dir():
        raise UserError(f"{path.name}: is a folder, not a document: point to the file itself")
    if nbytes > MAX_DOCUMENT_BYTES:
        raise UserError(f"{path.name}: {nbytes / 2**20:.0f} MiB is larger than the limit of {MAX_DOCUMENT_BYTES // 2**20} MiB: split it")
    reader = {"pdf": _pdf, "docx": _docx, "markdown": _markdown, "text": _text}[kind]
    text = normalize_text(reader(path))
    if not text:
        raise UserError(f"{path.name}: the document contains no text: check that it is the right file")
    return text


def normalize_text(text: str) -> str:
    """NFC, Unicode spaces to ' ', no control or zero-width characters, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub(" ", _SPACES.sub(" ", text))
    lines = [" ".join(line.split()) for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ----------------------------------------------------------------------------------------------
# Readers


def _pdf(path: Path) -> str:
    import logging

    with path.open("rb") as f:
        if not f.read(1024).lstrip().startswith(b"%PDF"):
            raise UserError(f"{path.name}: not a PDF file (no %PDF header): check the file, or export it again as PDF")
    log = logging.getLogger("pypdf")
    level = log.level
    log.setLevel(logging.ERROR)  # damaged-but-readable PDFs warn once per object
    try:
        return _pdf_text(path)
    finally:
        log.setLevel(level)


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            # Many PDFs are encrypted only to restrict printing/copying, with an empty open password.
            try:
                ok = reader.decrypt("")
            except Exception:
                ok = 0
            if not ok:
                raise UserError(f"{path.name}: the PDF is protected by a password: save a copy without the password "
                                "(e.g. print it to PDF) and ingest that")
        pages = []
        for page in reader.pages:
            pages.append(page.extract_text() or "")
    except UserError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, IndexError, AttributeError, RecursionError) as e:
        raise UserError(f"{path.name}: the PDF is damaged or truncated ({type(e).__name__}: {str(e)[:150]}): "
                        "export it again") from None
    except Exception as e:
        if type(e).__name__ == "DependencyError":  # AES encryption needs a crypto package
            raise UserError(f"{path.name}: the PDF is encrypted (AES): save a copy without encryption and ingest that") from None
        raise UserError(f"{path.name}: the PDF could not be read ({type(e).__name__}: {str(e)[:150]}): export it again") from None
    text = "\n\n".join(p.strip() for p in pages)
    if not re.search(r"\w", text):
        raise UserError(f"{path.name}: the PDF has no extractable text; it is probably a scan (pictures of pages) "
                        "and needs OCR, which the platform does not do: ingest the original document or an OCR'd PDF")
    return text


def _docx(path: Path) -> str:
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path.name}: not a DOCX file (a .docx is a zip archive; this one is not, maybe an old .doc "
                        "or a renamed file): save it as .docx (Word 2007 or later)")
    from docx import Document
    from docx.opc.exceptions import PackageNotFoundError

    try:
        doc = Document(str(path))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path.name}: not a valid DOCX file ({type(e).__name__}): open it in Word and save it as .docx again") from None
    except Exception as e:
        raise UserError(f"{path.name}: the DOCX could not be read ({type(e).__name__}: {str(e)[:150]}): save it as .docx again") from None
    return "\n\n".join(_docx_blocks(doc))


def _docx_blocks(container) -> list[str]:
    """Paragraphs and tables in document order; a table row is its cells joined by ' | '."""
    from docx.table import Table

    out: list[str] = []
    for block in container.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                cells, seen = [], set()
                for cell in row.cells:
                    if id(cell._tc) in seen:  # a merged cell is returned once per grid column
                        continue
                    seen.add(id(cell._tc))
                    inner = " ".join(t for t in _docx_blocks(cell) if t.strip())
                    cells.append(" ".join(inner.split()))
                if any(cells):
                    out.append(" | ".join(cells))
        else:
            if block.text.strip():
                out.append(block.text)
    return out


def _markdown(path: Path) -> str:
    return markdown_to_text(_decode(path.read_bytes(), path.name))


_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_MD_REF_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_MD_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$")
_MD_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_MD_HTML = re.compile(r"</?[A-Za-z][^>]*>")
_MD_EMPH = re.compile(r"(\*{1,3})(?=\S)(.+?)(?<=\S)\1|(?<!\w)(_{1,3})(?=\S)(.+?)(?<=\S)\3(?!\w)")
_MD_STRIKE = re.compile(r"~~(.+?)~~")
_MD_CODE = re.compile(r"`+([^`]*)`+")
_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_MD_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_MD_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_MD_QUOTE = re.compile(r"^\s{0,3}(>\s?)+")
_MD_BULLET = re.compile(r"^(\s*)[-*+]\s+(\[[ xX]\]\s+)?")
_MD_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def markdown_to_text(md: str) -> str:
    """Markdown without its markup: headings, emphasis, links ([t](url) -> t), quotes, bullets,
    table rules and HTML tags go; the text of code blocks stays as it is (fence lines go)."""
    out: list[str] = []
    fence: str | None = None
    for line in md.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
                continue
            out.append(line)
            continue
        m = re.match(r"^\s{0,3}(`{3,}|~{3,})", line)
        if m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if _MD_REF_DEF.match(line) or _MD_TABLE_SEP.match(line) and "-" in line and ("|" in line):
            continue
        if _MD_RULE.match(line) or (_MD_SETEXT.match(line) and out and out[-1].strip()):
            out.append("")
            continue
        h = _MD_HEADING.match(line)
        if h:
            line = h.group(1)
        line = _MD_QUOTE.sub("", line)
        line = _MD_BULLET.sub(r"\1", line)
        line = _inline_markdown(line)
        if "|" in line and line.strip().startswith("|"):
            line = " | ".join(c.strip() for c in line.strip().strip("|").split("|"))
        out.append(line)
    return "\n".join(out)


def _inline_markdown(line: str) -> str:
    # Code spans first, protected from the emphasis rules, then put back verbatim.
    spans: list[str] = []

    def keep(m: re.Match) -> str:
        spans.append(m.group(1))
        return f"\x00{len(spans) - 1}\x00"

    line = _MD_CODE.sub(keep, line)
    line = _MD_IMAGE.sub(r"\1", line)
    line = _MD_LINK.sub(r"\1", line)
    line = _MD_REF_LINK.sub(r"\1", line)
    line = _MD_AUTOLINK.sub(r"\1", line)
    line = _MD_HTML.sub("", line)
    for _ in range(3):  # nested emphasis: ***a*** or **a _b_**
        line = _MD_EMPH.sub(lambda m: m.group(2) if m.group(1) else m.group(4), line)
    line = _MD_STRIKE.sub(r"\1", line)
    line = re.sub(r"\\([\\`*_{}\[\]()#+\-.!|>~])", r"\1", line)  # backslash escapes
    return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], line)


def _text(path: Path) -> str:
    return _decode(path.read_bytes(), path.name)


def _decode(data: bytes, name: str) -> str:
    """UTF-8 with BOM, UTF-16 with BOM, UTF-8, then CP949 (a superset of EUC-KR) - all strict."""
    if data.startswith(codecs.BOM_UTF8):
        candidates = [("utf-8-sig", data)]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates = [("utf-16", data)]  # Notepad's "Unicode"
    else:
        candidates = [("utf-8", data), ("cp949", data)]
    for enc, raw in candidates:
        if enc != "utf-16" and b"\x00" in raw:
            break  # NUL bytes: a binary file, whatever decodes
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        if _looks_binary(text):
            break
        return text
    raise UserError(f"{name}: wrong encoding: the file is neither UTF-8 nor CP949/EUC-KR text (or it is not a "
                    "text file at all): save it as UTF-8")


def _looks_binary(text: str) -> bool:
    """Control characters other than tab/newline/form feed in more than 1 % of the text."""
    if not text:
        return False
    bad = len(_CONTROL.findall(text[:100_000]))
    return bad > max(2, len(text[:100_000]) // 100)


# ----------------------------------------------------------------------------------------------
# Chunking

# Where a chunk may end, best first: (pattern, which end of the match is the cut, minimum fill).
# A paragraph or sentence cut is taken only if the chunk is at least half full, so a short
# heading does not become a chunk of its own; a word cut is taken anywhere.
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"(?:[.?!…。？！]|다\.|요\.)[\"'”’)\]」』]*(?=\s)")
_SPACE = re.compile(r"\s+")


def chunk_text(text: str, max_chars: int = 1000, overlap: int = 100) -> list[str]:
    """Cut text into chunks of at most max_chars, each starting about `overlap` chars before the
    previous one ended (at a word start, so no word is split by the overlap).

    Cuts prefer, in order: paragraph breaks, line breaks, sentence ends (Korean and English:
    . ? ! 다. 요. …), spaces; a single word longer than max_chars is cut hard. Each chunk is a
    stripped slice of `text`, in order, and together they cover every character but the
    whitespace at the cuts.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < MIN_CHUNK_CHARS:
        raise UserError(f"chunk size {max_chars!r} is not valid: give an integer of at least {MIN_CHUNK_CHARS} characters")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < max_chars:
        raise UserError(f"chunk overlap {overlap!r} is not valid: give an integer from 0 to less than the chunk size ({max_chars})")
    if not isinstance(text, str):
        raise UserError(f"chunk_text needs a string, got {type(text).__name__}")
    return [text[s:e] for s, e in _chunk_spans(text, max_chars, overlap)]


def _chunk_spans(text: str, max_chars: int, overlap: int) -> list[tuple[int, int]]:
    n = len(text)
    spans: list[tuple[int, int]] = []
    pos = _skip_space(text, 0)
    end = _end_of(text, pos, max_chars)
    while pos < n:
        e = _rstrip(text, pos, end)
        if e > pos:
            spans.append((pos, e))
        if end >= n:
            break
        nxt = _skip_space(text, end)
        nxt_end = _end_of(text, nxt, max_chars)
        back = _overlap_start(text, pos, e, overlap) if overlap else None
        if back is not None:
            back_end = _end_of(text, back, max_chars)
            if _rstrip(text, back, back_end) > e:  # overlap only if the next chunk still gets further
                nxt, nxt_end = back, back_end
        pos, end = nxt, nxt_end
    return spans


def _end_of(text: str, pos: int, max_chars: int) -> int:
    return len(text) if len(text) - pos <= max_chars else _best_cut(text, pos, pos + max_chars)


def _rstrip(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _best_cut(text: str, pos: int, limit: int) -> int:
    """End of a chunk starting at pos, at most limit (text[limit:] is not empty)."""
    window = text[pos:limit + 1]  # one more char: a cut right before a space at `limit`
    half = (limit - pos) // 2
    for pattern, use_end, min_fill in ((_PARAGRAPH, False, half), (_LINE, False, half),
                                       (_SENTENCE, True, half), (_SPACE, False, 1)):
        best = None
        for m in pattern.finditer(window):
            cut = m.end() if use_end else m.start()
            if min_fill <= cut <= limit - pos:
                best = cut
        if best is not None:
            return pos + best
    return limit  # one word longer than max_chars: no better place


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _overlap_start(text: str, start: int, end: int, overlap: int) -> int | None:
    """The first word start in [end - overlap, end) after `start`, so the overlap has whole words."""
    lo = max(start + 1, end - overlap)
    for i in range(lo, end):
        if not text[i].isspace() and text[i - 1].isspace():
            return i
    return None
