"""Real Redis and PostgreSQL servers for the tests.

`.ci/run` installs the Debian packages, starts one server of each and exports their URLs
(SEEKSERVE_TEST_REDIS_URL, SEEKSERVE_TEST_DATABASE_URL). Run without those, the fixtures start private
servers from the installed binaries in a temporary folder. Where the binaries are missing the tests that
need them are skipped, except when SEEKSERVE_REQUIRE_SERVICES=1 (set by .ci/run): then they fail."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def missing(what: str) -> None:
    if os.environ.get("SEEKSERVE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is required (SEEKSERVE_REQUIRE_SERVICES=1) but not installed")
    pytest.skip(f"{what} is not installed (apt-get install redis-server postgresql, or run .ci/run)")


class RedisServer:
    """A private redis-server on a loopback port; `stop()`/`start()` simulate an outage."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            missing("redis-server")
        self.workdir, self.port = workdir, free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found and "/usr/lib/postgresql" in os.path.realpath(found):
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else found


class PostgresServer:
    """A private PostgreSQL cluster (initdb in a temp folder, trust auth on loopback). As root it runs as the
    `postgres` user, because the server refuses to run as root."""

    def __init__(self, workdir: Path) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            missing("PostgreSQL (initdb, pg_ctl)")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.data, self.port = workdir / "pgdata", free_port()
        self.url = f"postgresql+psycopg://seekserve@127.0.0.1:{self.port}/seekserve"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            workdir.chmod(0o777)

    def start(self) -> None:
        if not self.data.exists():
            subprocess.run([*self._as, self.initdb, "-D", str(self.data), "-U", "seekserve", "--auth=trust",
                            "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        subprocess.run([*self._as, self.pg_ctl, "-D", str(self.data), "-o", opts, "-w", "-l",
                        str(self.data.parent / "pg.log"), "start"], check=True, capture_output=True)
        wait_port(self.port)
        deadline = time.monotonic() + 20
        import psycopg

        while True:
            try:
                with psycopg.connect(f"host=127.0.0.1 port={self.port} user=seekserve dbname=postgres",
                                     autocommit=True) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname='seekserve'").fetchone()
                    if not exists:
                        conn.execute("CREATE DATABASE seekserve")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run([*self._as, self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis server (shared by the session; tests use their own key prefixes)."""
    if os.environ.get("SEEKSERVE_TEST_REDIS_URL"):
        yield os.environ["SEEKSERVE_TEST_REDIS_URL"]
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy URL of a real PostgreSQL database."""
    if os.environ.get("SEEKSERVE_TEST_DATABASE_URL"):
        yield os.environ["SEEKSERVE_TEST_DATABASE_URL"]
        return
    # not under pytest's temp root: that is private to root, and the server runs as `postgres`
    workdir = Path(tempfile.mkdtemp(prefix="seekserve-pg-"))
    server = PostgresServer(workdir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_ready(base: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 120.0) -> None:
    """Wait until a `seekserve serve` subprocess answers /ready with 200; fail with its log if it exits or
    takes longer than `timeout`."""
    import httpx

    def printed() -> str:
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited early ({proc.returncode}):\n{printed()}"
        assert time.monotonic() < deadline, f"the server was not ready within {timeout:.0f} s:\n{printed()}"
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
