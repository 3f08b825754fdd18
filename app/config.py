"""The app's one config object (pydantic, unknown keys refused), the only YAML reader of the app.

Relative paths in the file are resolved against the repository root, so the shipped
configs/app.yaml works from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainer.config import ConfigError, read_yaml_config  # noqa: F401  (ConfigError is re-exported)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "app.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelConfig(_Strict):
    dir: str = "models/facemoe-edge"
    backend: Literal["auto", "onnxruntime", "torch", "tensorrt"] = "auto"
    threads: int = Field(0, ge=0, description="inference threads; 0 = all cores")
    batch_size: int = Field(32, ge=1, le=256, description="crops per embedding call")


class DetectorConfig(_Strict):
    model: str | None = None  # default: models/detector (install.sh), then ../shared/models
    score_threshold: float = Field(0.6, gt=0, lt=1)
    nms_threshold: float = Field(0.3, gt=0, lt=1)
    upscale: float = Field(
        1.0, ge=1.0, le=4.0, description="enlarge frames before detection to find tiny faces"
    )
    min_face: float = Field(8.0, ge=0, description="ignore boxes narrower than this (px)")
    every_n_frames: int = Field(
        1, ge=1, description="detection rate: run the detector on every n-th frame"
    )
    max_fps: float = Field(
        15.0, ge=0, description="most detections per second of media time; 0 = every frame"
    )


class TrackerSection(_Strict):
    high_thresh: float = 0.6
    low_thresh: float = 0.3
    match_iou: float = 0.3
    max_missed: int = Field(15, ge=1)
    min_hits: int = Field(
        2, ge=1, description="detections before a track gets an id (drops one-frame blips)"
    )
    shot_cut_threshold: float = Field(
        0.15, ge=0, description="end every track at a cut above this; 0 = off"
    )


class EmbedSection(_Strict):
    first_n: int = 3
    every_n: int = 10
    min_gain: float = 0.1
    max_per_track: int = 32


class MatchConfig(_Strict):
    threshold: float | Literal["auto"] = "auto"  # auto: the model manifest's recommended threshold
    min_frames: int = Field(2, ge=1, description="tracks seen in fewer frames make no event")


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
    uri: str = Field(min_length=1, description="rtsp://, http(s):// MJPEG, /dev/videoN or a file")
    loop: bool = Field(False, description="restart a file at its end (files only)")
    detect_every_n: int | None = Field(
        None, ge=1, description="detection rate; default detector.every_n_frames"
    )
    enabled: bool = True


class ReconnectConfig(_Strict):
    initial_s: float = Field(1.0, gt=0, description="first wait after a camera failure")
    max_s: float = Field(30.0, gt=0, description="the wait doubles up to this")


class JsonlConfig(_Strict):
    path: str | None = None  # events as JSON lines; None = off
    max_mb: float = Field(100.0, gt=0, description="rotate the file above this size")
    backups: int = Field(5, ge=0, description="rotated files kept (path.1 ... path.N)")


class SnapshotConfig(_Strict):
    dir: str | None = None  # best face JPEG per event under dir/camera/; None = off
    retention_days: float = Field(7.0, gt=0)


class MqttConfig(_Strict):
    host: str
    port: int = Field(1883, ge=1, le=65535)
    topic: str = "facemoe/events"


class WebhookConfig(_Strict):
    url: str = Field(pattern=r"^https?://")
    timeout_s: float = Field(2.0, gt=0, le=30)


class DaemonConfig(_Strict):
    metrics_port: int = Field(0, ge=0, le=65535, description="/metrics and /healthz; 0 = off")
    metrics_host: str = "127.0.0.1"
    stats_interval_s: float = Field(60.0, gt=0, description="period of the stats line in the log")
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
    shutdown_timeout_s: float = Field(5.0, gt=0)
    web: bool = Field(
        False, description="serve the review UI and API (`web:` section) on metrics_port too"
    )


class WebUser(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    password_hash: str = Field(
        pattern=r"^scrypt\$", description="`facemoe serve --hash-password` prints one"
    )


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
    session_hours: float = Field(12.0, gt=0, description="a login lasts this long")
    max_upload_mb: float = Field(10.0, gt=0, le=100, description="largest accepted image")
    cluster_threshold: float | None = Field(
        None, gt=0, lt=1,
        description="cosine at which unknown faces are grouped; default the match threshold; "
        "higher splits one person into more clusters, lower merges different people",
    )
    page_size: int = Field(48, ge=1, le=500)
    refresh_s: float = Field(
        30.0, ge=0,
        description="group new unknown events in the background this often (0: only when the "
        "unknown-faces page loads); faster pages, a little CPU while cameras run",
    )


class AppConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    tracker: TrackerSection = Field(default_factory=TrackerSection)
    embed: EmbedSection = Field(default_factory=EmbedSection)
    matching: MatchConfig = Field(default_factory=MatchConfig)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cameras: list[CameraConfig] = Field(default_factory=list)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
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
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def load_config(path: str | Path | None = None) -> AppConfig:
    return read_yaml_config(Path(path) if path else DEFAULT_CONFIG, AppConfig)
