"""Kafka sync end to end, as operators run it: `seekserve serve --site bank-a` subprocesses publish to a real
Kafka-protocol broker (Tansu), `seekserve sync consume --site bank-b` subprocesses ingest into another store.
The broker is killed mid-test while requests keep being answered, seekserve restarts during the outage, the
broker comes back: bank-b ends with every one of bank-a's usage and audit events exactly once, and bank-a's
audit chain verifies in bank-b's store. (Tansu's memory storage forgets its topics when killed, so bank-b
also consumes once before the outage: the events delivered then are gone from the broker afterwards.)"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from seekserve.store.audit import AuditLog
from seekserve.store.db import Database
from tests.api.conftest import free_port
from tests.gateway.broker import TansuBroker
from tests.services import wait_ready

MODEL = "seekserve-tiny"
SITE_A, SITE_B = "bank-a", "bank-b"
NUM_BEFORE, NUM_DURING, NUM_AFTER_RESTART = 4, 3, 3   # requests: broker up / broker down / after restart
CONSUME_SUMMARY = re.compile(r"read (\d+) messages: (\d+) events stored, (\d+) already stored, "
                             r"(\d+) own-site skipped, (\d+) malformed")


def clean_env() -> dict[str, str]:
    """The caller's SEEKSERVE_* settings must not leak into the subprocesses (flags > env > file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEKSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Server:
    """One `seekserve serve` process of site bank-a."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str, log_path: Path) -> None:
        self.proc, self.base, self.log_path = proc, base, log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def chat(self, num: int, tag: str) -> None:
        """`num` chat requests, one at a time; each must succeed whatever Kafka's state."""
        with httpx.Client(base_url=self.base, timeout=60) as client:
            for i in range(num):
                r = client.post("/v1/chat/completions", json={
                    "model": MODEL, "max_tokens": 2, "temperature": 0,
                    "messages": [{"role": "user", "content": f"{tag} request {i}: what is 2 + 2?"}]})
                assert r.status_code == 200, f"{tag} #{i}: {r.status_code} {r.text}\n{self.log[-3000:]}"
                assert r.json()["usage"]["completion_tokens"] >= 1

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The /metrics samples: (name, sorted labels) → value."""
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def terminate(self) -> None:
        """SIGTERM: a graceful stop that flushes the record writer into the store and the outbox."""
        self.proc.send_signal(signal.SIGTERM)
        self.wait_stopped()

    def wait_stopped(self) -> None:
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"seekserve did not stop 60 s after SIGTERM:\n{self.log[-4000:]}") from None
        assert code == 0, f"seekserve exited {code}:\n{self.log[-4000:]}"


@contextmanager
def serve(tmp_path: Path, config: Path, data_dir: Path, name: str) -> Iterator[Server]:
    port = free_port()
    log_path = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "seekserve.cli", "serve", "--config", str(config), "--port", str(port),
           "--site", SITE_A, "--data-dir", str(data_dir), "--kv-cache-memory", "0.05"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_ready(server.base, proc, log_path, timeout=60)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def consume(broker: TansuBroker, data_dir: Path, *extra: str) -> dict[str, int]:
    """`seekserve sync consume --once` as site bank-b; returns its totals."""
    cmd = [sys.executable, "-m", "seekserve.cli", "sync", "consume", "--bootstrap-servers", broker.bootstrap,
           "--site", SITE_B, "--data-dir", str(data_dir), "--once", "--idle-timeout", "5", *extra]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 0, f"consume exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    found = CONSUME_SUMMARY.search(result.stdout)
    assert found, result.stdout
    totals = dict(zip(("read", "stored", "duplicates", "own_site", "malformed"), map(int, found.groups())))
    assert totals["own_site"] == totals["malformed"] == 0, result.stdout
    assert totals["read"] == totals["stored"] + totals["duplicates"], result.stdout
    return totals


def query(db_file: Path, sql: str, *params: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_file) as conn:
        return conn.execute(sql, params).fetchall()


def outbox_counts(db_file: Path) -> tuple[int, int]:
    """(rows, rows not yet delivered) of the outbox table."""
    total, pending = query(db_file, "SELECT COUNT(*), COUNT(*) - COUNT(delivered_at) FROM outbox")[0]
    return total, pending


def audit_chain(db_file: Path, site: str) -> list[tuple[str, str, str]]:
    """A site's audit records as (event_id, prev_hash, hash), in local order."""
    return query(db_file, "SELECT event_id, prev_hash, hash FROM audit_records WHERE site = ? ORDER BY seq",
                 site)


def usage_ids(db_file: Path, site: str) -> list[str]:
    return [row[0] for row in query(db_file, "SELECT event_id FROM usage_records WHERE site = ?", site)]


