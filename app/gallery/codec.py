"""How values are stored: identity names (NFC), unit float32 vectors, kept face crops (JPEG)."""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np

from app.gallery.errors import GalleryError

MAX_NAME_LENGTH = 256
CROP_SIZE = 112  # ArcFace crops kept by releases up to 0.2
KEPT_SIZE = 192  # app.align.STORE, the kept geometry since 0.3
_JPEG_QUALITY = 90


def normalise_name(name: str) -> str:
    """The canonical form of an identity name: NFC, surrounding white space removed."""
    return unicodedata.normalize("NFC", str(name)).strip()


def _joiner_in_script(name: str, i: int) -> bool:
    """A zero-width (non-)joiner that shapes the non-ASCII characters on both sides (emoji
    sequences such as U+1F469 U+200D U+1F680, Persian ZWNJ) is part of the spelling."""
    return (name[i] in "\u200c\u200d" and 0 < i < len(name) - 1
            and not name[i - 1].isascii() and not name[i + 1].isascii())


def clean_name(name: str) -> str:
    """`normalise_name`, refusing empty, too long and control-character names."""
    clean = normalise_name(name)
    if not clean:
        raise GalleryError("identity name must not be empty")
    if len(clean) > MAX_NAME_LENGTH:
        raise GalleryError(
            f"identity name is too long ({len(clean)} characters; at most {MAX_NAME_LENGTH})"
        )
    if any(unicodedata.category(c) == "Cc" for c in clean):
        raise GalleryError(f"identity name {clean!r} contains control characters")
    # zero-width, bidi override/isolate and other format characters (Cf) make two names
    # look alike or reorder a line of output
    hidden = sorted({f"U+{ord(c):04X}" for i, c in enumerate(clean)
                     if unicodedata.category(c) == "Cf" and not _joiner_in_script(clean, i)})
    shown = clean.encode('ascii', 'backslashreplace').decode()
    if hidden:
        raise GalleryError(f"identity name {shown!r} "
                           f"contains invisible format characters ({', '.join(hidden)})")
    blank = sorted({f"U+{ord(c):04X}" for c in clean if ord(c) in _BLANK_LETTERS})
    if blank:
        raise GalleryError(f"identity name {shown!r} contains invisible filler characters "
                           f"({', '.join(blank)})")
    plain = unicodedata.normalize("NFKC", clean)
    if plain != clean:
        raise GalleryError(f"identity name {shown!r} uses compatibility characters (fullwidth, "
                           f"ligature, special spaces ...): write it as {plain!r}")
    return clean


# letters that render as nothing (Hangul fillers, Braille blank, Mongolian vowel separator)
_BLANK_LETTERS = frozenset({0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x180E, 0x17B4, 0x17B5})


def lookalike_key(name: str) -> str:
    """What two names that a person would read as the same share: compatibility forms
    folded, case folded, runs of white space as one space."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def vector_checksum(stored: bytes) -> str:
    """The `templates.checksum` of a vector blob as stored (sealed when encrypted)."""
    return hashlib.sha256(stored).hexdigest()


def binding_checksum(identity_id: int, checksum: str) -> str:
    """The `templates.binding` of a template: its vector checksum tied to its identity, so a
    template moved to another person outside FaceMoE is found by `gallery check` (and left
    out at load instead of naming the wrong person)."""
    return hashlib.sha256(f"{int(identity_id)}:{checksum}".encode()).hexdigest()


UNIT_TOLERANCE = 1e-3  # |norm - 1| of a stored vector beyond this means it was altered


def vector_problem(vector: bytes, dim: int) -> str | None:
    """Why an unsealed stored vector is unusable (size, non-finite, not unit length), or None."""
    if dim <= 0 or len(vector) != 4 * dim:
        return f"{len(vector)} bytes for a {dim}-d vector"
    vec = np.frombuffer(vector, "<f4")
    if not np.all(np.isfinite(vec)):
        return "non-finite values"
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        return f"not unit length (norm {norm:.6g})"
    return None


def unit_vectors(vecs: np.ndarray, what: str) -> np.ndarray:
    """L2-normalised little-endian float32 rows, or a GalleryError."""
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    if not np.all(np.isfinite(vecs)) or np.any(norms == 0):
        raise GalleryError(f"{what} vectors must be finite and non-zero")
    return (vecs / norms).astype("<f4")


def unit_bytes(vector: bytes) -> bytes:
    """An imported vector as stored: unchanged when already unit length (so that merging an
    export twice finds its templates identical), else normalised."""
    vec = np.frombuffer(vector, "<f4")
    norm = float(np.linalg.norm(vec))
    if not np.all(np.isfinite(vec)) or norm == 0:
        raise GalleryError("imported vectors must be finite and non-zero")
    return vector if abs(norm - 1.0) < 1e-5 else (vec / norm).astype("<f4").tobytes()


def encode_crop(crop: np.ndarray) -> bytes:
    """JPEG bytes of a uint8 HxWx3 BGR crop."""
    arr = np.asarray(crop)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise GalleryError(f"crop must be uint8[H, W, 3], got {arr.dtype}{list(arr.shape)}")
    import cv2  # here: commands that do not touch crops start without OpenCV

    ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise GalleryError("could not JPEG-encode a crop")
    return buf.tobytes()


def decode_crop(jpeg: bytes, what: str) -> np.ndarray:
    """uint8[S, S, 3] BGR from stored JPEG bytes: 192 (app.align.STORE) or 112 (ArcFace crops
    kept by releases up to 0.2)."""
    import cv2

    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise GalleryError(f"{what}: the stored crop is not a readable JPEG")
    if img.shape[:2] not in ((CROP_SIZE, CROP_SIZE), (KEPT_SIZE, KEPT_SIZE)):
        raise GalleryError(f"{what}: the stored crop is {img.shape[1]}x{img.shape[0]}, "
                           f"not {KEPT_SIZE}x{KEPT_SIZE} or {CROP_SIZE}x{CROP_SIZE}")
    return img
