"""The MQTT sink against real local brokers: each test starts its own mosquitto (Debian's
package) on a free 127.0.0.1 port, with password authentication, TLS (a self-signed
certificate made here with `cryptography`) or persistence, and stops it when done."""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from app.config import AppConfig
from app.mqtt import MqttSink
from app.records import Event, new_event_id
from tests.gallery_helpers import event as shared_event

pytestmark = pytest.mark.unit

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (the mqtt extra)")
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if shutil.which("/usr/sbin/mosquitto") else None)
PASSWD = shutil.which("mosquitto_passwd")
REPO_ROOT = Path(__file__).resolve().parent.parent
# the keys Home Assistant documents for an MQTT sensor (integrations/sensor.mqtt) that a
# discovery config here may use, and those of its `device` map
HA_SENSOR_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "device", "device_class", "enabled_by_default", "encoding", "entity_category",
    "entity_picture", "expire_after", "force_update", "icon", "json_attributes_template",
    "json_attributes_topic", "last_reset_value_template", "name", "object_id",
    "options", "payload_available", "payload_not_available", "platform",
    "suggested_display_precision", "qos", "state_class", "state_topic", "unique_id",
    "unit_of_measurement", "value_template", "default_entity_id",
}
HA_IMAGE_KEYS = {  # integrations/image.mqtt
    "availability", "availability_mode", "availability_template", "availability_topic",
    "content_type", "device", "enabled_by_default", "encoding", "entity_category",
    "image_encoding", "image_topic", "json_attributes_template", "json_attributes_topic", "name",
    "object_id", "payload_available", "payload_not_available", "unique_id", "url_template",
    "url_topic", "default_entity_id",
}
HA_DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto process on 127.0.0.1 with the given extra config lines."""

    def __init__(self, folder: Path, extra: list[str] = ()) -> None:
        if MOSQUITTO is None:
            pytest.skip("no mosquitto broker installed (Debian package mosquitto)")
        self.port, self.folder, self.proc = free_port(), folder, None
        self.conf = folder / "mosquitto.conf"
        # run as this user (mosquitto started by root switches to user `mosquitto`, which could
        # not read the test's files)
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", *extra]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=(self.folder / "broker.log").open("a"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not start: {(self.folder / 'broker.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture()
def brokers():
    started: list[Broker] = []

    def make(folder: Path, extra: list[str] = ()) -> Broker:
        broker = Broker(folder, extra)
        started.append(broker)
        return broker.start()

    yield make
    for b in started:
        b.stop()


class Watcher:
    """A subscriber that records (topic, payload, retained) of everything under `topics`."""

    def __init__(self, port: int, topics: list[str], *, client_id: str = "", durable: bool = False,
                 tls_ca: Path | None = None, auth: tuple[str, str] | None = None) -> None:
        args = (mqtt.CallbackAPIVersion.VERSION2,) if hasattr(mqtt, "CallbackAPIVersion") else ()
        self.client = mqtt.Client(*args, client_id=client_id, clean_session=not durable)
        self.messages: list[tuple[str, str, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.reconnect_delay_set(0.1, 0.5)

        def on_connect(client, userdata, flags, rc, properties=None):
            client.subscribe([(t, 1) for t in topics])

        def on_message(client, userdata, msg):
            with self.lock:
                self.messages.append((msg.topic, msg.payload.decode(errors="replace"),  # images
                                      bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a, **k: self.subscribed.set()
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscription not acknowledged"

    def payloads(self, topic: str) -> list[str]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait(self, cond, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if cond(list(self.messages)):
                    return
            time.sleep(0.05)
        raise AssertionError(f"timed out; received {self.messages}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def events_of(w: Watcher, prefix: str = "facemoe") -> list[dict]:
    return [json.loads(p) for p in w.payloads(f"{prefix}/events")]


def retained_topics(port: int) -> set[str]:
    """The topics the broker retains a message on now (a new subscriber gets them at once)."""
    watcher = Watcher(port, ["homeassistant/#", "facemoe/#"])
    time.sleep(1.0)
    watcher.close()
    return {t for t, p, _ in watcher.messages if p}


def mqtt_config(port: int, **extra) -> AppConfig:
    cfg = {"daemon": {"mqtt": {"host": "127.0.0.1", "port": port, "keepalive_s": 5,
                               "reconnect_max_s": 1, **extra}}}
    return AppConfig.model_validate(cfg)


def event(i: int, name: str | None = "Lin-Manuel Miranda", kind: str = "end") -> Event:
    """The tests' event (`tests.gallery_helpers.event`) at the door, a new id each time."""
    return shared_event(i, name, camera="door", score=0.7, id=new_event_id(), type=kind,
                        time="2026-12-01T12:00:00.000+00:00", candidate="Lin-Manuel Miranda",
                        candidate_score=0.7)


