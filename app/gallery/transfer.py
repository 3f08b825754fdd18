"""The export file: identities, templates and crops of one model in one checksummed zip.

`export` writes manifest.json (model, identities, a sha256 per entry) and one entry per
vector and crop; the zip comment ends with the sha256 of the whole file. Stored blobs are
copied as they are, so an encrypted gallery gives an encrypted export. `import_file`
verifies both checksums and the model, then writes everything in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import unicodedata
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.fsutil import atomic_path
from app.gallery.codec import (
    binding_checksum,
    clean_name,
    decode_crop,
    unit_bytes,
    vector_checksum,
)
from app.gallery.db import (
    IN_CHUNK,
    IdentityRow,
    MetaRow,
    TemplateRow,
    add_identities,
    as_utc,
    identity_ids,
    template_dim,
    utcnow,
)
from app.gallery.errors import GalleryError, names_preview, one_line, plural
from app.gallery.reembed import EmbedderLike, embed_crops
from app.gallery.seal import CIPHER, CROP, KEY_ENV, KEY_FILE_ENV, VECTOR, Sealer
from app.gallery.store import Store

log = logging.getLogger(__name__)

EXPORT_FORMAT = "facemoe-gallery-export"
EXPORT_VERSION = 1
ON_CONFLICT = ("fail", "skip", "merge")
_TRAILER = b"facemoe-sha256:"  # zip comment: this prefix + hex sha256 of all bytes before the hex


@dataclass(frozen=True)
class ExportReport:
    path: str
    identities: int
    templates: int
    crops: int
    bytes: int
    sha256: str  # of the whole file (also in its zip comment)
    encrypted: bool

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ImportReport:
    path: str
    model: str  # the export's model
    identities_added: int
    identities_merged: int
    identities_skipped: int
    templates_added: int
    templates_duplicate: int  # merge: identical templates already present
    templates_reembedded: int
    templates_dropped: list[str] = field(default_factory=list)  # "name: source" without a crop
    crops_dropped: int = 0  # the gallery does not store crops

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Incoming:
    """One template read from an export, decrypted."""

    vector: bytes | None  # plaintext float32 bytes; None until re-embedded
    jpeg: bytes | None
    source: str
    quality: float
    created_at: datetime


def _file_sha256(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        left = length
        while left > 0:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def verify_export(path: str | Path) -> str:
    """Check an export's whole-file checksum (its zip comment); returns the sha256."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GalleryError(f"no such export file: {path}")
    size = path.stat().st_size
    tail = len(_TRAILER) + 64
    with path.open("rb") as fh:
        if size >= tail:
            fh.seek(size - tail)
        trailer = fh.read(tail)
    if size < tail or not trailer.startswith(_TRAILER):
        raise GalleryError(f"{path} is not a FaceMoE gallery export (no checksum) or is truncated")
    expected = trailer[len(_TRAILER):].decode("ascii", "replace")
    actual = _file_sha256(path, size - 64)
    if actual != expected:
        raise GalleryError(f"export {path} is corrupt or was modified: sha256 checksum mismatch")
    return actual


# --- export ----------------------------------------------------------------------------------


def export(store: Store, path: str | Path) -> ExportReport:
    """Write every identity with its templates and crops (of the gallery's model) to one zip
    file (mode 0600), written to a temporary name and renamed when complete (`atomic_path`)."""
    dest = Path(path).expanduser()
    if dest.is_dir():
        raise GalleryError(f"cannot export to {dest}: it is a directory")
    try:
        # the checksum is of the file as written: it is read back before it replaces `dest`
        with atomic_path(dest) as tmp, open(tmp, "w+b") as fh:
            counts = _write_export(store, fh)
            size = fh.seek(0, os.SEEK_END)
            fh.flush()
            digest = _file_sha256(tmp, size - 64)
            fh.seek(size - 64)
            fh.write(digest.encode("ascii"))
    except OSError as exc:
        raise GalleryError(f"cannot write export {dest}: {exc.strerror or exc}") from exc
    report = ExportReport(str(dest), counts[0], counts[1], counts[2], size, digest,
                          store.sealer.encrypted)
    store.db.write("audit export", lambda s: store.audit.record(
        s, "export", None,
        f"{dest}: {plural(report.identities, 'identity')}, "
        f"{plural(report.templates, 'template')}, sha256 {digest[:16]}"))
    log.info("exported %s to %s", store.location, dest)
    return report


