"""The app's one config object (pydantic, unknown keys refused), the only YAML reader of the app.

Relative paths in the file are resolved by app.paths (the FaceMoE home, then the shipped files;
in a source checkout both are the checkout), so the shipped configs/app.yaml works from any
working directory and from a wheel.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from app import paths
from app.detect import KINDS
from engine.registry import BACKENDS
from trainer.config import ConfigError  # re-exported

if TYPE_CHECKING:
    from app.records import Quality

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, protected_namespaces=(), use_attribute_docstrings=True
    )


_ENV_REF = re.compile(r"\{(FACEMOE_[A-Z0-9_]+)\}")


def substitute_env(value: object) -> object:
    """`{FACEMOE_NAME}` in a string -> the environment variable's value (secrets stay out of
    the YAML file, as Frigate's `{FRIGATE_*}`); an unset variable is an error."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            raise ValueError(f"environment variable {m.group(1)} is not set")
        return os.environ[m.group(1)]

    return _ENV_REF.sub(sub, value)


EnvStr = Annotated[str, BeforeValidator(substitute_env)]
EnvSecret = Annotated[SecretStr, BeforeValidator(substitute_env)]  # never printed or logged
# a polygon in frame pixels: at least 3 [x, y] points
Polygon = Annotated[list[tuple[float, float]], Field(min_length=3)]
ZoneName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class ModelConfig(_Strict):
    dir: str = "models/sface"
    backend: Literal[BACKENDS] = "auto"  # the engine's registry (engine.backends)
    threads: int = Field(0, ge=0, description="inference threads; 0 = all cores")
    batch_size: int = Field(32, ge=1, le=256, description="crops per embedding call")


class DetectorConfig(_Strict):
    """The face detector (`app.detect`): its kind, and the one source of its defaults (a
    detector made without a config takes these)."""

    kind: Literal[tuple(KINDS)] = "yunet"  # a kind registered in app.detect.KINDS
    model: str | None = None  # default: models/detector (install.sh), then ../shared/models
    score_threshold: float = Field(0.6, gt=0, lt=1)
    nms_threshold: float = Field(0.3, gt=0, lt=1)
    upscale: float = Field(
        1.0, ge=1.0, le=4.0, description="enlarge frames before detection to find tiny faces"
    )
    small_face: float = Field(32.0, ge=0)
    """Faces narrower than this (px) get a second, enlarged look (a 160x160 detector input
    around the face, ~16% of the time of a 640x360 frame) where a track expects one that
    the frame's pass missed, or where the pass found a weak one. Higher: more small faces
    found and kept; more second looks to pay for. 0 = off (only `upscale` finds tiny faces)."""
    weak_score: float = Field(0.3, ge=0, le=1)
    """Full-frame detections of small faces scoring at least this (below `score_threshold`)
    get a second look, which keeps the face only if it scores at least `score_threshold`;
    a look where a track expects a face keeps it from this score on, for the tracker's
    low-score stage (so keep it >= tracker.low_thresh). Lower: faces that the frame's pass
    sees only faintly are found sooner and tracks survive blur; more looks spent on
    background. 1 = looks only where tracks expect a face, keeping strong faces only."""
    max_looks: int = Field(4, ge=1)
    """Most second looks per detection call: bounds the cost in a crowd of small faces."""
    min_face: float = Field(8.0, ge=0, description="ignore boxes narrower than this (px)")
    every_n_frames: int = Field(
        1, ge=1, description="detection rate: run the detector on every n-th frame"
    )
    max_fps: float = Field(
        15.0, ge=0, description="most detections per second of media time; 0 = every frame"
    )


