"""Client-side encryption of the files indai writes where others keep them (the backup store).

A key is 256 random bits, written as text: `ibk1-` and 43 base64url characters
(`indai admin backup-key` prints a new one). From it HKDF-SHA256 derives separate keys for
contents, for names, and a key id: 16 hex digits that say which key a store was made with,
without saying anything about the key.

A sealed file is `MAGIC`, a random 16-byte salt, then the plaintext in chunks of `CHUNK` bytes,
each encrypted with AES-256-GCM under a key derived from the content key and the salt (so no two
files share a key, and nonces never repeat). A chunk's nonce is its number and a flag for the
last chunk, and every chunk is bound to the file's name (its associated data). So a file that
was changed, cut short, extended, had its chunks reordered, or was moved to another name does not
open: `open_file` names it instead of giving back something else. Files of any size pass through
in constant memory.

A backup store is sealed with a key of its own (256 random bits), which is itself sealed with
each key that may open the store (`wrap_secret`): so keys can be added and removed without
sealing the backups again (platform/backup_store.py).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from indai.platform.errors import UserError

MAGIC = b"INDAIENC\x01"
SALT_BYTES = 16
CHUNK = 1 << 20
TAG_BYTES = 16
KEY_PREFIX = "ibk1-"
_KEY_TEXT = re.compile(r"ibk1-[A-Za-z0-9_-]{43}")


class SealError(UserError):
    """A key that is not one, or a sealed file that does not open with the key."""


def _derive(secret: bytes, purpose: bytes, salt: bytes | None = None) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"indai backup v1 " + purpose).derive(secret)


@dataclass(frozen=True, repr=False)
class Key:
    """A parsed key: the content key, the name key and the key id (never printed whole)."""
    contents: bytes
    names: bytes
    id: str

    def __repr__(self) -> str:  # a key must not reach a log through a repr
        return f"Key(id={self.id})"

    @classmethod
    def parse(cls, text: str, where: str = "the backup key") -> "Key":
        text = (text or "").strip()
        if not _KEY_TEXT.fullmatch(text):
            raise SealError(refusal(where, text))
        return cls.from_secret(base64.urlsafe_b64decode(text[len(KEY_PREFIX):] + "="))

    @classmethod
    def from_secret(cls, secret: bytes) -> "Key":
        return cls(contents=_derive(secret, b"contents"), names=_derive(secret, b"names"),
                   id=_derive(secret, b"key id")[:8].hex())

    def name(self, value: str) -> str:
        """A name that hides `value` (a content's sha256) from whoever reads the store without the
        key: equal values give equal names, so contents are still shared."""
        return hmac.new(self.names, value.encode(), hashlib.sha256).hexdigest()


def refusal(where: str, text: str) -> str:
    """Why `text` is not a key, saying nothing of it but its length and whether it has the prefix
    (a wrong secret pasted here must not reach a log)."""
    prefix = "with" if text.startswith(KEY_PREFIX) else "without"
    return (f"{where} is not an indai backup key ({len(text)} characters, {prefix} the prefix {KEY_PREFIX!r}; a key "
            "is that prefix and 43 base64url characters): make one with `indai admin backup-key` and keep a copy off "
            "the cluster")


def new_key_text() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def new_secret() -> bytes:
    return os.urandom(32)


def wrap_secret(key: Key, secret: bytes, slot: str) -> str:
    """`secret` (a store's own key) sealed with `key` and bound to `slot`, as base64 text."""
    return base64.b64encode(seal_bytes(key, secret, slot)).decode()


def unwrap_secret(key: Key, text: str, slot: str) -> bytes:
    """The secret `wrap_secret` sealed into `text`; SealError when `key` is not the one it was
    sealed with or the text was changed or moved."""
    try:
        data = base64.b64decode(text.encode(), validate=True)
    except (ValueError, AttributeError):
        raise SealError(f"{slot} is not base64 text") from None
    secret = open_bytes(key, data, slot)
    if len(secret) != 32:
        raise SealError(f"{slot} does not hold a 256-bit key")
    return secret


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _aead(key: Key, salt: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(_derive(key.contents, b"file", salt))


def _seal(key: Key, fh: BinaryIO, out: BinaryIO, name: str) -> None:
    salt = os.urandom(SALT_BYTES)
    aead, ad = _aead(key, salt), name.encode()
    out.write(MAGIC + salt)
    counter, chunk = 0, fh.read(CHUNK)
    while True:
        following = fh.read(CHUNK) if len(chunk) == CHUNK else b""
        last = not following
        out.write(aead.encrypt(_nonce(counter, last), chunk, ad))
        if last:
            return
        counter, chunk = counter + 1, following


def _open(key: Key, fh: BinaryIO, out: BinaryIO, name: str) -> None:
    from cryptography.exceptions import InvalidTag

    head = fh.read(len(MAGIC) + SALT_BYTES)
    if len(head) < len(MAGIC) + SALT_BYTES or not head.startswith(MAGIC):
        raise SealError(f"{name} is not a file indai sealed (its header is missing or of another format)")
    aead, ad = _aead(key, head[len(MAGIC):]), name.encode()
    counter, block = 0, fh.read(CHUNK + TAG_BYTES)
    while True:
        following = fh.read(CHUNK + TAG_BYTES) if len(block) == CHUNK + TAG_BYTES else b""
        last = not following
        try:
            out.write(aead.decrypt(_nonce(counter, last), block, ad))
        except InvalidTag:
            raise SealError(f"{name} does not open with this key (key id {key.id}): chunk {counter + 1} was changed, "
                            "the file was cut short or extended, or it belongs under another name") from None
        if last:
            return
        counter, block = counter + 1, following


def seal_file(key: Key, src: Path, dst: Path, name: str) -> None:
    """Write `src` sealed into `dst`, bound to `name` (the key it will have in the store)."""
    with open(src, "rb") as fh, open(dst, "wb") as out:
        _seal(key, fh, out, name)


def open_file(key: Key, src: Path, dst: Path, name: str) -> None:
    """Write the plaintext of the sealed file `src` into `dst`; SealError (and no `dst`) when it
    does not open with this key under this name."""
    try:
        with open(src, "rb") as fh, open(dst, "wb") as out:
            _open(key, fh, out, name)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def seal_bytes(key: Key, data: bytes, name: str) -> bytes:
    out = io.BytesIO()
    _seal(key, io.BytesIO(data), out, name)
    return out.getvalue()


def open_bytes(key: Key, data: bytes, name: str) -> bytes:
    out = io.BytesIO()
    _open(key, io.BytesIO(data), out, name)
    return out.getvalue()