def _write_export(store: Store, fh: Any) -> tuple[int, int, int]:
    entries: dict[str, str] = {}
    people: dict[int, dict[str, Any]] = {}
    n_templates = n_crops = 0
    dim = None

    def put(zf: zipfile.ZipFile, name: str, data: bytes) -> str:
        zf.writestr(name, data)
        entries[name] = hashlib.sha256(data).hexdigest()
        return name

    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf, \
            store.db.read("read for export") as session:
        for iid, name, created in session.execute(
                select(IdentityRow.id, IdentityRow.name, IdentityRow.created_at)
                .order_by(IdentityRow.name)):
            people[iid] = {"name": name, "created_at": as_utc(created).isoformat(),
                           "templates": []}
        rows = session.execute(
            select(TemplateRow.identity_id, TemplateRow.vector, TemplateRow.dim,
                   TemplateRow.source, TemplateRow.quality, TemplateRow.crop,
                   TemplateRow.created_at)
            .where(TemplateRow.model_name == store.model_name)
            .where(TemplateRow.model_version == store.model_version)
            .order_by(TemplateRow.id)
            .execution_options(yield_per=500)
        )
        for iid, vector, tdim, source, quality, crop, created in rows:
            dim = tdim
            stem = f"templates/{n_templates:07d}"
            people[iid]["templates"].append({
                "vector": put(zf, stem + ".f32", vector),
                "crop": put(zf, stem + ".jpg", crop) if crop is not None else None,
                "source": source, "quality": quality,
                "created_at": as_utc(created).isoformat(),
            })
            n_templates += 1
            n_crops += crop is not None
        meta = dict(session.execute(select(MetaRow.key, MetaRow.value)).all())
        manifest = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "created_at": utcnow().isoformat(),
            "model": {"name": store.model_name, "version": store.model_version},
            "dim": dim,
            "encryption": ({"algorithm": CIPHER, "key_check": meta["key_check"]}
                           if store.sealer.encrypted and "key_check" in meta else None),
            "counts": {"identities": len(people), "templates": n_templates, "crops": n_crops},
            "identities": list(people.values()),
            "entries": entries,
        }
        zf.writestr("manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1),
                    compress_type=zipfile.ZIP_DEFLATED)
        zf.comment = _TRAILER + b"0" * 64
    return len(people), n_templates, n_crops


# --- import ----------------------------------------------------------------------------------