class TrackerConfig(_Strict):
    """The tracker's thresholds (the object `app.track.Tracker` takes); each docstring says
    what raising the value trades."""

    high_thresh: float = Field(0.6, ge=0, le=1)
    """Detections scoring at least this are matched first and may start tracks. Higher:
    fewer tracks started by false detections; faces seen only weakly start later or never."""

    low_thresh: float = Field(0.3, ge=0, le=1)
    """Detections in [low_thresh, high_thresh) only extend open tracks, never start one (they
    come from the detector's second look at small faces, or from a detector run with
    score_threshold <= low_thresh). Lower: tracks survive blur and partial occlusion longer;
    more risk of following a background false positive."""

    match_iou: float = Field(0.3, ge=0, le=1)
    """Minimum IoU between a track's predicted box and a high-score detection (as enlarged
    for `min_match_size`). Higher: fewer identity swaps between nearby faces; fast motion or
    low detection rates fragment tracks."""

    low_match_iou: float = Field(0.5, ge=0, le=1)
    """Minimum IoU for low-score detections (stage two); stricter than `match_iou` because
    those detections are less reliable."""

    max_center_shift: float = Field(1.0, gt=0)
    """Largest distance between the predicted and detected box centres, in units of the
    track's box size (max of width, height; at least `min_match_size`). Lower: a track never
    continues on another face after a cut; higher: tolerates faster motion between frames."""

    min_match_size: float = Field(40.0, ge=0)
    """A track narrower than this (px) is matched as if its predicted box and the detections
    were enlarged about their centres to this width (one factor for both, aspect kept). A
    16-24 px face moving 5-8 px per frame moves about its own width between two detections
    at 15 detections per second, which plain IoU cannot follow. Higher: small fast faces
    keep their track at low detection rates; two small faces closer than this are easier
    to swap. 0 = plain IoU."""

    max_missed: int = Field(15, ge=1)
    """Frames a track may go unmatched before it ends. Higher: bridges longer occlusions and
    detector misses (fewer split tracks) but finished-track events arrive later and another
    person appearing at the same place may inherit the id."""

    min_hits: int = Field(2, ge=1)
    """Detections before a track is confirmed and gets an id; an unconfirmed track that
    misses a detection is dropped. Higher: suppresses one-frame false detections (blips); a
    face's first `min_hits - 1` detections are not reported."""

    shot_cut_threshold: float = Field(0.15, ge=0, le=2)
    """End every track at a shot cut scoring above this (`app.shotcut`; 1 - histogram
    correlation of consecutive frames); 0 = off. Lower: no identity is carried across a cut;
    a fast pan or a flash may split a track."""

    @model_validator(mode="after")
    def _ordered(self) -> TrackerConfig:
        if self.low_thresh > self.high_thresh:
            raise ValueError(
                f"low_thresh ({self.low_thresh}) must not exceed high_thresh ({self.high_thresh})"
            )
        return self


