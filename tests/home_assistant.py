"""A real Home Assistant core for tests: installed from PyPI into a venv of its own (cached
outside the repository, so a rerun starts at once), started on a loopback port with a
minimal configuration, onboarded, and given the MQTT integration on a test's broker through
its config flow, as a user does in the UI.

`homeassistant==2024.3.3` is the newest core that installs on Python 3.11 (2024.4 needs
3.12); the other pins are what it needs there (docs: STACK.md "Home Assistant as a real MQTT
client"). The cache is `$FACEMOE_HA_CACHE`, else `$XDG_CACHE_HOME/facemoe-ha/<version>`
(default `~/.cache`). Where it cannot be installed (no network, no venv module) the tests skip
with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

HA_VERSION = "2024.3.3"
HA_PINS = [f"homeassistant=={HA_VERSION}", "paho-mqtt==1.6.1", "janus==1.0.0", "Pillow==10.2.0",
           "josepy<2"]
INSTALL_TIMEOUT_S = 1500  # measured here: 5 min 21 s on 2 busy cores


def cache_dir() -> Path:
    if os.environ.get("FACEMOE_HA_CACHE"):
        return Path(os.environ["FACEMOE_HA_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "facemoe-ha" / HA_VERSION


def ha_python() -> Path:
    """The cached core's Python, installed first if needed (pytest.skip where it cannot be)."""
    venv = cache_dir()
    hass = venv / "bin" / "python"
    if hass.exists() and (venv / ".complete").exists():
        return hass
    python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    if sys.version_info < (3, 11):
        pytest.skip(f"Home Assistant {HA_VERSION} needs Python 3.11")
    try:
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True,
                       timeout=300)
        subprocess.run([str(hass), "-m", "pip", "install", "-q", *HA_PINS], check=True,
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"")[-400:] if isinstance(exc.stderr, bytes) else (
            exc.stderr or "")[-400:]
        pytest.skip(f"cannot install Home Assistant {HA_VERSION} into {venv}: {tail!s}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot install Home Assistant {HA_VERSION} into {venv}: {exc}")
    (venv / ".complete").write_text(" ".join(HA_PINS) + "\n")
    return hass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HomeAssistant:
    """A running core in `folder` with the MQTT integration on `broker_port`."""

    def __init__(self, folder: Path, broker_port: int) -> None:
        self.python = ha_python()
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "configuration.yaml").write_text(
            "homeassistant:\n  name: FaceMoE test\n  time_zone: UTC\n  unit_system: metric\n"
            "  latitude: 0\n  longitude: 0\n  elevation: 0\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\n"
            "logger:\n  default: warning\n")
        self.log = (folder / "hass.log").open("ab")
        self.proc = subprocess.Popen([str(self.python), "-m", "homeassistant", "-c", str(folder)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.token = ""
        try:
            self._wait_up(240)
            self._onboard()
            self._add_mqtt(broker_port)
        except BaseException:
            self.stop()
            raise

    # --- HTTP -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, *, form: bool = False,
                timeout: float = 30):
        data, headers = None, {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
        return json.loads(text) if text else None

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"hass exited {self.proc.returncode}: {self.log_tail()}")
            try:
                self.request("GET", "/api/onboarding", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise AssertionError(f"Home Assistant did not answer in {timeout:g} s: {self.log_tail()}")

    def _onboard(self) -> None:
        client = self.url + "/"
        code = self.request("POST", "/api/onboarding/users", {
            "client_id": client, "name": "Test", "username": "test",
            "password": "test-password-1", "language": "en"})["auth_code"]
        token = self.request("POST", "/auth/token", {
            "grant_type": "authorization_code", "code": code, "client_id": client}, form=True)
        self.token = token["access_token"]

    def _add_mqtt(self, port: int) -> None:
        flow = self.request("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        for _ in range(5):
            if flow.get("type") == "create_entry":
                return
            if flow.get("type") != "form":
                raise AssertionError(f"MQTT config flow: {flow}")
            answer = {"broker": "127.0.0.1", "port": port} if flow["step_id"] == "broker" else {}
            flow = self.request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                                answer)
        raise AssertionError(f"MQTT config flow did not finish: {flow}")

    # --- what Home Assistant shows ----------------------------------------------------------
    def states(self) -> dict[str, dict]:
        return {s["entity_id"]: s for s in self.request("GET", "/api/states")}

    def state(self, entity_id: str) -> dict | None:
        try:
            return self.request("GET", f"/api/states/{entity_id}", timeout=5)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def registry(self) -> list[dict]:
        """The entity registry (what HA keeps of every entity, live or not) as last saved: the
        core saves it some seconds after a change, so wait for what you look for."""
        path = self.folder / ".storage" / "core.entity_registry"
        if not path.exists():
            return []
        return json.loads(path.read_text())["data"]["entities"]

    def wait(self, cond, timeout: float = 30.0, what: str = ""):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = cond()
            if last:
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; {self.log_tail()}")

    def watch(self, entity_id: str) -> StateWatch:
        """Every state `entity_id` takes from now on, as Home Assistant's event bus reports it
        (its websocket API, read by a client in the core's own venv: aiohttp)."""
        return StateWatch(self, entity_id)

    def log_tail(self) -> str:
        try:
            return (self.folder / "hass.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


_WATCH = r"""
import asyncio, json, sys
import aiohttp

async def main(url, token, entity):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url + "/api/websocket") as ws:
            await ws.receive_json()
            await ws.send_json({"type": "auth", "access_token": token})
            assert (await ws.receive_json())["type"] == "auth_ok"
            await ws.send_json({"id": 1, "type": "subscribe_events",
                                "event_type": "state_changed"})
            print(json.dumps({"subscribed": True}), flush=True)
            async for msg in ws:
                data = json.loads(msg.data)
                event = data.get("event", {}).get("data", {})
                if event.get("entity_id") == entity and event.get("new_state"):
                    new = event["new_state"]
                    print(json.dumps({"state": new["state"], "attributes": new["attributes"]}),
                          flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


class StateWatch:
    """The states one entity takes, in order (`states()`), read from Home Assistant's
    websocket API by a small client run with the core's Python."""

    def __init__(self, ha: HomeAssistant, entity_id: str) -> None:
        import threading

        self.seen: list[dict] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([str(ha.python), "-c", _WATCH, ha.url, ha.token, entity_id],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first = self.proc.stdout.readline()
        if '"subscribed"' not in first:
            self.proc.kill()
            raise AssertionError(f"state watch did not start: {first!r}")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.seen.append(json.loads(line))

    def states(self) -> list[str]:
        with self._lock:
            return [s["state"] for s in self.seen]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._thread.join(5)


if __name__ == "__main__":  # .ci/run: install the core into its cache while other tests run
    started = time.monotonic()
    try:
        python = ha_python()
    except pytest.skip.Exception as exc:
        print(f"Home Assistant not installed: {exc}")
        raise SystemExit(1) from None
    print(f"Home Assistant {HA_VERSION} ready in {python.parent.parent} "
          f"({time.monotonic() - started:.0f} s)")
