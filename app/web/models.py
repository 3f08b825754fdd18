"""Request and response bodies of the REST API (pydantic; they make its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from app.enroll import EnrollReport


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests ---------------------------------------------------------------------------------


class NameRequest(_Body):
    name: str = Field(min_length=1, max_length=256, description="an existing or a new identity")


class RenameRequest(_Body):
    name: str = Field(min_length=1, max_length=256, description="the new name")


class MergeIdentityRequest(_Body):
    into: int = Field(description="id of the identity that keeps the templates and events")


class MergeClusterRequest(_Body):
    other: int = Field(description="id of the cluster whose events move into this one")


# --- responses --------------------------------------------------------------------------------


class Nearest(BaseModel):
    name: str
    score: float


class EventOut(BaseModel):
    id: int
    camera: str
    track_id: int
    identity: str | None
    score: float
    start: float
    end: float
    frames: int
    best_bbox: list[float]
    model: str
    crops: int
    stored_at: datetime
    nearest: Nearest | None = Field(
        None, description="unknown events: the closest enrolled identity, even below threshold"
    )
    crop_urls: list[str]
    snapshot_url: str | None = Field(
        None, description="the best-face picture (JPEG), stored with the event so any machine "
                          "shows it; given by GET /api/events/{id} (null in lists)")


class EventPage(BaseModel):
    events: list[EventOut]
    total: int | None
    next_before: int | None = Field(None, description="pass as `before` for the next page")


class ClusterOut(BaseModel):
    id: int
    state: str
    members: int
    created_at: datetime
    updated_at: datetime
    events: list[int] = Field(description="the events with the best crops, best first")
    crop_urls: list[str]


class ClusterPage(BaseModel):
    clusters: list[ClusterOut]
    total: int
    pending: int = Field(description="unknown events not embedded yet (clustered on later loads)")


class Rejected(BaseModel):
    source: str
    similarity: float
    bound: float


class Enrolled(BaseModel):
    name: str
    templates: int
    sources: list[str]
    rejected: list[Rejected]

    @classmethod
    def of(cls, r: EnrollReport) -> Enrolled:
        return cls(name=r.name, templates=len(r.faces), sources=[f.source for f in r.faces],
                   rejected=[Rejected(source=x.source, similarity=x.similarity, bound=x.bound)
                             for x in r.rejected])


class NamedCluster(BaseModel):
    cluster: int
    enrolled: Enrolled
    events_named: int
    events_left: int = Field(0, description="left unknown: rejected, marked not this person, "
                             "or not matching the name")


class TemplateOut(BaseModel):
    id: int
    source: str
    quality: float
    model: str
    created_at: datetime
    crop_url: str | None


class IdentityOut(BaseModel):
    id: int
    name: str
    templates: int
    created_at: datetime


class IdentityPage(BaseModel):
    identities: list[IdentityOut]
    total: int


class IdentityDetail(IdentityOut):
    template_list: list[TemplateOut]


class Removed(BaseModel):
    removed: str
    events_deleted: int
    jsonl_lines_removed: int = 0
    snapshots_deleted: int = 0
    unfinished: bool = False  # some trace could not be erased: delete again to finish
    errors: list[str] = []


class CandidateOut(BaseModel):
    name: str
    score: float


class FaceOut(BaseModel):
    box: list[float] = Field(description="x, y, w, h in pixels")
    detector_score: float
    identity: str | None = Field(description="the nearest name when it reaches the threshold")
    candidates: list[CandidateOut]


class RecognizeOut(BaseModel):
    faces: list[FaceOut]
    threshold: float
    model: str


class VerifyOut(BaseModel):
    same: bool
    score: float
    threshold: float
    box_a: list[float]
    box_b: list[float]


class CameraOut(BaseModel):
    name: str
    state: str
    fps: float
    frames: int
    dropped: int
    reconnects: int
    events: int
    last_frame_age_s: float | None
    last_event: datetime | None
    error: str | None
    box: str | None = Field(None, description="the box (daemon) the camera runs on")
    silent: bool = Field(False, description="its box has not been heard of for 3 heartbeats")
    clash: list[str] = Field([], description="other live boxes with a camera of this name "
                                             "(camera names must be unique on a site)")


class BoxOut(BaseModel):
    box: str
    state: str = Field(description="ok | degraded | stopped (its last heartbeat)")
    silent: bool = Field(description="not stopped, and not heard of for 3 heartbeats")
    last_seen_s: float
    started_at: datetime
    seen_at: datetime
    cameras: list[CameraOut]
    reasons: list[str] = Field(description="why it is degraded, as its /healthz says")


# --- corrections of events --------------------------------------------------------------------


class RelabelRequest(_Body):
    identity: str | None = Field(
        max_length=256, description="an enrolled identity, or null for unknown; the event is "
        "remembered as not its former name"
    )


class NotPersonRequest(_Body):
    identity: str | None = Field(
        None, max_length=256, description="the person it is not (default: its current name)"
    )


class NotPersonOut(BaseModel):
    event: EventOut
    not_identity: str
    templates_deleted: int = Field(description="templates enrolled from this event, deleted")


class ReprocessOut(BaseModel):
    checked: int = Field(description="events matched again (those with kept crops)")
    changed: int = Field(description="events whose name changed")
    without_crops: int
    next_before: int | None = Field(None, description="pass as `before` to continue")