class EmbedPolicy(_Strict):
    """Selective embedding: spend embedder time on the crops that improve a track's template.

    A crop is embedded when the track has fewer than `first_n` embedded crops, when its
    quality beats the best embedded quality of the track by at least `min_gain`, or when
    `every_n` observed frames of the track have passed since the last embedded crop; never
    beyond `max_per_track` crops (`app.aggregate.TrackAggregator` takes this object).
    """

    first_n: int = Field(3, ge=0, le=1000)
    """Always embed a track's first crops. Higher: a decision is possible early and the first
    template is steadier; more embedder work on tracks that turn out short."""

    every_n: int = Field(10, ge=1)
    """Refresh periodically, as appearance drifts (pose, light) over a track. Lower: steadier
    templates at more embedder cost."""

    min_gain: float = Field(0.1, ge=0, le=1)
    """Quality margin that makes a crop worth embedding out of turn. Lower: chases quality
    more eagerly at more embedder cost."""

    max_per_track: int = Field(32, ge=1, le=10000)
    """Hard cap on embedder work per track. Lower: bounds the cost of a person who stands
    still for minutes; long tracks stop improving their template sooner."""

    max_wait_s: float = Field(0.25, ge=0, le=10)
    """Longest (media seconds) a crop waits for a full embedder batch. Lower: a face is
    recognised sooner, at the cost of smaller, less efficient batches."""

    min_det_score: float = Field(0.75, ge=0, le=1)
    """The face-quality gate, with `min_exposure`: a crop the detector scored below this is
    not taken for a face that carries identity (on the shared videos: fists and hands scored
    0.61-0.73, faces 0.75-0.95); it is never embedded, kept with the event, enrolled or
    grouped. Higher: fewer non-faces, and fewer dim or small real faces."""

    min_exposure: float = Field(0.25, ge=0, le=1)
    """A crop whose face region is this dark or flat (`app.quality.exposure`, 0-1) carries no
    identity (a face in a dark audience, a black blob). Higher: only well-lit faces."""

    def carries_identity(self, quality: Quality | None) -> bool:
        """The face-quality gate: a crop may be embedded, kept, enrolled and grouped (an
        unscored crop has nothing against it)."""
        return quality is None or (quality.det_score >= self.min_det_score
                                   and quality.exposure >= self.min_exposure)

    def should_embed(
        self, embedded: int, best_quality: float, since_last: int, quality: float
    ) -> bool:
        """Whether to embed a crop of `quality`, given the track's `embedded` crop count,
        their best quality and the observed frames `since_last` embedded crop."""
        if embedded >= self.max_per_track:
            return False
        if embedded < self.first_n:
            return True
        return quality >= best_quality + self.min_gain or since_last >= self.every_n


# Cosine thresholds outside this band are legal but almost certainly a mistake: below it
# nearly everyone is named, above it nearly no one.
SANE_THRESHOLD = (0.0, 0.9)


def _threshold_sanity(value: float | str | None, where: str) -> None:
    if isinstance(value, float) and not SANE_THRESHOLD[0] <= value <= SANE_THRESHOLD[1]:
        log.warning("%s %.3f is outside the usual range [%g, %g]: %s", where, value,
                    *SANE_THRESHOLD,
                    "almost everyone will be named" if value < SANE_THRESHOLD[0]
                    else "almost no one will be named")


class MatchConfig(_Strict):
    threshold: float | Literal["auto"] = Field(
        "auto", description="cosine similarity a match needs, in (-1, 1); auto: the model "
        "manifest's open-set calibration at false_alarm_rate (or its recommended threshold "
        "when it has no calibration); lower names more people (and more wrongly)")
    false_alarm_rate: float = Field(
        0.001, gt=0, lt=0.5, description="with threshold auto and a calibrated model: the "
        "most strangers' tracks that may be named (a bound: on LFW 1:N, 0-0.03% of strangers "
        "were named at 0.001, 0.07-0.33% at 0.01); the threshold follows from it for the "
        "gallery's number of people and each face's resolution (app/openset.py)")
    min_frames: int = Field(2, ge=1, description="tracks seen in fewer frames make no event")

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not (-1.0 < v < 1.0 and math.isfinite(v)):
            raise ValueError(f"must be 'auto' or a cosine similarity in (-1, 1), got {v}")
        _threshold_sanity(v, "matching.threshold")
        return v


class AlertsConfig(_Strict):
    """`recognized` messages: sent while a track is still open, as soon as it is known."""

    enabled: bool = True
    unknown_after: int = Field(
        3, ge=1, le=100,
        description="good embeddings before an unmatched track is announced as unknown; "
        "higher: fewer false unknown alerts for people recognised a moment later",
    )
    unknown_min_quality: float = Field(
        0.01, ge=0, le=1, description="quality score of a crop that counts as a good "
        "embedding (the default is enroll.min_quality: a face good enough to enroll; on the "
        "Hamilton clip, benchmarks/unknown_quality.py: 0 of its 9 unknown tracks reach "
        "unknown_after at 0.1, 1 at 0.01)"
    )
    cooldown_s: float = Field(
        60.0, ge=0, le=86400,
        description="media seconds after a person is announced on a camera during which "
        "new tracks of the same person there are not announced again (0: every track)",
    )


