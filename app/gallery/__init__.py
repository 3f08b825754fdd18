"""Identity gallery and event store in SQLite (or any SQLAlchemy database).

Modules, each one concern, in the order they build on each other:

- `errors`: `GalleryError` (str() is one line).
- `codec`: identity names (NFC), unit float32 vectors, kept face crops (JPEG).
- `db`: the tables and `Database`: `read(what)` and `write(what, work)` transactions
  (write lock up front, retried while another writer holds it), the meta table, the change
  counter (`version`), `compact`.
- `seal`: `load_key` and `Sealer`: AES-256-GCM sealing of vectors and crops at rest.
- `audit`: `AuditLog.record` (in a change's transaction) and `AuditLog.entries`.
- `store`: `Store`, an opened gallery: `db`, `sealer`, `audit`, the model it belongs to
  and `claim(session)`, which every write of templates or events makes.
- `events`: `EventStore`, the events the daemon and `process` write, and relabelling them.
- `paging`: `Pages`, read-only pages of events and identities for the review UI and the API.
- `clusters`: `ClusterStore`, event embeddings cached per model and face clusters.
- `reembed`: rebuilding templates from stored crops with a new model.
- `transfer`: the checksummed export file, `export` and `import_file`.
- `identities`: enrolled identities and templates (enroll, rename, merge, delete one
  template, remove), and `Gallery`, the handle that opens a gallery and reaches all of the
  above (`pages`, `clusters`, `event_store`, `erasures`).
"""

from app.gallery.audit import AuditEntry, AuditLog
from app.gallery.codec import MAX_NAME_LENGTH
from app.gallery.errors import GalleryError
from app.gallery.events import EventStore, StoredEvent
from app.gallery.identities import (
    CorruptTemplate,
    Enrollment,
    Gallery,
    IdentityInfo,
    TemplateInfo,
)
from app.gallery.reembed import EmbedderLike, ReembedReport
from app.gallery.seal import KEY_ENV, KEY_FILE_ENV, load_key
from app.gallery.store import Store
from app.gallery.transfer import ON_CONFLICT, ExportReport, ImportReport, verify_export

__all__ = [
    "MAX_NAME_LENGTH",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "ON_CONFLICT",
    "AuditEntry",
    "AuditLog",
    "CorruptTemplate",
    "EmbedderLike",
    "Enrollment",
    "EventStore",
    "ExportReport",
    "Gallery",
    "GalleryError",
    "IdentityInfo",
    "ImportReport",
    "ReembedReport",
    "Store",
    "StoredEvent",
    "TemplateInfo",
    "load_key",
    "verify_export",
]