def import_file(
    store: Store,
    path: str | Path,
    *,
    on_conflict: str = "fail",
    embedder: EmbedderLike | None = None,
    drop_missing: bool = False,
) -> ImportReport:
    """Add the identities of an export (see `export`) in one transaction.

    Checksums (whole file and every entry) and the model are verified first. An export
    of another model is refused unless an `embedder` of the gallery's model is given:
    its crops are then re-embedded (templates without a crop are refused unless
    `drop_missing`). Names already in the gallery: `on_conflict` "fail" refuses the
    import, "skip" keeps the gallery's identity, "merge" adds the new templates to it
    (identical templates are not added twice).
    """
    if on_conflict not in ON_CONFLICT:
        raise GalleryError(f"on_conflict must be one of {', '.join(ON_CONFLICT)}")
    src = Path(path).expanduser()
    digest = verify_export(src)
    manifest, people = _read_export(store.sealer, src)
    m = manifest["model"]
    export_model = f"{m['name']}@{m['version']}"
    reembed = (m["name"], m["version"]) != (store.model_name, store.model_version)
    dropped: list[str] = []
    if reembed:
        if embedder is None:
            raise GalleryError(
                f"export {src} holds templates of model {export_model}; this gallery uses "
                f"{store.model}: import with --reembed to re-embed its crops")
        if f"{embedder.model_name}@{embedder.model_version}" != store.model:
            raise GalleryError(f"the embedder's model {embedder.model_name}@"
                               f"{embedder.model_version} is not this gallery's {store.model}")
        dropped = [f"{n}: {t.source}" for n, _, ts in people for t in ts if t.jpeg is None]
        if dropped and not drop_missing:
            raise GalleryError(
                f"no crop to re-embed for {plural(len(dropped), 'template')} in {src} "
                f"({names_preview(d.split(': ', 1)[0] for d in dropped)}): "
                f"import with --drop-missing to leave them out")
        people = [(n, c, kept) for n, c, ts in people  # leave out who has nothing left
                  if (kept := [t for t in ts if t.jpeg is not None]) or not ts]
        todo = [t for _, _, ts in people for t in ts]
        vecs = embed_crops(embedder, [(t.jpeg, t.source) for t in todo])
        for t, v in zip(todo, vecs, strict=True):
            t.vector = v.tobytes()
    dims = {len(t.vector) // 4 for _, _, ts in people for t in ts}
    if len(dims) > 1:
        raise GalleryError(f"export {src} holds vectors of different sizes")
    keep_crops, seal = store.store_crops, store.sealer.seal

    def work(session: Session) -> ImportReport:
        store.claim(session)
        stored_dim = template_dim(session, store.model_name, store.model_version)
        if dims and stored_dim is not None and stored_dim not in dims:
            raise GalleryError(f"export {src} has {next(iter(dims))}-d templates; this gallery "
                               f"has {stored_dim}-d templates")
        existing = identity_ids(session, [n for n, _, _ in people])
        if existing and on_conflict == "fail":
            raise GalleryError(
                f"{plural(len(existing), 'identity')} of {src} already in the gallery "
                f"({names_preview(existing)}): import with --on-conflict skip or merge")
        incoming = [p for p in people if not (on_conflict == "skip" and p[0] in existing)]
        ids = add_identities(session, {n: c for n, c, _ in incoming})
        seen = _existing_vectors(store, session,
                                 [ids[n] for n, _, _ in incoming if n in existing])
        rows, duplicates, crops_dropped = [], 0, 0
        for name, _, templates in incoming:
            for t in templates:
                if t.vector in seen.get(ids[name], ()):
                    duplicates += 1
                    continue
                seen.setdefault(ids[name], set()).add(t.vector)
                crops_dropped += t.jpeg is not None and not keep_crops
                blob = seal(t.vector, VECTOR)
                crop = seal(t.jpeg, CROP) if t.jpeg and keep_crops else None
                checksum = vector_checksum(blob)
                rows.append({
                    "identity_id": ids[name], "vector": blob, "checksum": checksum,
                    "binding": binding_checksum(ids[name], checksum),
                    "dim": len(t.vector) // 4, "model_name": store.model_name,
                    "model_version": store.model_version, "source": t.source,
                    "quality": t.quality, "created_at": t.created_at, "crop": crop,
                    "crop_checksum": vector_checksum(crop) if crop is not None else None,
                })
        if rows:
            session.execute(insert(TemplateRow), rows)
        added = sum(n not in existing for n, _, _ in incoming)
        report = ImportReport(
            str(src), export_model, added, sum(n in existing for n, _, _ in incoming),
            len(people) - len(incoming), len(rows), duplicates,
            len(rows) if reembed else 0, dropped, crops_dropped)
        store.audit.record_many(session, [
            ("import", name, f"{'merged' if name in existing else 'added'} from {src}")
            for name, _, _ in incoming])
        store.audit.record(session, "import", None,
                           f"{src} (model {export_model}, sha256 {digest[:16]}): "
                           f"{added} added, {report.identities_merged} merged, "
                           f"{report.identities_skipped} skipped, "
                           f"{plural(len(rows), 'template')}")
        store.db.bump_version(session)
        return report

    report = store.db.write(f"import {src}", work)
    log.info("imported %s into %s: %d identities added, %d merged, %d skipped, "
             "%d templates", src, store.location, report.identities_added,
             report.identities_merged, report.identities_skipped, report.templates_added)
    return report


def _existing_vectors(store: Store, session: Session,
                      ids: list[int]) -> dict[int, set[bytes]]:
    """The plaintext template vectors (of the gallery's model) of identities, by id."""
    out: dict[int, set[bytes]] = {}
    for i in range(0, len(ids), IN_CHUNK):
        for iid, blob in session.execute(
                select(TemplateRow.identity_id, TemplateRow.vector)
                .where(TemplateRow.identity_id.in_(ids[i:i + IN_CHUNK]))
                .where(TemplateRow.model_name == store.model_name)
                .where(TemplateRow.model_version == store.model_version)):
            out.setdefault(iid, set()).add(store.sealer.unseal(blob, VECTOR))
    return out


# What an import reads at most: sizes come from the zip directory and are checked before
# anything is decompressed, then reads are bounded by them (a small file can hold a member
# that inflates to gigabytes). The limits are relative to the archive: our exports store
# vectors and crops uncompressed (a re-zipped one compresses them little), and the manifest
# describes the other members (a few hundred bytes each; at most MANIFEST_BYTES_PER_MEMBER).
MAX_MANIFEST_BYTES = 256 << 20
MANIFEST_BASE_BYTES = 64 << 10
MANIFEST_BYTES_PER_MEMBER = 8 << 10  # a 1024-character source and a 256-character name
MAX_MANIFEST_RATIO = 100  # a JSON manifest deflates ~10x; `{},{},...` ~1000x
MAX_MEMBER_RATIO = 4  # vectors (float32) and JPEG crops hardly compress
MAX_VECTOR_BYTES = 4 * 8192 + 64  # float32[<= 8192], plus the AES-GCM nonce and tag
MAX_CROP_BYTES = 1 << 20  # a kept crop is a JPEG of at most 192 x 192 pixels (tens of KB)
MAX_TOTAL_BYTES = 8 << 30
MAX_MANIFEST_DEPTH = 16  # the manifest's JSON nests 5 deep
MAX_SOURCE_LENGTH = 1024  # templates.source
_DATES = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC))