class EnrollConfig(_Strict):
    """What `facemoe enroll` accepts from photos and videos."""

    max_side: int = Field(
        1920, ge=320, le=16384, description="detection runs on a copy of a photo at most this "
        "long (alignment uses the original pixels); larger finds smaller faces, costs more")
    max_pixels: int = Field(
        100_000_000, ge=1, le=1_000_000_000, description="a decoded photo above this is refused")
    min_quality: float = Field(
        0.01, ge=0, le=1, description="faces of lower quality are not enrolled; higher keeps "
        "only sharp, large, frontal faces")
    warn_quality: float = Field(
        0.1, ge=0, le=1, description="faces of lower quality are enrolled with a warning")


class GalleryConfig(_Strict):
    path: str = "gallery.db"


class OutputConfig(_Strict):
    events_jsonl: str | None = None
    events_sqlite: bool = True
    # aligned crops of each event's track kept with the event in the gallery (best first), so
    # an operator can enroll the person later (`facemoe enroll NAME --event ID`); 0 keeps none.
    # They are biometric data like the templates: purged with the events, encrypted with them.
    event_crops: int = Field(3, ge=0, le=5)


class CameraConfig(_Strict):
    """One camera of the daemon."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    uri: EnvStr = Field(
        min_length=1, description="rtsp://, http(s):// MJPEG, /dev/videoN or a file"
    )
    loop: bool = Field(False, description="restart a file at its end (files only)")
    detect_every_n: int | None = Field(
        None, ge=1, description="detection rate; default detector.every_n_frames"
    )
    enabled: bool = True
    min_face: float | None = Field(
        None, ge=0, description="ignore faces narrower than this (px); default detector.min_face"
    )
    threshold: float | None = Field(
        None, gt=-1, lt=1, description="open-set threshold here; default matching.threshold"
    )
    masks: list[Polygon] = Field(
        default_factory=list, description="faces whose box centre is inside one are ignored"
    )
    zones: dict[ZoneName, Polygon] = Field(
        default_factory=dict, description="named areas; an event lists those its face was in"
    )

    @model_validator(mode="after")
    def _sane_threshold(self) -> CameraConfig:
        _threshold_sanity(self.threshold, f"cameras[{self.name}].threshold")
        return self


class ReconnectConfig(_Strict):
    initial_s: float = Field(1.0, gt=0, description="first wait after a camera failure")
    max_s: float = Field(30.0, gt=0, le=86400, description="the wait doubles up to this")

    @model_validator(mode="after")
    def _order(self) -> ReconnectConfig:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s:g}) must be >= initial_s ({self.initial_s:g})")
        return self


class JsonlConfig(_Strict):
    path: str | None = None  # events as JSON lines; None = off
    max_mb: float = Field(100.0, gt=0, description="rotate the file above this size")
    backups: int = Field(5, ge=0, le=1000, description="rotated files kept (path.1 ... path.N)")


class SnapshotConfig(_Strict):
    dir: str | None = None  # best face JPEG per event under dir/camera/; None = off
    retention_days: float = Field(7.0, gt=0, le=36500)
    allow_unencrypted: bool = Field(
        False, description="write plain JPEG snapshots even though the gallery is encrypted "
        "(refused by default: a snapshot is as identifying as the templates)")


class MqttTlsConfig(_Strict):
    ca_certs: str | None = None  # CA file that signed the broker's certificate; None: system CAs
    certfile: str | None = None  # client certificate, for brokers that require one
    keyfile: str | None = None
    insecure: bool = Field(False, description="skip the broker hostname check (not for production)")


class MqttDiscoveryConfig(_Strict):
    """Home Assistant MQTT discovery: a presence sensor per enrolled person, a device per
    camera (last recognized, faces, unknown faces, snapshot image)."""

    enabled: bool = False
    prefix: str = Field("homeassistant", min_length=1, pattern=r"^[^#+]+$")


class MqttConfig(_Strict):
    host: EnvStr = Field(min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    prefix: str = Field(
        "facemoe", min_length=1, pattern=r"^[^#+]+$",
        description="topics: <prefix>/events, /cameras/<camera>[/state|/image], "
        "/identities/<name>/<box>, /availability/<box>",
    )
    client_id: str | None = Field(
        None, min_length=1, max_length=64,
        description="default facemoe-<daemon.box>: unique per box (a broker drops a client "
        "when another connects with its id)")
    username: EnvStr | None = None
    password: EnvSecret | None = None  # e.g. "{FACEMOE_MQTT_PASSWORD}"
    tls: MqttTlsConfig | None = None
    qos: int = Field(1, ge=0, le=2)
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_max_s: float = Field(30.0, gt=0, le=600, description="longest wait between tries")
    buffer: int = Field(
        10000, ge=1, description="messages kept while the broker is unreachable; oldest dropped"
    )
    away_after_s: float = Field(
        15.0, ge=0, le=86400, description="a person is `away` this long after their last "
        "track ended (present while one is open), and a camera's last recognized person goes "
        "back to none; higher: fewer present/away flips for someone who steps out of view")
    discovery: MqttDiscoveryConfig = Field(default_factory=MqttDiscoveryConfig)


class WebhookConfig(_Strict):
    url: EnvStr = Field(pattern=r"^https?://")
    timeout_s: float = Field(2.0, gt=0, le=30)
    secret: EnvSecret | None = Field(
        None, description="HMAC-SHA256 key: X-FaceMoE-Signature-256: sha256=<hex of the body>"
    )
    types: list[Literal["recognized", "end"]] = Field(
        default_factory=lambda: ["recognized", "end"], min_length=1
    )
    retry_initial_s: float = Field(0.5, gt=0, le=60, description="first wait after a failure")
    retry_max_s: float = Field(30.0, gt=0, le=3600, description="the wait doubles up to this")
    queue: int = Field(
        1000, ge=1, description="events waiting for the target; the oldest is dropped when full"
    )

    @model_validator(mode="after")
    def _order(self) -> WebhookConfig:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(f"retry_max_s ({self.retry_max_s:g}) must be >= retry_initial_s "
                             f"({self.retry_initial_s:g})")
        return self


class HealthConfig(_Strict):
    """When /healthz answers 503 "degraded" instead of 200 "ok"."""

    window_s: float = Field(60.0, gt=0, le=3600, description="the recent past health looks at")
    max_drop_rate: float = Field(
        0.2, ge=0, le=1, description="share of a camera's frames dropped in the window above "
        "which it is degraded; lower: overload is reported sooner")
    max_sink_age_s: float = Field(
        15.0, gt=0, le=86400, description="a sink whose oldest undelivered event or message is "
        "older than this makes the daemon degraded (database locked or down, broker away)")


def _host_name() -> str:
    """This machine's name as a box name (characters a box name may not hold become _)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "box"


