"""The MQTT event sink against a real local broker (Debian's mosquitto on 127.0.0.1)."""

import json
import shutil
import socket
import subprocess
import threading
import time

import pytest

from app.records import Event
from app.sinks import MqttSink

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (the mqtt extra)")
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if shutil.which("/usr/sbin/mosquitto") else None)


@pytest.fixture()
def broker(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("no mosquitto broker installed (Debian package mosquitto)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(5)


def test_events_are_published_as_design_json(broker):
    received: list[dict] = []
    got = threading.Event()
    args = (mqtt.CallbackAPIVersion.VERSION2,) if hasattr(mqtt, "CallbackAPIVersion") else ()
    sub = mqtt.Client(*args)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a, **k: subscribed.set()

    def on_message(_client, _userdata, msg):
        received.append(json.loads(msg.payload))
        if len(received) == 2:
            got.set()

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker)
    sub.subscribe("facemoe/events", qos=1)
    sub.loop_start()
    try:
        assert subscribed.wait(10)
        sink = MqttSink("127.0.0.1", broker, "facemoe/events")
        events = [Event("cam", i, name, 0.5 + i / 10, 1.0, 2.0, 10, (1.0, 2.0, 3.0, 4.0), "m@1")
                  for i, name in ((1, "Ada"), (2, None))]
        sink.write(events)
        assert got.wait(10), received
        sink.close()
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert received == [e.to_json() for e in events]
