"""MQTT output the way Home Assistant, Frigate and Double Take users expect (paho-mqtt).

Topics under `prefix` (docs/events.md has the payloads):
  <prefix>/events                every message (`recognized` and `end`), JSON event records
  <prefix>/cameras/<camera>      retained: the camera's latest message
  <prefix>/identities/<slug>     retained: {"state": "present" | "away", "last_seen", ...}
  <prefix>/availability/<box>    retained "online"; "offline" on close and as the last will
and, opt-in, Home Assistant discovery configs (<discovery prefix>/sensor/facemoe_<box>/<id>/config)
that create a sensor per enrolled person (like Double Take's `sensor.double_take_<name>`) and per
camera, on a device per box.

Several boxes of a site share one broker: each has its own client id (`facemoe-<box>` unless
configured: two clients with one id throw each other off), availability topic and Home
Assistant device and entities (`sensor.facemoe_<box>_<name>`), so no box takes over another's.

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


def slug(name: str) -> str:
    """A topic level and Home Assistant object id for a name: lower-case [a-z0-9_], accents
    dropped ("Zoë Ünal" -> "zoe_unal")."""
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    s = re.sub(r"[^a-z0-9]+", "_", plain.lower()).strip("_")
    return s or "_"


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: str
    retain: bool
    at: float = field(default_factory=time.monotonic, compare=False)  # when it was queued


class MqttSink:
    """Publishes events to an MQTT broker (needs paho-mqtt: pip install 'facemoe-edge[mqtt]').

    `cameras` and `identities()` name the sensors announced by discovery (identities first
    seen later are announced when they are); `count(kind, n)` receives "disconnect" and
    "dropped" incidents (the daemon's metrics).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        box: str | None = None,
        cameras: Iterable[str] = (),
        identities: Callable[[], Iterable[str]] = lambda: (),
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
        self.client_id = cfg.client_id or f"facemoe-{self.box}"[:64]
        self.close_timeout = close_timeout
        self.availability = f"{self.prefix}/availability/{self.box}"
        self._cameras = list(cameras)
        self._identities = identities
        self._count = count or (lambda kind, n: None)
        self._cond = threading.Condition()
        self._pending: deque[_Message] = deque()
        self._inflight: dict[int, _Message] = {}
        self._acked: set[int] = set()
        self._connected = self._closing = self._rediscover = False
        self._announced: set[str] = set()  # discovery configs sent in this connection
        self._present: dict[str, set[tuple[str, int]]] = {}  # identity -> open (camera, track)
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
        with self._cond:
            self._connected = True
            self._rediscover = self.cfg.discovery.enabled
            self._cond.notify_all()

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
            with self._cond:
                self._settle()
                while not (self._connected and (self._rediscover or (
                        self._pending and len(self._inflight) < MAX_INFLIGHT))):
                    if self._closing:  # close() has waited for the queue as long as it may
                        return
                    self._cond.wait(0.5)
                    self._settle()
                rediscover, self._rediscover = self._rediscover, False
                msg = None if rediscover else self._pending.popleft()
            if rediscover:
                self._discover_all()
                continue
            self._discover_for(msg)
            info = self._client.publish(msg.topic, msg.payload, qos=self.cfg.qos,
                                        retain=msg.retain)
            if self.cfg.qos:
                with self._cond:  # paho holds it until acknowledged, across reconnects
                    self._inflight[info.mid] = msg
                    self._cond.notify_all()

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
        """Queue each event's messages: the event, its camera's state, its person's state."""
        if self._closing:
            raise SinkError("MQTT sink is closed")
        now = datetime.now().astimezone().isoformat(timespec="milliseconds")
        messages = []
        for ev in events:
            record = json.dumps(ev.to_json(), ensure_ascii=False)
            messages.append(_Message(f"{self.prefix}/events", record, False))
            messages.append(_Message(f"{self.prefix}/cameras/{ev.camera}", record, True))
            if ev.identity is not None:
                messages.append(self._identity_state(ev, now))
        self._queue(messages)

    def _identity_state(self, ev: Event, now: str) -> _Message:
        seen = self._present.setdefault(ev.identity, set())
        key = (ev.camera, ev.track_id)
        if ev.type == "end":
            seen.discard(key)
        else:
            seen.add(key)
        state = {"name": ev.identity, "state": "present" if seen else "away",
                 "camera": ev.camera, "score": round(float(ev.score), 6), "last_seen": now,
                 "event": ev.id, "snapshot": ev.snapshot}
        return _Message(f"{self.prefix}/identities/{slug(ev.identity)}",
                        json.dumps(state, ensure_ascii=False), True)

    # --- Home Assistant discovery -------------------------------------------------------------
    def _discover_all(self) -> None:
        """On every connection: the sensors of every camera and enrolled person."""
        try:
            names = list(self._identities())
        except Exception as exc:  # noqa: BLE001  (the gallery may be busy: they come later)
            log.warning("MQTT discovery: cannot list identities: %s", exc)
            names = []
        self._announced.clear()
        self._publish_configs([self.camera_sensor(c) for c in self._cameras]
                              + [self.identity_sensor(n) for n in names])

    def _discover_for(self, msg: _Message) -> None:
        """Announce the sensor of a message's camera or person (one enrolled or a camera
        added since the connection) before its first state."""
        if not self.cfg.discovery.enabled:
            return
        parts = msg.topic[len(self.prefix) + 1:].split("/", 1)
        if parts[0] == "cameras":
            self._publish_configs([self.camera_sensor(parts[1])])
        elif parts[0] == "identities":
            self._publish_configs([self.identity_sensor(json.loads(msg.payload)["name"])])

    def _publish_configs(self, configs: list[tuple[str, dict]]) -> None:
        for topic, config in configs:
            if topic not in self._announced:
                self._announced.add(topic)
                self._client.publish(topic, json.dumps(config, ensure_ascii=False), qos=1,
                                     retain=True)

    def _device(self) -> dict:
        return {"identifiers": [f"facemoe_{slug(self.box)}"],
                "name": f"FaceMoE Edge {self.box}", "manufacturer": "FaceMoE",
                "model": "FaceMoE Edge", "sw_version": __version__}

    def _sensor(self, object_id: str, name: str, state_topic: str, template: str,
                icon: str) -> tuple[str, dict]:
        object_id = object_id.replace("facemoe_", f"facemoe_{slug(self.box)}_", 1)
        config = {
            "name": name,
            "unique_id": object_id,
            # the entity id (sensor.<object_id>); Home Assistant 2025.10 replaced `object_id`
            "default_entity_id": f"sensor.{object_id}",
            "state_topic": state_topic,
            "value_template": template,
            "json_attributes_topic": state_topic,
            "availability_topic": self.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            "icon": icon,
            "device": self._device(),
        }
        node = f"facemoe_{slug(self.box)}"
        return f"{self.cfg.discovery.prefix}/sensor/{node}/{object_id}/config", config

    def identity_sensor(self, name: str) -> tuple[str, dict]:
        """Discovery topic and config of `sensor.facemoe_<box>_<name>`: present / away."""
        return self._sensor(f"facemoe_{slug(name)}", name,
                            f"{self.prefix}/identities/{slug(name)}",
                            "{{ value_json.state }}", "mdi:account")

    def camera_sensor(self, camera: str) -> tuple[str, dict]:
        """Discovery topic and config of `sensor.facemoe_<box>_camera_<camera>`: the last person
        seen there (or "unknown")."""
        return self._sensor(f"facemoe_camera_{slug(camera)}", f"{camera} face",
                            f"{self.prefix}/cameras/{camera}",
                            "{{ value_json.identity or 'unknown' }}", "mdi:cctv")

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
        """Deliver what is queued (up to `timeout` s, default `close_timeout`), publish
        "offline" and disconnect."""
        timeout = self.close_timeout if timeout is None else timeout
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


def clear_retained(cfg: MqttConfig, names: Iterable[str], timeout: float = 10.0) -> int:
    """For an erasure: delete the retained state topic (`<prefix>/identities/<slug>`) and
    the discovery configs of each of `names`: every box's (found among the retained configs
    by their state topic) and the one of releases before boxes (an empty retained message
    deletes one). Returns the topics cleared; SinkError when the broker cannot be reached
    within `timeout`."""
    import paho.mqtt.client as mqtt

    prefix = cfg.prefix.rstrip("/")
    topics = [t for n in names for t in (
        f"{prefix}/identities/{slug(n)}",
        f"{cfg.discovery.prefix}/sensor/facemoe_{slug(n)}/config")]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"{cfg.client_id or 'facemoe'}-erase-{os.getpid()}")
    states, per_box = {f"{prefix}/identities/{slug(n)}" for n in names}, set()

    def on_message(client, userdata, msg) -> None:  # a retained discovery config
        try:
            config = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(config, dict) and config.get("state_topic") in states:
            per_box.add(msg.topic)

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
        client.subscribe(f"{cfg.discovery.prefix}/sensor/+/+/config", qos=1)
        time.sleep(min(1.0, timeout))  # the broker sends the retained configs at once
        client.unsubscribe(f"{cfg.discovery.prefix}/sensor/+/+/config")
        topics += sorted(per_box - set(topics))
        infos = [client.publish(t, b"", qos=1, retain=True) for t in topics]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise SinkError(f"{where}: the broker did not confirm clearing {info.mid}")
    finally:
        client.disconnect()
        client.loop_stop()
    return len(topics)
