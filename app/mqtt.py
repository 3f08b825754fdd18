"""MQTT output the way Home Assistant, Frigate and Double Take users expect (paho-mqtt).

Topics under `prefix` (docs/events.md has the payloads):
  <prefix>/events                        every alert and track (`recognized`, `end`), JSON
  <prefix>/cameras/<camera>              retained: the camera's latest of those
  <prefix>/cameras/<camera>/state        retained: last person recognized there, faces and
                                         unknown faces in view now
  <prefix>/cameras/<camera>/image        retained: JPEG of the latest alert with a snapshot
  <prefix>/identities/<slug>/<box>       retained: {"state": "present" | "away", ...} as seen
                                         by this box (present while a track of the person is
                                         open, away `away_after_s` after the last one ended)
  <prefix>/availability/<box>            retained "online"; "offline" on close and as the will
and, opt-in, Home Assistant discovery configs (<discovery prefix>/<component>/facemoe_<box>/
<object id>/config): a presence sensor per enrolled person on a device per box, and a device
per camera under it with "last recognized", "faces" and "unknown faces" sensors and an image.

Several boxes of a site share one broker: each has its own client id (`facemoe-<box>` unless
configured: two clients with one id throw each other off), availability topic and Home
Assistant device and entities (`sensor.facemoe_<box>_<name>`), so no box takes over another's.
People who leave the gallery (renamed, removed, erased) leave no retained topic or entity of
a box behind: the box clears them when its list of people changes, and after each connection
what earlier runs left (`clear_retained` is the erasure service's own sweep over every box's).

Delivery: messages wait in a bounded buffer of our own (the oldest is dropped when it is full,
counted and logged) and are handed to paho only while connected, at most `max_inflight` at a
time; paho resends those it holds after a reconnect, so a broker restart loses none (QoS 1
delivers at least once). Connection losses are logged and counted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from app import __version__
from app.config import MqttConfig
from app.records import Event
from app.sinks import Count, SinkError

log = logging.getLogger(__name__)

MAX_INFLIGHT = 20
NAMES_POLL_S = 2.0  # how often the sink asks who is enrolled
RECONCILE_AFTER_S = 1.0  # the broker sends retained messages at once on a subscription


def _json_object(payload: bytes) -> dict | None:
    """A retained payload read as a JSON object; None for anything else (not ours to read)."""
    try:
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def slug(name: str) -> str:
    """A topic level and Home Assistant object id for a name: lower-case [a-z0-9_], accents
    dropped ("Zoë Ünal" -> "zoe_unal")."""
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    s = re.sub(r"[^a-z0-9]+", "_", plain.lower()).strip("_")
    return s or "_"


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: str | bytes
    retain: bool
    # ("camera", name) or ("identity", name): the Home Assistant entities to announce first
    about: tuple[str, str] | None = None
    at: float = field(default_factory=time.monotonic, compare=False)  # when it was queued


class Presence:
    """Who is in view of one box, from its track messages (bookkeeping, no I/O; times are
    monotonic seconds).

    A person is present while one of their tracks is open (from its `recognized` or `seen`
    message to its `end`: the alert cooldown does not matter) and for `away_after_s` after
    the last one ended. A camera's `last_recognized` is the person last named there; it goes
    back to "none" once nobody known has been in view there for `away_after_s`. `faces` counts
    a camera's open tracks that were named or announced unknown, `unknown` the unknown ones.
    """

    def __init__(self, away_after_s: float) -> None:
        self.away_after_s = away_after_s
        self.open: dict[tuple[str, int], str | None] = {}  # (camera, track) -> identity
        self.until: dict[str, float] = {}  # identity -> when it is away (no track open)
        self.last: dict[str, str] = {}  # camera -> person last named there
        self.reset_at: dict[str, float] = {}  # camera -> when `last` goes back to "none"

    def update(self, ev: Event, now: float) -> tuple[set[str], set[str]]:
        """Take one message; the identities and cameras whose state changed."""
        key, names = (ev.camera, ev.track_id), set()
        if ev.type == "end":
            before = self.open.pop(key, None)
            names = {n for n in (before, ev.identity) if n is not None}
            for name in names:
                if not self._open(name):
                    self.until[name] = now + self.away_after_s
            if ev.identity is not None:
                self.last[ev.camera] = ev.identity
            if ev.camera in self.last and not self._known_open(ev.camera):
                self.reset_at[ev.camera] = now + self.away_after_s
        else:  # recognized or seen: the track is open
            self.open[key] = ev.identity
            if ev.identity is not None:
                names = {ev.identity}
                self.until.pop(ev.identity, None)
                self.last[ev.camera] = ev.identity
                self.reset_at.pop(ev.camera, None)
        return names, {ev.camera}

    def _open(self, name: str) -> bool:
        return name in self.open.values()

    def _known_open(self, camera: str) -> bool:
        return any(c == camera and n is not None for (c, _), n in self.open.items())

    def state(self, name: str, now: float) -> str:
        return "present" if self._open(name) or self.until.get(name, 0.0) > now else "away"

    def present(self, now: float) -> set[str]:
        return {n for n in self.open.values() if n is not None} | {
            n for n, t in self.until.items() if t > now}

    def camera(self, camera: str) -> dict:
        tracks = [n for (c, _), n in self.open.items() if c == camera]
        return {"last_recognized": self.last.get(camera, "none"), "faces": len(tracks),
                "unknown": sum(n is None for n in tracks),
                "people": sorted({n for n in tracks if n is not None})}

    def due(self, now: float) -> tuple[set[str], set[str]]:
        """The identities that went away and the cameras whose `last_recognized` reset by
        `now`."""
        names = {n for n, t in self.until.items() if t <= now}
        for n in names:
            del self.until[n]
        cameras = {c for c, t in self.reset_at.items() if t <= now}
        for c in cameras:
            del self.reset_at[c]
            self.last.pop(c, None)
        return names, cameras

    def leave(self, now: float) -> tuple[set[str], set[str]]:
        """Everyone is away now (the box is closing): what changed."""
        names = self.present(now)
        cameras = {c for c, _ in self.open} | set(self.last)
        self.open.clear()
        self.until.clear()
        self.last.clear()
        self.reset_at.clear()
        return names, cameras

    def forget(self, names: set[str]) -> set[str]:
        """Drop people who left the gallery (renamed, removed); the cameras that named them."""
        cameras = {c for (c, _), n in self.open.items() if n in names}
        cameras |= {c for c, n in self.last.items() if n in names}
        for key in [k for k, n in self.open.items() if n in names]:
            del self.open[key]
        for n in names:
            self.until.pop(n, None)
        for c in [c for c, n in self.last.items() if n in names]:
            del self.last[c]
            self.reset_at.pop(c, None)
        return cameras


class MqttSink:
    """Publishes events to an MQTT broker (needs paho-mqtt: pip install 'facemoe-edge[mqtt]').

    `cameras` and `identities()` name the entities announced by discovery (identities first
    seen later are announced when they are); `identities()`, when given, is asked again every
    `NAMES_POLL_S`: the retained topics and entities of people no longer enrolled (renamed,
    removed, erased) are cleared, and after each connection those that earlier runs of the
    box left for them. `count(kind, n)` receives "disconnect" and "dropped"
    incidents (the daemon's metrics).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        box: str | None = None,
        cameras: Iterable[str] = (),
        identities: Callable[[], Iterable[str]] | None = None,
        count: Count | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise SinkError("MQTT output needs paho-mqtt "
                            "(pip install 'facemoe-edge[mqtt]')") from exc
        self.cfg, self.prefix = cfg, cfg.prefix.rstrip("/")
        self.box = box or re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "box"
        self.node = f"facemoe_{slug(self.box)}"  # the box in discovery topics and entity ids
        self.client_id = cfg.client_id or f"facemoe-{self.box}"[:64]
        self.close_timeout = close_timeout
        self.availability = f"{self.prefix}/availability/{self.box}"
        self._cameras = list(dict.fromkeys(cameras))
        self._identities = identities
        self._count = count or (lambda kind, n: None)
        self._cond = threading.Condition()
        self._pending: deque[_Message] = deque()
        self._inflight: dict[int, _Message] = {}
        self._acked: set[int] = set()
        self._connected = self._closing = self._rediscover = False
        self._announced: set[str] = set()  # discovery configs sent in this connection
        # what the box has published, to clear it when a person leaves the gallery
        self._state = threading.Lock()  # presence and the maps below
        self.presence = Presence(cfg.away_after_s)
        self._last: dict[str, dict] = {}  # identity -> where and when it was last seen
        self._latest: dict[str, set[str]] = {}  # camera -> names in its latest message
        self._image_of: dict[str, str | None] = {}  # camera -> person in its image (None: unknown)
        self._names: set[str] | None = None  # enrolled, as last asked
        self._next_names = 0.0
        self._retained: dict[str, bytes] = {}  # retained topics of earlier runs (reconcile)
        self._reconcile_at: float | None = None
        self.disconnects = self.dropped = 0
        self._last_error = ""

        client = self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                            client_id=self.client_id)
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        if cfg.tls is not None:
            t = cfg.tls
            for key in ("ca_certs", "certfile", "keyfile"):
                path = getattr(t, key)
                if path is not None and not os.path.isfile(path):
                    raise SinkError(f"MQTT TLS {key} file not found: {path}")
            try:
                client.tls_set(ca_certs=t.ca_certs, certfile=t.certfile, keyfile=t.keyfile,
                               cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise SinkError(f"MQTT TLS setup: {str(exc).splitlines()[0]}") from exc
            client.tls_insecure_set(t.insecure)
        client.will_set(self.availability, "offline", qos=1, retain=True)
        client.reconnect_delay_set(1, max(1, int(cfg.reconnect_max_s)))
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        try:
            client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        except (OSError, ValueError) as exc:
            raise SinkError(f"MQTT {cfg.host}:{cfg.port}: {exc}") from exc
        client.loop_start()  # paho's network thread: connects, reconnects, acknowledges
        self._sender = threading.Thread(target=self._send, name="mqtt-send", daemon=True)
        self._sender.start()

    # --- paho callbacks (its network thread): flags only, never a paho call under our lock ---
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            error = f"MQTT {self.cfg.host}:{self.cfg.port}: connection refused: {reason_code}"
            if error != self._last_error:
                log.error("%s", error)
                self._last_error = error
            return
        self._last_error = ""
        log.info("MQTT connected to %s:%d", self.cfg.host, self.cfg.port)
        client.publish(self.availability, "online", qos=1, retain=True)
        # what this box left retained in earlier runs: cleared where its person is gone
        client.subscribe([(t, 1) for t in self._reconcile_topics()])
        with self._cond:
            self._connected = True
            self._rediscover = True
            self._cond.notify_all()

    def _reconcile_topics(self) -> list[str]:
        topics = [f"{self.prefix}/identities/+/{self.box}", f"{self.prefix}/cameras/+",
                  f"{self.prefix}/cameras/+/state"]
        if self.cfg.discovery.enabled:
            topics.append(f"{self.cfg.discovery.prefix}/+/{self.node}/+/config")
        return topics

    def _on_message(self, client, userdata, msg) -> None:
        if msg.retain and msg.payload:
            with self._state:
                self._retained[msg.topic] = bytes(msg.payload)

    def _on_connect_fail(self, client, userdata) -> None:
        error = f"MQTT {self.cfg.host}:{self.cfg.port}: cannot connect"
        if error != self._last_error:  # once per outage; paho keeps trying
            log.error("%s; %d message(s) kept, retrying", error, self.pending())
            self._last_error = error

    def _on_disconnect(self, client, userdata, flags, reason_code=None, properties=None) -> None:
        with self._cond:
            was, self._connected = self._connected, False
            waiting = len(self._pending) + len(self._inflight)
        if was and not self._closing:
            self.disconnects += 1
            self._count("disconnect", 1)
            log.warning("MQTT connection to %s:%d lost (%s); %d message(s) kept until it is "
                        "back", self.cfg.host, self.cfg.port, reason_code, waiting)

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    # --- our sender thread --------------------------------------------------------------------
    def _settle(self) -> None:
        """Under the lock: forget the acknowledged messages."""
        for mid in [m for m in self._acked if m in self._inflight]:
            del self._inflight[mid]
            self._acked.discard(mid)

    def _send(self) -> None:
        while True:
            self._tick()
            with self._cond:
                self._settle()
                while not (self._connected and (self._rediscover or (
                        self._pending and len(self._inflight) < MAX_INFLIGHT))):
                    if self._closing:  # close() has waited for the queue as long as it may
                        return
                    self._cond.wait(0.5)
                    self._settle()
                    if not self._closing and self._timers_due():
                        break
                if not self._connected:
                    continue
                rediscover, self._rediscover = self._rediscover, False
                msg = None
                if not rediscover and self._pending and len(self._inflight) < MAX_INFLIGHT:
                    msg = self._pending.popleft()
            if rediscover:
                self._discover_all()
                continue
            if msg is None:
                continue
            if msg.about is not None and self.cfg.discovery.enabled:
                self._publish_configs(self._configs(*msg.about))
            info = self._client.publish(msg.topic, msg.payload, qos=self.cfg.qos,
                                        retain=msg.retain)
            if self.cfg.qos:
                with self._cond:  # paho holds it until acknowledged, across reconnects
                    self._inflight[info.mid] = msg
                    self._cond.notify_all()

    def _timers_due(self) -> bool:
        now = time.monotonic()
        with self._state:
            p = self.presence
            return (now >= self._next_names or (self._reconcile_at is not None
                                                 and now >= self._reconcile_at)
                    or any(t <= now for t in p.until.values())
                    or any(t <= now for t in p.reset_at.values()))

    def _tick(self) -> None:
        """Timers: people and cameras whose time ran out, a changed list of people, the
        reconciliation of retained topics after a connection."""
        now = time.monotonic()
        with self._state:
            names, cameras = self.presence.due(now)
            messages = self._states(names, cameras, now)
            reconcile = self._reconcile_at is not None and now >= self._reconcile_at
        if now >= self._next_names or reconcile:
            self._next_names = now + NAMES_POLL_S
            messages += self._check_names()
        if reconcile:
            messages += self._reconcile()
        if messages:
            self._queue(messages)

    # --- the sink ---------------------------------------------------------------------------------
    def _queue(self, messages: list[_Message]) -> None:
        with self._cond:
            self._pending.extend(messages)
            over = len(self._pending) - self.cfg.buffer
            for _ in range(max(0, over)):
                self._pending.popleft()
            if over > 0:
                self.dropped += over
                self._count("dropped", over)
                log.error("MQTT buffer full (%d messages): %d oldest dropped (%d in all)",
                          self.cfg.buffer, over, self.dropped)
            self._cond.notify_all()

    def write(self, events: list[Event]) -> None:
        """Queue each event's messages: the event and its camera's latest message (not for
        `seen`), the camera's snapshot (a `recognized` alert with a picture), and the states
        of the people and cameras it changed."""
        if self._closing:
            raise SinkError("MQTT sink is closed")
        now = time.monotonic()
        messages = []
        with self._state:
            names, cameras = set(), set()
            for ev in events:
                if ev.type != "seen":
                    record = json.dumps(ev.to_json(), ensure_ascii=False)
                    messages.append(_Message(f"{self.prefix}/events", record, False))
                    messages.append(_Message(f"{self.prefix}/cameras/{ev.camera}", record, True,
                                             ("camera", ev.camera)))
                    self._latest[ev.camera] = {n for n in (ev.identity, ev.candidate) if n}
                if ev.type == "recognized" and ev.snapshot_image is not None:
                    jpeg = _jpeg(ev.snapshot_image)
                    if jpeg is not None:
                        messages.append(_Message(f"{self.prefix}/cameras/{ev.camera}/image",
                                                 jpeg, True, ("camera", ev.camera)))
                        self._image_of[ev.camera] = ev.identity
                if ev.identity is not None:
                    self._last[ev.identity] = {
                        "name": ev.identity, "camera": ev.camera,
                        "score": round(float(ev.score), 6),
                        "last_seen": datetime.now().astimezone().isoformat(
                            timespec="milliseconds"),
                        "event": ev.id, "snapshot": ev.snapshot}
                n, c = self.presence.update(ev, now)
                names |= n
                cameras |= c
            messages += self._states(names, cameras, now)
        self._queue(messages)

    def _states(self, names: set[str], cameras: set[str], now: float) -> list[_Message]:
        """Under `_state`: the retained state messages of `names` and `cameras`."""
        out = []
        for name in sorted(names):
            state = {"name": name, "state": self.presence.state(name, now),
                     **{k: v for k, v in self._last.get(name, {}).items() if k != "name"}}
            out.append(_Message(self.identity_topic(name), json.dumps(state, ensure_ascii=False),
                                True, ("identity", name)))
        for camera in sorted(cameras):
            state = {"camera": camera, "box": self.box, **self.presence.camera(camera),
                     "snapshot_of": self._image_of.get(camera)}
            out.append(_Message(f"{self.prefix}/cameras/{camera}/state",
                                json.dumps(state, ensure_ascii=False), True, ("camera", camera)))
        return out

    def identity_topic(self, name: str) -> str:
        """`<prefix>/identities/<slug>/<box>`: this box's presence state of a person."""
        return f"{self.prefix}/identities/{slug(name)}/{self.box}"

    # --- people who leave the gallery -------------------------------------------------------
    def _check_names(self) -> list[_Message]:
        """Ask for the enrolled people; those gone since the last time (renamed, removed,
        erased) lose their entity and every retained topic of this box that names them."""
        if self._identities is None:
            return []
        try:
            names = set(self._identities())
        except Exception as exc:  # noqa: BLE001  (the gallery may be busy: asked again later)
            log.warning("MQTT: cannot list identities: %s", exc)
            return []
        with self._state:
            before, self._names = self._names, names
            gone = set() if before is None else before - names
            known = set(self._last) | {n for n in self.presence.open.values() if n}
            gone |= {n for n in known if n not in names}
            if not gone:
                return []
            return self._forget(gone)

    def _forget(self, gone: set[str]) -> list[_Message]:
        """Under `_state`: empty retained messages for what names `gone`, fresh camera states."""
        log.info("MQTT: clearing the retained topics of %d person(s) no longer enrolled",
                 len(gone))
        out = []
        for name in sorted(gone):
            self._last.pop(name, None)
            out.append(_Message(self.identity_topic(name), b"", True))
            if self.cfg.discovery.enabled:
                topic = self.identity_sensor(name)[0]
                self._announced.discard(topic)
                out.append(_Message(topic, b"", True))
        cameras = self.presence.forget(gone)
        for camera, names in self._latest.items():
            if names & gone:
                names.clear()
                out.append(_Message(f"{self.prefix}/cameras/{camera}", b"", True))
        for camera, who in self._image_of.items():
            if who in gone:
                self._image_of[camera] = None
                out.append(_Message(f"{self.prefix}/cameras/{camera}/image", b"", True))
                cameras.add(camera)
        return out + self._states(set(), cameras, time.monotonic())

    def _reconcile(self) -> list[_Message]:
        """After a connection: clear what earlier runs of this box left retained for people
        no longer enrolled and for entities it no longer has, and publish every camera's
        state."""
        client = self._client
        client.unsubscribe(self._reconcile_topics())
        with self._state:
            self._reconcile_at = None
            retained, self._retained = self._retained, {}
            if self._identities is None:  # who is enrolled is not known here: keep it all
                retained = {}
            names = self._names or set()
            slugs = {slug(n) for n in names}
            wanted = {t for c in self._cameras for t, _ in self.camera_configs(c)}
            wanted |= {self.identity_sensor(n)[0] for n in names}
            out = []
            for topic, payload in sorted(retained.items()):
                level = topic.split("/")
                if topic.endswith("/config"):
                    if topic not in wanted and topic not in self._announced:
                        out.append(_Message(topic, b"", True))
                elif level[-2:-1] and topic.startswith(f"{self.prefix}/identities/"):
                    if level[-2] not in slugs:
                        out.append(_Message(topic, b"", True))
                elif topic.startswith(f"{self.prefix}/cameras/"):
                    out += self._reconcile_camera(topic, payload, names)
            cameras = set(self._cameras)
            out += self._states(set(), cameras, time.monotonic())
        return out

    def _reconcile_camera(self, topic: str, payload: bytes, names: set[str]) -> list[_Message]:
        camera = topic[len(f"{self.prefix}/cameras/"):].removesuffix("/state")
        if camera not in self._cameras:
            return []  # another box's
        record = _json_object(payload)
        if record is None:
            return []
        if topic.endswith("/state"):
            who = record.get("snapshot_of")
            if who is not None and who not in names:
                self._image_of[camera] = None
                return [_Message(f"{self.prefix}/cameras/{camera}/image", b"", True)]
            self._image_of.setdefault(camera, who)
            return []
        named = {record.get(k) for k in ("identity", "candidate")} - {None}
        if named - names:
            return [_Message(topic, b"", True)]
        self._latest.setdefault(camera, named)
        return []

    # --- Home Assistant discovery -------------------------------------------------------------
    def _discover_all(self) -> None:
        """On every connection: the entities of every camera and enrolled person; a second
        later, the reconciliation of what earlier runs left (`_reconcile`)."""
        try:
            names = sorted(self._identities()) if self._identities is not None else []
        except Exception as exc:  # noqa: BLE001  (the gallery may be busy: they come later)
            log.warning("MQTT discovery: cannot list identities: %s", exc)
            names = []
        with self._state:
            if names:
                self._names = set(names)
            self._reconcile_at = time.monotonic() + RECONCILE_AFTER_S
        self._announced.clear()
        if self.cfg.discovery.enabled:
            self._publish_configs([c for cam in self._cameras for c in self.camera_configs(cam)]
                                  + [self.identity_sensor(n) for n in names])

    def _configs(self, kind: str, name: str) -> list[tuple[str, dict]]:
        if kind == "camera":
            if name not in self._cameras:
                self._cameras.append(name)
            return self.camera_configs(name)
        return [self.identity_sensor(name)]

    def _publish_configs(self, configs: list[tuple[str, dict]]) -> None:
        for topic, config in configs:
            if topic not in self._announced:
                self._announced.add(topic)
                self._client.publish(topic, json.dumps(config, ensure_ascii=False), qos=1,
                                     retain=True)

    def _device(self) -> dict:
        return {"identifiers": [self.node], "name": f"FaceMoE Edge {self.box}",
                "manufacturer": "FaceMoE", "model": "FaceMoE Edge", "sw_version": __version__}

    def _camera_device(self, camera: str) -> dict:
        return {"identifiers": [f"{self.node}_camera_{slug(camera)}"],
                "name": f"FaceMoE {self.box} {camera}", "manufacturer": "FaceMoE",
                "model": "camera", "via_device": self.node}

    def _entity(self, component: str, object_id: str, name: str, device: dict,
                **keys: object) -> tuple[str, dict]:
        """Discovery topic and config of `<component>.<object_id>`. The entity id is given
        twice: `object_id` (what cores before 2025.10 use) and `default_entity_id` (what
        2025.10 and later use; they ignore `object_id` when it is there)."""
        config = {
            "name": name,
            "unique_id": object_id,
            "object_id": object_id,
            "default_entity_id": f"{component}.{object_id}",
            **keys,
            "availability_topic": self.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
        }
        return f"{self.cfg.discovery.prefix}/{component}/{self.node}/{object_id}/config", config

    def identity_sensor(self, name: str) -> tuple[str, dict]:
        """Discovery topic and config of `sensor.facemoe_<box>_<name>`: present / away."""
        topic = self.identity_topic(name)
        return self._entity("sensor", f"{self.node}_{slug(name)}", name, self._device(),
                            state_topic=topic, value_template="{{ value_json.state }}",
                            json_attributes_topic=topic, icon="mdi:account")

    def camera_configs(self, camera: str) -> list[tuple[str, dict]]:
        """A camera's device (under the box's) and entities:
        `sensor.facemoe_<box>_camera_<camera>_last_recognized` (the person last named there,
        "none" after `away_after_s` with nobody known in view), `..._faces` (faces in view
        now), `..._unknown` (unknown faces in view now) and
        `image.facemoe_<box>_camera_<camera>_snapshot` (the latest alert's picture)."""
        base, device = f"{self.node}_camera_{slug(camera)}", self._camera_device(camera)
        state = f"{self.prefix}/cameras/{camera}/state"
        return [
            self._entity("sensor", f"{base}_last_recognized", "Last recognized", device,
                         state_topic=state, value_template="{{ value_json.last_recognized }}",
                         json_attributes_topic=state, icon="mdi:account-search"),
            self._entity("sensor", f"{base}_faces", "Faces", device, state_topic=state,
                         value_template="{{ value_json.faces }}", state_class="measurement",
                         icon="mdi:account-group"),
            self._entity("sensor", f"{base}_unknown", "Unknown faces", device, state_topic=state,
                         value_template="{{ value_json.unknown }}", state_class="measurement",
                         icon="mdi:account-question"),
            self._entity("image", f"{base}_snapshot", "Snapshot", device,
                         image_topic=f"{self.prefix}/cameras/{camera}/image",
                         content_type="image/jpeg"),
        ]

    # --- lifecycle ----------------------------------------------------------------------------
    def pending(self) -> int:
        """Messages not yet acknowledged by the broker."""
        with self._cond:
            return len(self._pending) + len(self._inflight)

    def oldest(self) -> float | None:
        """Monotonic time the oldest message not yet acknowledged was queued (None: none)."""
        with self._cond:
            self._settle()
            times = [m.at for m in self._inflight.values()]
            if self._pending:
                times.append(self._pending[0].at)
        return min(times) if times else None

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
                self._settle()
        return True

    def close(self, timeout: float | None = None) -> None:
        """Mark everyone away, deliver what is queued (up to `timeout` s, default
        `close_timeout`), publish "offline" and disconnect."""
        timeout = self.close_timeout if timeout is None else timeout
        if not self._closing:
            now = time.monotonic()
            with self._state:
                messages = self._states(*self.presence.leave(now), now)
            self._queue(messages)
        if not self.flush(timeout):
            log.error("MQTT: %d message(s) not delivered at shutdown", self.pending())
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._sender.join(1.0)
        if self._connected:
            info = self._client.publish(self.availability, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(min(timeout, 2.0))
            except (RuntimeError, ValueError):  # the connection went away meanwhile
                pass
        self._client.disconnect()
        self._client.loop_stop()


def _jpeg(image) -> bytes | None:  # noqa: ANN001  (uint8[H, W, 3] BGR)
    import cv2

    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return data.tobytes() if ok else None


def clear_retained(cfg: MqttConfig, names: Iterable[str], timeout: float = 10.0) -> int:
    """For an erasure: delete every retained topic that names one of `names`, whichever box
    published it: their presence states (`<prefix>/identities/<slug>/<box>`, and
    `<prefix>/identities/<slug>` of releases before boxes), their discovery configs (every
    box's, found by their state topic, and the one of releases before boxes), the cameras'
    latest messages naming them (as the identity or the candidate), the camera states naming
    them and the images of them (an empty retained message deletes one). Returns the topics
    cleared; SinkError when the broker cannot be reached within `timeout`."""
    import paho.mqtt.client as mqtt

    names = set(names)
    prefix = cfg.prefix.rstrip("/")
    slugs = {slug(n) for n in names}
    topics = {t for s in slugs for t in (
        f"{prefix}/identities/{s}", f"{cfg.discovery.prefix}/sensor/facemoe_{s}/config")}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"{cfg.client_id or 'facemoe'}-erase-{os.getpid()}")
    found: dict[str, bytes] = {}
    lock = threading.Lock()

    def on_message(client, userdata, msg) -> None:
        if msg.retain and msg.payload:
            with lock:
                found[msg.topic] = bytes(msg.payload)

    def names_them(topic: str, payload: bytes) -> list[str]:
        """The topics to clear for one retained message."""
        record = _json_object(payload)
        if record is None:
            return []
        if topic.endswith("/config"):
            state = str(record.get("state_topic", ""))
            return [topic] if any(state == f"{prefix}/identities/{s}" or state.startswith(
                f"{prefix}/identities/{s}/") for s in slugs) else []
        if not topic.startswith(f"{prefix}/cameras/"):
            return []
        if topic.endswith("/state"):
            out = []
            if record.get("snapshot_of") in names:
                out.append(topic.removesuffix("/state") + "/image")
            if record.get("last_recognized") in names or set(record.get("people") or ()) & names:
                out.append(topic)
            elif out:
                out.append(topic)
            return out
        return [topic] if {record.get("identity"), record.get("candidate")} & names else []

    client.on_message = on_message
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password.get_secret_value()
                               if cfg.password is not None else None)
    if cfg.tls is not None:
        client.tls_set(ca_certs=cfg.tls.ca_certs, certfile=cfg.tls.certfile,
                       keyfile=cfg.tls.keyfile, cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(cfg.tls.insecure)
    where = f"MQTT {cfg.host}:{cfg.port}"
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, keepalive=max(5, int(timeout)))
    except (OSError, ValueError) as exc:
        raise SinkError(f"{where}: cannot clear retained topics: {exc}") from exc
    client.loop_start()
    try:
        if not connected.wait(timeout) or refused:
            raise SinkError(f"{where}: cannot clear retained topics: "
                            f"{refused[0] if refused else 'no answer'}")
        wanted = [f"{cfg.discovery.prefix}/+/+/+/config", f"{prefix}/cameras/+",
                  f"{prefix}/cameras/+/state", *(f"{prefix}/identities/{s}/+" for s in slugs)]
        client.subscribe([(t, 1) for t in wanted])
        time.sleep(min(1.0, timeout))  # the broker sends the retained messages at once
        client.unsubscribe(wanted)
        with lock:
            for topic, payload in found.items():
                if topic.startswith(f"{prefix}/identities/"):
                    topics.add(topic)
                else:
                    topics.update(names_them(topic, payload))
        infos = [client.publish(t, b"", qos=1, retain=True) for t in sorted(topics)]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise SinkError(f"{where}: the broker did not confirm clearing {info.mid}")
    finally:
        client.disconnect()
        client.loop_stop()
    return len(topics)