def _member_limit(name: str, members: int = 0) -> int:
    if name == "manifest.json":
        return min(MAX_MANIFEST_BYTES, MANIFEST_BASE_BYTES + MANIFEST_BYTES_PER_MEMBER * members)
    return MAX_VECTOR_BYTES if name.endswith(".f32") else MAX_CROP_BYTES


def _check_sizes(zf: zipfile.ZipFile, bad: str) -> int:
    """Refuse members larger than their kind allows or that inflate more than their kind
    does, from the zip directory alone; returns the number of members besides the manifest."""
    infos = zf.infolist()
    members = sum(i.filename != "manifest.json" for i in infos)
    total = 0
    for info in infos:
        limit = _member_limit(info.filename, members)
        if info.file_size > limit:
            raise GalleryError(f"{bad}: member {info.filename} would unpack to "
                               f"{info.file_size} bytes (at most {limit} in an archive of "
                               f"{members} entries)")
        ratio = MAX_MANIFEST_RATIO if info.filename == "manifest.json" else MAX_MEMBER_RATIO
        if info.file_size > 4096 + ratio * info.compress_size:
            raise GalleryError(f"{bad}: member {info.filename} would inflate "
                               f"{info.file_size / max(1, info.compress_size):.0f} times "
                               f"(at most {ratio})")
        total += info.file_size
    if total > MAX_TOTAL_BYTES:
        raise GalleryError(f"{bad}: it would unpack to {total} bytes (at most {MAX_TOTAL_BYTES})")
    return members


def _parse_manifest(data: bytes, bad: str) -> dict:
    """The manifest's JSON: a JSON object nested at most MAX_MANIFEST_DEPTH deep."""
    depth = deepest = 0
    for match in _JSON_NESTING.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_MANIFEST_DEPTH:
                raise GalleryError(f"{bad}: its manifest nests deeper than "
                                   f"{MAX_MANIFEST_DEPTH} levels")
        elif token in (b"]", b"}"):
            depth -= 1
    manifest = json.loads(data)
    if not isinstance(manifest, dict):
        raise GalleryError(f"{bad}: its manifest is not a JSON object")
    return manifest


