"""platform/encryption.py: sealed files open only whole, in order, under their name and key."""
from __future__ import annotations

import os

import pytest

from indai.platform import encryption as enc


@pytest.fixture(scope="module")
def key():
    return enc.Key.parse(enc.new_key_text())


@pytest.mark.parametrize("size", [0, 1, enc.CHUNK - 1, enc.CHUNK, enc.CHUNK + 1, 3 * enc.CHUNK + 5])
def test_every_size_round_trips_and_costs_a_tag_per_chunk(key, size, tmp_path):
    data = os.urandom(size)
    sealed = enc.seal_bytes(key, data, "blobs/ab/x")
    chunks = max(1, -(-size // enc.CHUNK))
    assert len(sealed) == len(enc.MAGIC) + enc.SALT_BYTES + size + chunks * enc.TAG_BYTES
    assert enc.open_bytes(key, sealed, "blobs/ab/x") == data
    src, mid, out = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    src.write_bytes(data)
    enc.seal_file(key, src, mid, "n")
    enc.open_file(key, mid, out, "n")
    assert out.read_bytes() == data
    assert enc.seal_bytes(key, data, "n") != enc.seal_bytes(key, data, "n"), "each file gets its own salt"


def test_changed_cut_extended_reordered_renamed_or_foreign_files_do_not_open(key, tmp_path):
    data = os.urandom(2 * enc.CHUNK + 100)
    sealed = enc.seal_bytes(key, data, "n")
    head, body = sealed[:len(enc.MAGIC) + enc.SALT_BYTES], sealed[len(enc.MAGIC) + enc.SALT_BYTES:]
    block = enc.CHUNK + enc.TAG_BYTES
    c1, c2, c3 = body[:block], body[block:2 * block], body[2 * block:]
    flipped = bytearray(sealed)
    flipped[-50] ^= 0x80
    cases = {
        "a bit flipped": bytes(flipped),
        "the last chunk dropped": head + c1 + c2,  # cut at a chunk boundary: only the last-chunk flag tells
        "a byte dropped": sealed[:-1],
        "bytes added": sealed + b"\0" * 20,
        "two chunks swapped": head + c2 + c1 + c3,
        "a chunk repeated": head + c1 + c1 + c2 + c3,
    }
    for what, bad in cases.items():
        with pytest.raises(enc.SealError, match=r"^n does not open with this key"):
            enc.open_bytes(key, bad, "n")
            pytest.fail(what)
    with pytest.raises(enc.SealError, match="does not open"):
        enc.open_bytes(key, sealed, "m")  # moved to another name
    with pytest.raises(enc.SealError, match="does not open"):
        enc.open_bytes(enc.Key.parse(enc.new_key_text()), sealed, "n")  # another key
    with pytest.raises(enc.SealError, match="is not a file indai sealed"):
        enc.open_bytes(key, data, "n")
    src, out = tmp_path / "bad", tmp_path / "out"
    src.write_bytes(cases["a bit flipped"])
    with pytest.raises(enc.SealError):
        enc.open_file(key, src, out, "n")
    assert not out.exists(), "no half-opened plaintext is left behind"


def test_keys_parse_strictly_and_never_show_themselves():
    text = enc.new_key_text()
    key = enc.Key.parse(f"  {text}\n")
    assert key == enc.Key.parse(text) and key.id != enc.Key.parse(enc.new_key_text()).id
    assert text[5:] not in repr(key) and key.id in repr(key)
    assert key.name("a" * 64) == key.name("a" * 64) != enc.Key.parse(enc.new_key_text()).name("a" * 64)
    for bad in ("", text[:-1], text + "A", "ibk2-" + text[5:], text.replace("-", "+", 1), "x" * 48):
        with pytest.raises(enc.SealError, match="is not an indai backup key .*indai admin backup-key"):
            enc.Key.parse(bad)


def test_a_store_key_sealed_into_a_slot_opens_only_with_its_key_and_slot():
    key, other = enc.Key.parse(enc.new_key_text()), enc.Key.parse(enc.new_key_text())
    secret = enc.new_secret()
    text = enc.wrap_secret(key, secret, "config.json/keys/a")
    assert enc.unwrap_secret(key, text, "config.json/keys/a") == secret
    assert secret.hex() not in text and enc.wrap_secret(key, secret, "config.json/keys/a") != text  # a new salt each time
    assert enc.Key.from_secret(secret).id == enc.Key.from_secret(secret).id != key.id
    with pytest.raises(enc.SealError, match="does not open with this key"):
        enc.unwrap_secret(other, text, "config.json/keys/a")
    with pytest.raises(enc.SealError, match="does not open with this key"):
        enc.unwrap_secret(key, text, "config.json/keys/b")  # copied into another key's slot
    with pytest.raises(enc.SealError, match="is not base64 text"):
        enc.unwrap_secret(key, text[:-2] + "!!", "config.json/keys/a")
    with pytest.raises(enc.SealError, match="does not hold a 256-bit key"):
        enc.unwrap_secret(key, enc.wrap_secret(key, b"short", "s"), "s")
