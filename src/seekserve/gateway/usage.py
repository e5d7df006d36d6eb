"""Metering and audit of every call: usage (tokens, cost, latency, backend) and a chained audit record,
written off the request path by one writer thread in small batches (a request never waits for the
database). `close()` flushes everything, so a graceful restart loses nothing; a crash loses at most the
last `flush_interval` of records."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from seekserve.store.audit import AuditEvent, AuditLog, AuditRecord
from seekserve.store.usage import UsageRecord, UsageStore

log = logging.getLogger("seekserve.gateway.usage")


class Price(BaseModel):
    """USD per million tokens."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    input: float = Field(0.0, ge=0)          # prompt tokens not found in the upstream's cache
    cached_input: float = Field(0.0, ge=0)   # prompt tokens served from the cache
    output: float = Field(0.0, ge=0)


# DeepSeek's published list prices (USD / 1M tokens); override with `model_prices` in the config
DEFAULT_PRICES: dict[str, Price] = {
    "deepseek-chat": Price(input=0.27, cached_input=0.07, output=1.10),
    "deepseek-reasoner": Price(input=0.55, cached_input=0.14, output=2.19),
}


def cost_usd(price: Price | None, prompt: int, cached: int, completion: int) -> float:
    if price is None:
        return 0.0
    return ((prompt - cached) * price.input + cached * price.cached_input + completion * price.output) / 1e6


Sink = Callable[[list[UsageRecord], list[AuditRecord]], None]


class RecordWriter:
    """One thread drains a queue of usage records and audit events into the store, in batches."""

    def __init__(self, usage: UsageStore, audit: AuditLog, flush_interval: float = 0.05,
                 max_batch: int = 500, on_written: Sink | None = None) -> None:
        self.usage, self.audit = usage, audit
        self.flush_interval, self.max_batch = flush_interval, max_batch
        self.on_written = on_written           # e.g. the Kafka outbox publisher
        # SimpleQueue: a put takes no Python-level lock (it is on every request's path). A threading.Event in
        # the queue is a flush() waiting for everything queued before it.
        self._queue: queue.SimpleQueue[UsageRecord | AuditEvent | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="seekserve-records", daemon=True)
        self._thread.start()

    def add_usage(self, record: UsageRecord) -> None:
        self._queue.put(record)

    def add_audit(self, event: AuditEvent) -> None:
        self._queue.put(event)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or given up on after its retries)."""
        if not self._thread.is_alive():     # closed: it wrote everything queued before close()
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        # Wait for a first record, then sleep out the flush interval and take everything queued meanwhile.
        # Waiting on the queue for each further record instead woke this thread (and took the interpreter
        # lock from the event loop) twice per request.
        stopping = False
        while not stopping:
            item = self._queue.get()
            if isinstance(item, (UsageRecord, AuditEvent)):
                time.sleep(self.flush_interval)
            batch: list[UsageRecord | AuditEvent] = []
            waiting: list[threading.Event] = []
            while True:
                if item is None:
                    stopping = True
                    break
                if isinstance(item, threading.Event):
                    waiting.append(item)
                else:
                    batch.append(item)
                    if len(batch) >= self.max_batch:
                        break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for done in waiting:
                done.set()

    def _write(self, batch: list[UsageRecord | AuditEvent]) -> None:
        usage = [r for r in batch if isinstance(r, UsageRecord)]
        events = [e for e in batch if isinstance(e, AuditEvent)]
        for attempt in range(5):   # a busy or briefly unreachable database: retry, never drop silently
            try:
                # idempotent by event id: a retry stores nothing twice
                audits = self._store(usage, events, fresh=attempt == 0)
                if self.on_written is not None:
                    self.on_written(usage, audits)
                return
            except Exception:  # noqa: BLE001 — logged and retried; the records stay in hand
                log.exception("writing %d usage and %d audit records failed (attempt %d)", len(usage),
                              len(events), attempt + 1)
                time.sleep(0.2 * 2 ** attempt)
        log.error("gave up on %d usage and %d audit records after 5 failed writes", len(usage), len(events))

    def _store(self, usage: list[UsageRecord], events: list[AuditEvent], fresh: bool) -> list[AuditRecord]:
        """Both kinds in one transaction when they share a database (one commit per batch, not two). A
        first attempt with nobody waiting for the chained records skips append_many's look-ups."""
        db = self.audit.db
        if self.usage.db is not db or not (usage and events):
            self.usage.add_many(usage)
            return self.audit.append_many(events)
        with db.write_connection() as connection:
            self.usage.add_many(usage, connection=connection)
            if fresh and self.on_written is None:
                self.audit.append_new(events, connection)
                return []
            return self.audit.append_many(events, connection=connection)