class DaemonConfig(_Strict):
    metrics_port: int = Field(0, ge=0, le=65535, description="/metrics and /healthz; 0 = off")
    metrics_host: str = Field("127.0.0.1", min_length=1)
    stats_interval_s: float = Field(
        60.0, gt=0, le=86400, description="period of the stats line in the log")
    frame_timeout_s: float = Field(
        10.0, gt=0, description="a camera with no frame this long is reconnected"
    )
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    frame_queue: int = Field(4, ge=1, description="frames queued per camera; the oldest is dropped")
    event_queue: int = Field(10000, ge=1, description="events waiting for the sinks")
    sqlite_commit_s: float = Field(
        1.0, ge=0, description="events are committed in batches this often"
    )
    jsonl: JsonlConfig = Field(default_factory=JsonlConfig)
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)
    mqtt: MqttConfig | None = None
    webhook: WebhookConfig | None = None
    shutdown_timeout_s: float = Field(5.0, gt=0, le=3600)
    health: HealthConfig = Field(default_factory=HealthConfig)
    web: bool = Field(
        False, description="serve the review UI and API (`web:` section) on metrics_port too"
    )
    box: str = Field(
        default_factory=lambda: _host_name(), min_length=1, max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="this box's name on a site of several (MQTT client id, availability topic "
        "and Home Assistant ids); default the host name")
    gallery_poll_s: float = Field(
        2.0, gt=0, le=3600, description="how often the gallery is checked for changes (enroll, "
        "rename, remove by another process); the video path never waits for the database")
    heartbeat_s: float = Field(
        10.0, gt=0, le=3600, description="how often this box writes its heartbeat (state and "
        "cameras) to the gallery database, for `facemoe fleet`")
    outbox: str | None = Field(
        None, description="events the gallery database could not take wait in this file (0600, "
        "in order) until it is back; default <home>/outbox-<box>.jsonl")