_JSON_NESTING = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _read_member(zf: zipfile.ZipFile, name: str, bad: str, members: int = 0) -> bytes:
    """A member's bytes, read in chunks and never beyond its kind's limit."""
    limit = _member_limit(name, members)
    chunks, size = [], 0
    with zf.open(name) as fh:
        while chunk := fh.read(min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise GalleryError(f"{bad}: member {name} is larger than {limit} bytes")
    return b"".join(chunks)


def _date(text: object, what: str) -> datetime:
    if not isinstance(text, str) or len(text) > 40:
        raise ValueError(f"{what}: not a date")
    value = as_utc(datetime.fromisoformat(text))
    if not _DATES[0] <= value <= _DATES[1]:
        raise ValueError(f"{what}: date {text} is out of range")
    return value


def _quality(value: object, what: str) -> float:
    q = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(q) and 0.0 <= q <= 1.0):
        raise ValueError(f"{what}: quality {value!r} is not in [0, 1]")
    return q


def _source(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_SOURCE_LENGTH:
        raise ValueError(f"{what}: source must be a string of at most {MAX_SOURCE_LENGTH} "
                         "characters")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError(f"{what}: source contains control characters")
    return value


def _read_export(sealer: Sealer, src: Path
                 ) -> tuple[dict, list[tuple[str, datetime, list[_Incoming]]]]:
    """Manifest and (name, created_at, templates) per identity, checked and decrypted."""
    bad = f"export {src} is not a valid FaceMoE gallery export"
    try:
        with zipfile.ZipFile(src) as zf:
            members = _check_sizes(zf, bad)
            manifest = _parse_manifest(_read_member(zf, "manifest.json", bad, members), bad)
            if manifest.get("format") != EXPORT_FORMAT:
                raise GalleryError(f"{bad}: unknown format {manifest.get('format')!r}")
            if manifest.get("format_version") != EXPORT_VERSION:
                raise GalleryError(f"{bad}: format version {manifest.get('format_version')} "
                                   f"(this version reads {EXPORT_VERSION})")
            encrypted = _check_export_key(sealer, src, manifest.get("encryption"))
            entries = manifest["entries"]

            def entry(name: str, purpose: bytes) -> bytes:
                data = _read_member(zf, name, bad)
                if hashlib.sha256(data).hexdigest() != entries[name]:
                    raise GalleryError(f"export {src}: entry {name} fails its sha256 checksum "
                                       f"(the file was modified)")
                return sealer.unseal(data, purpose) if encrypted else data

            dim = manifest.get("dim")
            people = []
            for person in manifest["identities"]:
                name = clean_name(person["name"])
                templates = []
                for t in person["templates"]:
                    what = f"{name!r} template {t['vector']}"
                    vector = entry(t["vector"], VECTOR)
                    if dim is None or len(vector) != 4 * int(dim):
                        raise GalleryError(f"{bad}: {t['vector']} is not a {dim}-d vector")
                    jpeg = entry(t["crop"], CROP) if t.get("crop") else None
                    if jpeg is not None:
                        decode_crop(jpeg, f"{bad}: {t['crop']}")  # a JPEG of a kept size
                    templates.append(_Incoming(
                        unit_bytes(vector), jpeg, _source(t["source"], what),
                        _quality(t["quality"], what), _date(t["created_at"], what)))
                people.append((name, _date(person["created_at"], repr(name)), templates))
    except (KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile,
            json.JSONDecodeError) as exc:
        raise GalleryError(f"{bad}: {one_line(exc)}") from exc
    except OSError as exc:
        raise GalleryError(f"cannot read export {src}: {exc.strerror or exc}") from exc
    merged: dict[str, tuple[datetime, list[_Incoming]]] = {}
    for name, created, templates in people:  # names equal after normalisation
        if name in merged:
            merged[name][1].extend(templates)
        else:
            merged[name] = (created, templates)
    return manifest, [(n, c, ts) for n, (c, ts) in merged.items()]


def _check_export_key(sealer: Sealer, src: Path, encryption: dict | None) -> bool:
    """Whether the export is encrypted; refuses one this gallery's key does not open."""
    if encryption is None:
        return False
    if not sealer.encrypted:
        raise GalleryError(f"export {src} is encrypted: give its key in {KEY_ENV}, "
                           f"{KEY_FILE_ENV} or --key-file")
    if not sealer.verifies(encryption.get("key_check", "")):
        raise GalleryError(f"export {src} was encrypted with another key")
    return True