def wait_until(check: Callable[[], bool], timeout: float, what: Callable[[], str] | str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(0.2)


def test_every_event_reaches_the_other_site_once_across_outage_and_restart(broker: TansuBroker,
                                                                           tmp_path: Path) -> None:
    config = tmp_path / "bank-a.yaml"
    # Tansu refuses aiokafka's idempotent producer (InitProducerId v0): the consumer's dedupe covers retries
    config.write_text(f"sync:\n  bootstrap_servers: \"{broker.bootstrap}\"\n  enable_idempotence: false\n")
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    db_a, db_b = dir_a / "seekserve.db", dir_b / "seekserve.db"

    # phase 1: the broker is up; bank-b consumes what reached it before the broker (and its memory) dies
    with serve(tmp_path, config, dir_a, "serve-1") as server:
        server.chat(NUM_BEFORE, "before")
        # rows counted first: the writer stores the records, then queues them in the outbox
        wait_until(lambda: outbox_counts(db_a) == (2 * NUM_BEFORE, 0), 30,
                   lambda: f"phase 1 to be delivered: outbox {outbox_counts(db_a)}\n{server.log[-3000:]}")
        first = consume(broker, dir_b)
        assert first["stored"] == 2 * NUM_BEFORE, first

        # phase 2: Kafka dies; requests are still answered, their events wait in the outbox
        broker.stop()
        server.chat(NUM_DURING, "during")
        started = time.monotonic()
        server.terminate()
        # the relay gets a few seconds at shutdown, then leaves the rest in the outbox: a send stuck on the
        # dead broker must not hold the exit until it times out (send_timeout, 30 s by default)
        assert time.monotonic() - started < 20, server.log[-4000:]
    assert outbox_counts(db_a) == (2 * (NUM_BEFORE + NUM_DURING), 2 * NUM_DURING), server.log[-4000:]

    # phase 3: seekserve restarts on the same store while Kafka is still down, then Kafka returns (empty)
    num_waiting = 2 * (NUM_DURING + NUM_AFTER_RESTART)
    with serve(tmp_path, config, dir_a, "serve-2") as server:
        server.chat(NUM_AFTER_RESTART, "after")
        wait_until(lambda: outbox_counts(db_a)[0] == 2 * (NUM_BEFORE + NUM_DURING + NUM_AFTER_RESTART), 10,
                   lambda: f"the records of phase 3 in the outbox: {outbox_counts(db_a)}")
        assert outbox_counts(db_a)[1] == num_waiting
        wait_until(lambda: server.metric("seekserve:sync_broker_up") == 0, 15, "the relay to see the outage")
        broker.start()
        wait_until(lambda: outbox_counts(db_a)[1] == 0, 60,
                   lambda: f"the outbox to drain: {outbox_counts(db_a)}\n{server.log[-3000:]}")
        assert server.metric("seekserve:sync_broker_up") == 1
        for topic in ("seekserve.usage", "seekserve.audit"):
            assert server.metric("seekserve:sync_events_published_total", topic=topic) == num_waiting / 2
        server.proc.send_signal(signal.SIGTERM)   # it stops while bank-b consumes: nothing left to send
        last = consume(broker, dir_b)
        assert last["stored"] == num_waiting, last
        # a second consumer group re-reads the whole topic: every event is already stored, none twice
        replay = consume(broker, dir_b, "--group-id", "bank-b-replay")
        assert replay["stored"] == 0 and replay["duplicates"] >= num_waiting, replay
        server.wait_stopped()

    num_requests = NUM_BEFORE + NUM_DURING + NUM_AFTER_RESTART
    assert outbox_counts(db_a) == (2 * num_requests, 0)
    chain_a = audit_chain(db_a, SITE_A)
    assert len(usage_ids(db_a, SITE_A)) == len(chain_a) == num_requests
    assert query(db_a, "SELECT DISTINCT action FROM audit_records") == [("inference.chat",)]
    # bank-b holds each of bank-a's events once, the audit records verbatim and in bank-a's chain order
    assert sorted(usage_ids(db_b, SITE_A)) == sorted(usage_ids(db_a, SITE_A))
    assert audit_chain(db_b, SITE_A) == chain_a
    for table in ("usage_records", "audit_records"):
        counts = query(db_b, f"SELECT COUNT(*), COUNT(DISTINCT event_id) FROM {table}")
        assert counts == [(num_requests, num_requests)], (table, counts)
    for db_file, site in ((db_a, SITE_A), (db_b, SITE_B)):
        db = Database(f"sqlite:///{db_file}")
        try:
            assert AuditLog(db, site).verify(site=SITE_A) == (True, None)
        finally:
            db.close()