@pytest.mark.slow
def test_password_authentication_topics_state_and_availability(tmp_path, brokers, monkeypatch):
    if PASSWD is None:
        pytest.skip("mosquitto_passwd not installed (Debian package mosquitto)")
    passwords = tmp_path / "passwd"
    subprocess.run([PASSWD, "-b", "-c", str(passwords), "facemoe", "s3cret pass"], check=True)
    passwords.chmod(0o600)
    broker = brokers(tmp_path, ["allow_anonymous false", f"password_file {passwords}"])
    watcher = Watcher(broker.port, ["facemoe/#"], auth=("facemoe", "s3cret pass"))
    monkeypatch.setenv("FACEMOE_MQTT_PASSWORD", "s3cret pass")
    cfg = mqtt_config(broker.port, username="facemoe", password="{FACEMOE_MQTT_PASSWORD}",
                      client_id="door-box", away_after_s=0.5)
    assert "s3cret" not in repr(cfg)  # the secret is never printed
    sink = MqttSink(cfg.daemon.mqtt, box="door")
    try:
        early = event(7, kind="recognized")
        sink.write([early])
        lin = "facemoe/identities/lin_manuel_miranda/door"  # this box's view of him
        watcher.wait(lambda m: any(t == lin for t, _, _ in m))
        present = json.loads(watcher.payloads(lin)[-1])
        assert present["state"] == "present" and present["event"] == early.id
        final, stranger = replace(early, type="end", end=4.0), event(8, None)
        sink.write([final, stranger])
        watcher.wait(lambda m: len([t for t, _, _ in m if t == "facemoe/events"]) == 3)
        assert events_of(watcher) == [e.to_json() for e in (early, final, stranger)]
        assert json.loads(watcher.payloads(lin)[-1])["state"] == "present"  # away_after_s
        watcher.wait(lambda m: json.loads([p for t, p, _ in m if t == lin][-1])["state"]
                     == "away", 5)
        away = json.loads(watcher.payloads(lin)[-1])
        assert away["state"] == "away" and away["name"] == "Lin-Manuel Miranda"
        assert dt.datetime.fromisoformat(away["last_seen"]).tzinfo is not None
        assert watcher.payloads("facemoe/availability/door")[-1] == "online"
        assert sink.flush(5) and sink.pending() == 0
    finally:
        sink.close()
    watcher.wait(lambda m: m[-1][:2] == ("facemoe/availability/door", "offline"))
    watcher.close()
    # retained for whoever subscribes later: the camera's last message, the person's state
    late = Watcher(broker.port, ["facemoe/cameras/#", "facemoe/identities/#"],
                   auth=("facemoe", "s3cret pass"))
    late.wait(lambda m: len(m) == 3)  # the camera's last message and state, Lin's state
    assert all(retained for _, _, retained in late.messages)
    assert json.loads(late.payloads("facemoe/cameras/door")[0])["track_id"] == 8
    assert json.loads(late.payloads("facemoe/cameras/door/state")[0])["faces"] == 0
    late.close()

    # a wrong password: refused, logged, nothing delivered, the messages stay buffered
    monkeypatch.setenv("FACEMOE_MQTT_PASSWORD", "wrong")
    bad = MqttSink(mqtt_config(broker.port, username="facemoe",
                               password="{FACEMOE_MQTT_PASSWORD}").daemon.mqtt)
    try:
        bad.write([event(9)])  # the event, the camera's message and state, the person's
        assert not bad.flush(2) and bad.pending() == 4
    finally:
        bad.close(timeout=0.1)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "broker.crt", folder / "broker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate(tmp_path, brokers):
    cert, key = _self_signed(tmp_path)
    broker = brokers(tmp_path, [f"cafile {cert}", f"certfile {cert}", f"keyfile {key}",
                                "allow_anonymous true"])
    watcher = Watcher(broker.port, ["facemoe/events"], tls_ca=cert)
    sink = MqttSink(mqtt_config(broker.port, tls={"ca_certs": str(cert)}).daemon.mqtt)
    try:
        sink.write([event(1)])
        watcher.wait(lambda m: len(m) == 1)
        assert events_of(watcher)[0]["track_id"] == 1
    finally:
        sink.close()
        watcher.close()
    # the system CAs do not trust this broker: nothing is delivered
    untrusting = MqttSink(mqtt_config(broker.port, tls={}).daemon.mqtt)
    try:
        untrusting.write([event(2)])
        assert not untrusting.flush(1.5)
    finally:
        untrusting.close(timeout=0.1)