class WebUser(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    password_hash: str = Field(
        pattern=r"^scrypt\$", description="`facemoe serve --hash-password` prints one"
    )


class WebApiKey(_Strict):
    """A key of the CompreFace-compatible API (`x-api-key` header on /api/v1/...), kept as a
    hash; `read_only` keys recognise, verify, detect and list, but change nothing."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    key_hash: str = Field(
        pattern=r"^sha256\$[0-9a-f]{64}$", description="`facemoe serve --hash-token` prints one"
    )
    read_only: bool = False


class WebConfig(_Strict):
    """`facemoe serve` (and the daemon with `daemon.web: true`): the review UI and REST API.

    Any bind other than loopback needs a user or a token. Passwords and tokens are kept as
    hashes only; $FACEMOE_WEB_PASSWORD (user $FACEMOE_WEB_USER, default admin) and
    $FACEMOE_WEB_TOKEN add one from the environment."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    users: list[WebUser] = Field(default_factory=list)
    token_hashes: list[str] = Field(
        default_factory=list, description="bearer tokens, as `facemoe serve --hash-token` prints"
    )
    api_keys: list[WebApiKey] = Field(
        default_factory=list, description="keys of the CompreFace-compatible API (/api/v1)"
    )
    session_hours: float = Field(12.0, gt=0, description="a login lasts this long")
    max_upload_mb: float = Field(10.0, gt=0, le=100, description="largest accepted image")
    cluster_threshold: float | None = Field(
        None, gt=0, lt=1,
        description="cosine at which unknown faces are grouped; default the match threshold; "
        "higher splits one person into more clusters, lower merges different people",
    )
    page_size: int = Field(48, ge=1, le=500)
    timezone: str | None = Field(
        None, description="IANA zone the pages show times in and read filter times without an "
        "offset in (e.g. Europe/Paris); default the machine's"
    )
    refresh_s: float = Field(
        30.0, ge=0,
        description="group new unknown events in the background this often (0: only when the "
        "unknown-faces page loads); faster pages, a little CPU while cameras run",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="host names (Host header) the server answers besides loopback names, IP "
        "addresses and the bound host; others are refused (DNS rebinding); '*' allows any",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses (or networks) of reverse proxies whose X-Forwarded-For names "
        "the client; from anyone else the header is ignored",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must keep arriving: a pause this long ends it")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {v!r} (an IANA name such as Europe/Paris)"
                                 ) from None
        return v


class AppConfig(_Strict):
    # validate_default: a section the file leaves out gets its relative paths resolved too
    # (app.paths), not left relative to the working directory
    model: ModelConfig = Field(default_factory=ModelConfig, validate_default=True)
    detector: DetectorConfig = Field(default_factory=DetectorConfig, validate_default=True)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    embed: EmbedPolicy = Field(default_factory=EmbedPolicy)
    matching: MatchConfig = Field(default_factory=MatchConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig, validate_default=True)
    enroll: EnrollConfig = Field(default_factory=EnrollConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cameras: list[CameraConfig] = Field(default_factory=list)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig, validate_default=True)
    web: WebConfig = Field(default_factory=WebConfig)

    @field_validator("model")
    @classmethod
    def _model_dir(cls, v: ModelConfig) -> ModelConfig:
        return v.model_copy(update={"dir": str(resolve(v.dir))})

    @field_validator("detector")
    @classmethod
    def _detector_path(cls, v: DetectorConfig) -> DetectorConfig:
        return v if v.model is None else v.model_copy(update={"model": str(resolve(v.model))})

    @field_validator("cameras")
    @classmethod
    def _camera_names(cls, v: list[CameraConfig]) -> list[CameraConfig]:
        names = [c.name for c in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"camera names must be unique (repeated: {', '.join(dup)})")
        return [
            c
            if "://" in c.uri or c.uri.startswith("/dev/")
            else c.model_copy(update={"uri": str(resolve(c.uri))})
            for c in v
        ]

    @field_validator("daemon")
    @classmethod
    def _daemon_paths(cls, v: DaemonConfig) -> DaemonConfig:
        if v.jsonl.path:
            v = v.model_copy(
                update={"jsonl": v.jsonl.model_copy(update={"path": str(resolve(v.jsonl.path))})}
            )
        if v.mqtt is not None and v.mqtt.tls is not None:
            tls = v.mqtt.tls.model_copy(update={
                k: str(resolve(getattr(v.mqtt.tls, k)))
                for k in ("ca_certs", "certfile", "keyfile") if getattr(v.mqtt.tls, k)})
            v = v.model_copy(update={"mqtt": v.mqtt.model_copy(update={"tls": tls})})
        if v.snapshots.dir:
            v = v.model_copy(
                update={
                    "snapshots": v.snapshots.model_copy(
                        update={"dir": str(resolve(v.snapshots.dir))}
                    )
                }
            )
        return v

    @field_validator("gallery")
    @classmethod
    def _gallery_path(cls, v: GalleryConfig) -> GalleryConfig:
        return v if "://" in v.path else v.model_copy(update={"path": str(resolve(v.path))})


def resolve(path: str) -> Path:
    return paths.resolve(path)


def _lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """YAML path (keys and list indices) -> 1-based line of its value, from the node tree."""
    lines = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines.update(_lines(value, (*prefix, key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            lines.update(_lines(value, (*prefix, i)))
    return lines


def _locate(lines: dict[tuple, int], loc: tuple) -> tuple[str, int | None]:
    """(dotted YAML path, line) of a pydantic error location. The line is that of the
    deepest node present; pydantic's union branch names after a scalar ('float',
    "literal['auto']") are dropped from the path."""
    key = tuple(str(p) if not isinstance(p, int) else p for p in loc)
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            scalar = not any(k[:n] == key[:n] and len(k) > n for k in lines)
            path = key[:n] if scalar and n < len(key) and not isinstance(key[n], int) else key
            return ".".join(str(p) for p in path), lines[key[:n]]
    return ".".join(str(p) for p in key) or "(top level)", None


def load_config(path: str | Path | None = None) -> AppConfig:
    """Read and validate the app config; every problem is in one one-line ConfigError that
    lists all errors, each with its YAML path and line."""
    path = Path(path) if path else paths.default_config()
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}" if not path.is_dir()
                          else f"config {path} is a directory")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} on line "
                          f"{line}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    lines = _lines(node) if node is not None else {}
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as e:
        found: dict[tuple[str, int | None], list[str]] = {}
        for err in e.errors():
            msgs = found.setdefault(_locate(lines, err["loc"]), [])
            msg = err["msg"].removeprefix("Value error, ")
            if msg not in msgs:
                msgs.append(msg)
        problems = [f"{where}{f' (line {line})' if line else ''}: {' or '.join(msgs)}"
                    for (where, line), msgs in found.items()]
        count = f"{len(problems)} errors: " if len(problems) > 1 else ""
        raise ConfigError(f"{path}: {count}{'; '.join(problems)}") from None
