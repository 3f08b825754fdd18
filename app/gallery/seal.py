"""Encryption at rest: the gallery key and AES-256-GCM sealing of embeddings and crops.

With a key (`load_key`: FACEMOE_GALLERY_KEY, FACEMOE_GALLERY_KEY_FILE or a key file),
template vectors and crops (of templates and events) are sealed; identity names, sources
and events stay readable so that the gallery can be listed and searched. The first
write records the cipher and a key check value in the `meta` table; later opens verify
the key against it.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.gallery.db import Database, EventCropRow, TemplateRow
from app.gallery.errors import GalleryError

KEY_ENV = "FACEMOE_GALLERY_KEY"
KEY_FILE_ENV = "FACEMOE_GALLERY_KEY_FILE"
CIPHER = "aes-256-gcm"
VECTOR, CROP, SNAPSHOT = b"vector", b"crop", b"snapshot"  # AES-GCM associated data: what a blob is
_CHECK = b"facemoe-gallery-key-check"


def load_key(key_file: str | Path | None = None) -> bytes | None:
    """The gallery key: from `key_file`, else $FACEMOE_GALLERY_KEY (base64 of 32 bytes),
    else the file named by $FACEMOE_GALLERY_KEY_FILE; None when none is given.

    A key file holds the base64 text (e.g. from `openssl rand -base64 32`) or 32 raw bytes.
    """
    if key_file is None and os.environ.get(KEY_ENV):
        return _parse_key(os.environ[KEY_ENV].encode(), KEY_ENV, raw_ok=False)
    if key_file is None:
        key_file = os.environ.get(KEY_FILE_ENV) or None
        if key_file is None:
            return None
    path = Path(key_file).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GalleryError(f"cannot read the gallery key file {path}: {exc.strerror}") from exc
    return _parse_key(data, f"key file {path}", raw_ok=True)


def _parse_key(data: bytes, source: str, *, raw_ok: bool) -> bytes:
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) == 32:
        return key
    if raw_ok and len(data) == 32:
        return data
    raise GalleryError(f"the gallery key in {source} must be the base64 of 32 random bytes "
                       f"(make one with: openssl rand -base64 32)")


class Sealer:
    """Seals blobs with AES-256-GCM (12-byte random nonce + ciphertext + tag) when it has a
    key; without one, `seal` and `unseal` return the data unchanged. `purpose` (VECTOR or
    CROP) is authenticated with the blob, so one kind cannot be passed off as the other."""

    def __init__(self, key: bytes | None) -> None:
        self._aead = None
        if key is not None:
            try:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            except ImportError as exc:  # pragma: no cover - cryptography is a dependency
                raise GalleryError("gallery encryption needs the 'cryptography' package") from exc
            self._aead = AESGCM(key)

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def seal(self, data: bytes, purpose: bytes) -> bytes:
        if self._aead is None:
            return data
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, purpose)

    def unseal(self, blob: bytes, purpose: bytes) -> bytes:
        if self._aead is None:
            return blob
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(blob[:12], blob[12:], purpose)
        except (InvalidTag, ValueError) as exc:
            raise GalleryError(
                f"an encrypted {purpose.decode()} does not decrypt: the data is corrupt "
                f"or the key is wrong"
            ) from exc

    def verifies(self, check: str) -> bool:
        """Whether this key made the key check value `check` (from `meta` or an export)."""
        if self._aead is None:
            return False
        try:
            return self.unseal(base64.b64decode(check), b"key-check") == _CHECK
        except (GalleryError, binascii.Error, ValueError):
            return False

    # --- a gallery's key ----------------------------------------------------------------------

    def check_opens(self, meta: dict[str, str], has_templates: bool, location: str) -> None:
        """Refuse to open an encrypted gallery without its key, with another key, or a
        gallery with plaintext templates with a key."""
        if meta.get("encryption") is not None:
            if not self.encrypted:
                raise GalleryError(_missing_key(location))
            if not self.verifies(meta.get("key_check", "")):
                raise GalleryError(
                    f"gallery {location}: wrong encryption key (it does not open this gallery)")
        elif self.encrypted and has_templates:
            raise GalleryError(_not_encrypted(location))

    def claim(self, session: Session, location: str) -> None:
        """In a write transaction: record the encryption on the first sealed write; refuse a
        write that another process's key change since opening would make inconsistent."""
        encrypted = Database.get_meta(session, "encryption") is not None
        if not self.encrypted:
            if encrypted:
                raise GalleryError(_missing_key(location))
        elif not encrypted:
            if (session.scalar(select(TemplateRow.id).limit(1)) is not None
                    or session.scalar(select(EventCropRow.id).limit(1)) is not None):
                raise GalleryError(_not_encrypted(location))
            Database.set_meta(session, "encryption", CIPHER)
            Database.set_meta(session, "key_check",
                              base64.b64encode(self.seal(_CHECK, b"key-check")).decode())


def _missing_key(location: str) -> str:
    return (f"gallery {location} is encrypted: give its key in {KEY_ENV} "
            f"(base64 of 32 bytes), {KEY_FILE_ENV} or --key-file")


def _not_encrypted(location: str) -> str:
    return (f"gallery {location} is not encrypted but a key was given: unset the key, "
            f"or export it and import the export into a new gallery with the key set")