def test_last_will_marks_a_killed_daemon_offline(tmp_path, brokers):
    broker = brokers(tmp_path, ["allow_anonymous true"])
    watcher = Watcher(broker.port, ["facemoe/availability/#"])
    code = ("import sys, time; from app.config import MqttConfig; from app.mqtt import MqttSink; "
            f"MqttSink(MqttConfig(host='127.0.0.1', port={broker.port}, keepalive_s=5), "
            "box='b1'); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        watcher.wait(lambda m: ("facemoe/availability/b1", "online", False) in m, 20)
        os.kill(proc.pid, signal.SIGKILL)  # no clean disconnect: the broker sends the will
        watcher.wait(lambda m: m[-1][1] == "offline", 15)
    finally:
        proc.kill()
        proc.wait(5)
        watcher.close()


def test_home_assistant_discovery_configs(tmp_path, brokers):
    broker = brokers(tmp_path, ["allow_anonymous true"])
    watcher = Watcher(broker.port, ["homeassistant/#"])
    sink = MqttSink(mqtt_config(broker.port, discovery={"enabled": True}).daemon.mqtt,
                    box="hall", cameras=["door"], identities=lambda: ["Lin-Manuel Miranda"])
    try:
        watcher.wait(lambda m: len(m) == 5)  # on connecting: the camera's 4, the person's
        sink.write([event(1, "Zoë Ünal")])  # a person enrolled after the start
        watcher.wait(lambda m: len(m) == 6)
    finally:
        sink.close()
        watcher.close()
    configs = {t: json.loads(p) for t, p, _ in watcher.messages}
    camera = "facemoe_hall_camera_door"
    assert set(configs) == {
        f"homeassistant/sensor/facemoe_hall/{camera}_last_recognized/config",
        f"homeassistant/sensor/facemoe_hall/{camera}_faces/config",
        f"homeassistant/sensor/facemoe_hall/{camera}_unknown/config",
        f"homeassistant/image/facemoe_hall/{camera}_snapshot/config",
        "homeassistant/sensor/facemoe_hall/facemoe_hall_lin_manuel_miranda/config",
        "homeassistant/sensor/facemoe_hall/facemoe_hall_zoe_unal/config",
    }
    for topic, c in configs.items():
        component = topic.split("/")[1]
        allowed = HA_SENSOR_KEYS if component == "sensor" else HA_IMAGE_KEYS
        assert set(c) <= allowed, set(c) - allowed
        assert set(c["device"]) <= HA_DEVICE_KEYS
        assert {"name", "unique_id", "availability_topic", "device"} <= set(c)
        assert c["availability_topic"] == "facemoe/availability/hall"
        # the entity id both ways: object_id (cores before 2025.10), default_entity_id (after)
        assert c["default_entity_id"] == f"{component}.{c['object_id']}"
        assert c["object_id"] == c["unique_id"] == topic.split("/")[3]
        assert (c["payload_available"], c["payload_not_available"]) == ("online", "offline")
        if component == "sensor":
            assert c["state_topic"].startswith("facemoe/") and "{{" in c["value_template"]
        else:
            assert c["image_topic"] == "facemoe/cameras/door/image"
    assert len({c["unique_id"] for c in configs.values()}) == 6
    lin = configs["homeassistant/sensor/facemoe_hall/facemoe_hall_lin_manuel_miranda/config"]
    assert lin["name"] == "Lin-Manuel Miranda" and lin["device"]["identifiers"] == ["facemoe_hall"]
    assert lin["default_entity_id"] == "sensor.facemoe_hall_lin_manuel_miranda"
    assert lin["state_topic"] == lin["json_attributes_topic"] == \
        "facemoe/identities/lin_manuel_miranda/hall"
    door = configs[f"homeassistant/sensor/facemoe_hall/{camera}_faces/config"]["device"]
    assert door["identifiers"] == [camera] and door["via_device"] == "facemoe_hall"
    late = Watcher(broker.port, ["homeassistant/#"])  # retained for Home Assistant restarts
    late.wait(lambda m: len(m) == 6)
    assert all(retained for _, _, retained in late.messages)
    late.close()


def test_broker_restart_mid_run_loses_no_event(tmp_path, brokers):
    """Events written while the broker is down wait in the sink and arrive after it restarts;
    the subscriber keeps a durable session in the broker's persistence file."""
    broker = brokers(tmp_path, ["allow_anonymous true", "persistence true",
                                f"persistence_location {tmp_path}/"])
    watcher = Watcher(broker.port, ["facemoe/events"], client_id="watcher", durable=True)
    incidents: list[tuple[str, int]] = []
    sink = MqttSink(mqtt_config(broker.port).daemon.mqtt,
                    count=lambda kind, n: incidents.append((kind, n)))
    try:
        events = [event(i, None) for i in range(60)]
        for ev in events[:20]:
            sink.write([ev])
        assert sink.flush(10)
        broker.stop()
        for ev in events[20:40]:  # the broker is down: buffered
            sink.write([ev])
            time.sleep(0.02)
        time.sleep(1.0)
        assert sink.pending() > 0
        broker.start()
        for ev in events[40:]:
            sink.write([ev])
        assert sink.flush(30), f"{sink.pending()} not delivered"
        want = {e.id for e in events}
        watcher.wait(lambda m: want <= {json.loads(p)["id"] for t, p, _ in m}, 30)
    finally:
        sink.close()
        watcher.close()
    assert ("disconnect", 1) in incidents and sink.disconnects >= 1 and sink.dropped == 0


def test_a_full_buffer_drops_the_oldest_and_counts_them(tmp_path, caplog):
    port = free_port()  # nothing listens yet
    incidents: list[tuple[str, int]] = []
    sink = MqttSink(mqtt_config(port, buffer=6).daemon.mqtt,
                    count=lambda kind, n: incidents.append((kind, n)))
    try:
        # 2 messages each (the event, the camera's latest message), the camera's state
        sink.write([event(i, None) for i in range(5)])
        assert sink.dropped == 5 and incidents == [("dropped", 5)] and sink.pending() == 6
        deadline = time.monotonic() + 10
        while "cannot connect" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"MQTT 127.0.0.1:{port}: cannot connect" in caplog.text
        assert "MQTT buffer full (6 messages): 5 oldest dropped" in caplog.text
        broker = Broker(tmp_path, ["allow_anonymous true"])
        broker.conf.write_text(broker.conf.read_text().replace(str(broker.port), str(port)))
        broker.port = port
        broker.start()
        try:
            assert sink.flush(15)  # the 6 newest messages
        finally:
            broker.stop()
    finally:
        sink.close(timeout=0.1)


def test_two_boxes_on_one_broker_keep_their_own_identity(tmp_path, brokers):
    """Two boxes with the default settings (only daemon.box differs): each connects with a
    client id of its own (one id would make the broker throw the other off, over and over),
    has its own availability topic and its own Home Assistant device and entities."""
    broker = brokers(tmp_path, ["allow_anonymous true"])
    watcher = Watcher(broker.port, ["facemoe/availability/#", "homeassistant/#"])
    cfg = mqtt_config(broker.port, discovery={"enabled": True}).daemon.mqtt
    boxes = [MqttSink(cfg, box=box, cameras=[cam], identities=lambda: ["Ada"])
             for box, cam in (("box-a", "door"), ("box-b", "yard"))]
    try:
        assert [b.client_id for b in boxes] == ["facemoe-box-a", "facemoe-box-b"]
        watcher.wait(lambda m: len([t for t, _, _ in m if t.startswith("homeassistant/")]) == 10)
        for b, cam in zip(boxes, ("door", "yard"), strict=True):
            b.write([replace(event(1, "Ada"), camera=cam)])
        assert all(b.flush(5) for b in boxes)
        time.sleep(2)  # a client id clash shows as disconnects within a keepalive or two
        assert [b.disconnects for b in boxes] == [0, 0]
    finally:
        for b in boxes:
            b.close()
    watcher.wait(lambda m: [p for t, p, _ in m if t.startswith("facemoe/availability/")][-2:]
                 == ["offline", "offline"])
    watcher.close()
    avail = {t for t, _, _ in watcher.messages if t.startswith("facemoe/availability/")}
    assert avail == {"facemoe/availability/box-a", "facemoe/availability/box-b"}
    configs = [json.loads(p) for t, p, _ in watcher.messages if t.startswith("homeassistant/")]
    ada = sorted(c["default_entity_id"] for c in configs if c["name"] == "Ada")
    assert ada == ["sensor.facemoe_box_a_ada", "sensor.facemoe_box_b_ada"]
    assert len({c["unique_id"] for c in configs}) == len(configs) == 10
    assert {c["device"]["identifiers"][0] for c in configs} == {
        "facemoe_box_a", "facemoe_box_b", "facemoe_box_a_camera_door", "facemoe_box_b_camera_yard"}
    assert "already connected" not in (tmp_path / "broker.log").read_text()  # no id clash


def test_erasure_clears_every_retained_topic_naming_the_person(tmp_path, brokers):
    """`clear_retained` (the erasure service's MQTT step) finds each box's retained sensor of
    the person by its state topic and deletes it with each box's state topic of the person and
    the camera's latest message naming them; other people's stay."""
    from app.mqtt import clear_retained

    broker = brokers(tmp_path, ["allow_anonymous true"])
    cfg = mqtt_config(broker.port, discovery={"enabled": True}).daemon.mqtt
    for box in ("box-a", "box-b"):
        sink = MqttSink(cfg, box=box, identities=lambda: ["Ada", "Bob"])
        try:
            sink.write([event(2, "Bob"), replace(event(1, "Ada"), candidate="Ada")])
            assert sink.flush(5)
        finally:
            sink.close()
    topics = ["homeassistant/#", "facemoe/identities/#", "facemoe/cameras/#"]
    before = Watcher(broker.port, topics)
    # 2 boxes x 6 entities (Ada, Bob, 4 of the camera), 2 x 2 person states, the camera's
    # latest message (Ada's) and state
    before.wait(lambda m: len(m) == 18)
    before.close()
    assert clear_retained(cfg, ["Ada"]) == 7  # 2 box configs, 2 states, 2 legacy, the camera's
    after = Watcher(broker.port, topics)
    time.sleep(1.0)
    after.close()
    left = {t for t, p, _ in after.messages if p}
    camera = ["camera_door_last_recognized", "camera_door_faces", "camera_door_unknown"]
    assert left == {"facemoe/identities/bob/box-a", "facemoe/identities/bob/box-b",
                    "facemoe/cameras/door/state"} | {
        f"homeassistant/sensor/facemoe_{b}/facemoe_{b}_{s}/config"
        for b in ("box_a", "box_b") for s in ("bob", *camera)} | {
        f"homeassistant/image/facemoe_{b}/facemoe_{b}_camera_door_snapshot/config"
        for b in ("box_a", "box_b")}


def test_presence_follows_open_tracks_and_goes_away_after_the_set_time():
    """Present from a track's `recognized` or `seen` (the cooldown's silent match) to its
    end and `away_after_s` more; a camera's last recognized person resets after it too."""
    from app.mqtt import Presence

    p = Presence(away_after_s=5.0)
    p.update(event(1, kind="recognized"), 0.0)
    p.update(event(2, kind="seen"), 1.0)  # a second track in the alert cooldown
    lin = "Lin-Manuel Miranda"
    assert p.state(lin, 1.0) == "present" and p.camera("door")["faces"] == 2
    p.update(event(1), 2.0)
    assert p.state(lin, 30.0) == "present"  # track 2 is still open, however long
    p.update(event(3, None, kind="recognized"), 3.0)  # an unknown face announced
    assert p.camera("door") == {"last_recognized": lin, "faces": 2, "unknown": 1,
                                "people": [lin]}
    p.update(event(2), 10.0)
    p.update(event(3, None), 10.0)
    assert p.state(lin, 14.9) == "present" and p.due(14.9) == (set(), set())
    assert p.due(15.0) == ({lin}, {"door"})
    assert p.state(lin, 15.0) == "away" and p.camera("door")["last_recognized"] == "none"


def test_a_person_who_leaves_the_gallery_leaves_no_retained_topic(tmp_path, brokers):
    """A running box whose list of people loses a name (renamed, removed) clears its entity,
    its state and the camera's latest message naming them; a box started later clears what
    an earlier run left for a name no longer enrolled."""
    broker = brokers(tmp_path, ["allow_anonymous true"])
    cfg = mqtt_config(broker.port, discovery={"enabled": True}).daemon.mqtt
    people = ["Ada", "Bob"]
    sink = MqttSink(cfg, box="hall", cameras=["door"], identities=lambda: list(people))
    config = "homeassistant/sensor/facemoe_hall/facemoe_hall_{}/config"
    try:
        sink.write([replace(event(1, "Ada"), candidate="Ada"), event(2, "Bob")])
        sink.write([replace(event(3, "Ada"), candidate="Ada")])
        assert sink.flush(5)
        people.remove("Ada")  # renamed or removed while the box runs
        watcher = Watcher(broker.port, ["homeassistant/#", "facemoe/#"])
        gone = {config.format("ada"), "facemoe/identities/ada/hall", "facemoe/cameras/door"}
        watcher.wait(lambda m: all(dict((t, p) for t, p, _ in m).get(t, "x") == ""
                                   for t in gone), 10)
        watcher.close()
    finally:
        sink.close()
    left = retained_topics(broker.port)
    assert config.format("bob") in left and "facemoe/identities/bob/hall" in left
    assert not [t for t in left if "ada" in t]
    # Bob leaves while no box runs: the next run clears what the last one left of him
    sink = MqttSink(cfg, box="hall", cameras=["door"], identities=lambda: ["Cy"])
    try:
        time.sleep(2.5)
        assert sink.flush(5)
    finally:
        sink.close()
    left = retained_topics(broker.port)
    assert not [t for t in left if "bob" in t] and config.format("cy") in left
