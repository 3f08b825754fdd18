"""Real services a test starts, restarts and stops itself: a throwaway PostgreSQL cluster (the
Debian `postgresql` package's binaries, as .ci/postgres.sh uses them) and a mosquitto broker.
Each skips the test with a reason when the service cannot be started here."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


class Postgres:
    """A PostgreSQL cluster of its own (files in a temporary folder) on a free 127.0.0.1 port
    (trust auth, user `facemoe`, database `facemoe`), run as user `postgres` when the tests run
    as root (initdb refuses root).
    `restart()` is `pg_ctl restart -m fast`: every connection is cut."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip("no PostgreSQL server binaries (Debian package postgresql; "
                        ".ci/postgres.sh installs it)")
        pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e .[dev])")
        self.bin, self.port = bindir, free_port()
        # in /tmp, not under pytest's tmp_path (mode 0700: user postgres could not enter it)
        self.dir = Path(tempfile.mkdtemp(prefix="facemoe-pg-"))
        self.runas: list[str] = []
        if os.geteuid() == 0:
            try:
                shutil.chown(self.dir, "postgres")
            except (LookupError, OSError) as exc:
                shutil.rmtree(self.dir, ignore_errors=True)
                pytest.skip(f"cannot run PostgreSQL as user postgres: {exc}")
            self.runas = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql+psycopg://facemoe@127.0.0.1:{self.port}/facemoe"
        r = self._run("initdb", "-D", str(self.dir / "data"), "-U", "facemoe", "--auth=trust",
                      "-E", "UTF8", timeout=120)
        if r.returncode != 0:
            self.close()
            pytest.skip(f"initdb failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        self.start()
        r = self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "facemoe",
                      "facemoe")
        if r.returncode != 0:
            self.close()
            pytest.skip(f"createdb failed: {r.stderr.strip()}")

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.runas, str(self.bin / tool), *args], capture_output=True,
                              text=True, timeout=timeout)

    def _ctl(self, *args: str) -> subprocess.CompletedProcess:
        return self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                         "-w", "-t", "30", *args)

    def start(self) -> None:
        r = self._ctl("-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
                      "-c fsync=off", "start")
        if r.returncode != 0:
            log = (self.dir / "log").read_text()[-500:] if (self.dir / "log").exists() else ""
            self.close()
            pytest.skip(f"PostgreSQL did not start: {r.stderr.strip()} {log}")

    def restart(self) -> float:
        """`pg_ctl restart -m fast`; the seconds it took."""
        t = time.monotonic()
        r = self._ctl("-m", "fast", "restart")
        assert r.returncode == 0, r.stderr
        return time.monotonic() - t

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def close(self) -> None:
        """Stop the server and delete its files."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def sql(self, query: str) -> list[tuple]:
        """Rows of one query on a fresh connection."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="facemoe",
                             dbname="facemoe", connect_timeout=5) as conn:
            return list(conn.execute(query).fetchall())


MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if shutil.which("/usr/sbin/mosquitto") else None)


class Mosquitto:
    """A mosquitto broker on a free 127.0.0.1 port, run as this user, anonymous clients;
    `persistent`: sessions and queued messages survive a restart (persistence file in
    `folder`)."""

    def __init__(self, folder: Path, persistent: bool = False) -> None:
        if MOSQUITTO is None:
            pytest.skip("no mosquitto broker installed (Debian package mosquitto)")
        self.port, self.folder, self.proc = free_port(), folder, None
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        extra = f"persistence true\npersistence_location {folder}/\n" if persistent else ""
        self.conf.write_text(f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\n"
                             f"allow_anonymous true\n{extra}")
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=(self.folder / "broker.log").open("a"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.skip(f"mosquitto did not start: {(self.folder / 'broker.log').read_text()[-300:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        return (self.folder / "broker.log").read_text()
