"""`seekserve serve` as users run it, in a subprocess: the startup log names its phases, and SIGTERM drains —
/ready and new requests answer 503 at once, an in-flight stream still completes, and the process exits 0. With
a short --drain-timeout, a request that would run much longer is cut and the process still exits 0 soon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.api.conftest import free_port
from tests.services import wait_ready

MODEL = "tiny-chat"


class Server:
    def __init__(self, proc: subprocess.Popen, base: str, log: Path) -> None:
        self.proc, self.base, self.log_path = proc, base, log

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve(model: Path, tmp_path: Path, *extra: str) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "seekserve.cli", "serve", "--model-path", str(model), "--port", str(port),
           "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "0.05", "--batch-size", "4",
           "--served-model-name", MODEL, "--data-dir", str(tmp_path / f"data-{port}"), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEKSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(server.base, proc, log)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class StreamReader(threading.Thread):
    """One streamed completion, read in the background: its SSE lines, or the error that cut it."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.first_frame = threading.Event()
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=120) as client, client.stream("POST", self.url, json=self.body) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.first_frame.set()
        except Exception as e:  # noqa: BLE001 - a cut stream is an expected outcome, checked by the test
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            self.first_frame.set()

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(line[len("data: "):]) for line in self.lines if line.startswith("data: {")]


def start_stream(server: Server, num_prompts: int, n: int, max_tokens: int) -> StreamReader:
    reader = StreamReader(f"{server.base}/v1/completions", {
        "model": MODEL, "prompt": ["Hello world"] * num_prompts, "n": n, "max_tokens": max_tokens,
        "ignore_eos": True, "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}})
    reader.start()
    assert reader.first_frame.wait(60), "the stream did not start"
    assert reader.error is None and reader.status == 200, (reader.status, reader.error, reader.lines[:3])
    assert reader.frames(), reader.lines[:3]
    return reader


def test_startup_log_and_sigterm_drains_then_exits_0(chat_model: Path, tmp_path: Path) -> None:
    with serve(chat_model, tmp_path, "--drain-timeout", "20") as server:
        log = server.log
        for phase in ("load weights", "allocate KV cache", "warm-up"):
            assert re.search(rf"{phase}: \d+\.\d\ds", log), f"no '{phase}' duration in the startup log:\n{log}"
        assert re.search(r"model ready in \d+\.\d\ds", log), log

        # 8 prompts x 4 completions x 240 tokens with batch size 4: a few seconds of decoding
        num_prompts, n, max_tokens = 8, 4, 240
        reader = start_stream(server, num_prompts, n, max_tokens)
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()

        with httpx.Client(base_url=server.base, timeout=10) as c:
            # readiness fails at once (polled briefly: the signal handler runs between two bytecodes)
            while (r := c.get("/ready")).status_code == 200 and time.monotonic() - sent < 2:
                time.sleep(0.01)
            assert (r.status_code, r.json()) == (503, {"status": "draining"})
            assert c.get("/health").status_code == 200
            for path, body in [("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2}),
                               ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "Hi"}]})]:
                r = c.post(path, json=body)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "draining" and r.headers["retry-after"] == "1"
        assert reader.is_alive(), "the in-flight request ended before the drain checks: make it longer"
        assert server.proc.poll() is None, "the server must wait for the in-flight request"

        reader.join(60)
        assert not reader.is_alive()
        assert reader.error is None, f"the in-flight stream was cut: {reader.error!r}\n{server.log}"
        assert reader.lines[-1] == "data: [DONE]"
        frames = reader.frames()
        finish = {c["index"]: c["finish_reason"] for f in frames for c in f["choices"] if c["finish_reason"]}
        assert finish == {i: "length" for i in range(num_prompts * n)}
        assert frames[-1]["usage"]["completion_tokens"] == num_prompts * n * max_tokens

        assert server.proc.wait(30) == 0, server.log
        assert time.monotonic() - reader.ended_at < 15, "exit must follow soon after the drain completes"
        log = server.log
        assert "draining (1 in flight, up to 20s)" in log, log
        assert "drain complete; shutting down" in log, log
        assert "Traceback" not in log, log


def test_drain_timeout_cuts_long_requests_and_still_exits_0(chat_model: Path, tmp_path: Path) -> None:
    drain_timeout = 1.0
    with serve(chat_model, tmp_path, "--drain-timeout", str(drain_timeout)) as server:
        # 32 prompts x 4 x 240 tokens at batch size 4: far longer than the drain timeout
        reader = start_stream(server, 32, 4, 240)
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert server.proc.wait(30) == 0, server.log
        exited = time.monotonic() - sent
        # the drain timeout, then about a second to cut what still runs and stop the engine
        assert drain_timeout <= exited < drain_timeout + 5, f"exited {exited:.1f}s after SIGTERM\n{server.log}"
        reader.join(10)
        assert not reader.is_alive()
        assert "data: [DONE]" not in reader.lines, "the long request should have been cut"
        log = server.log
        assert "drain timed out with 1 request(s) still running; shutting down" in log, log


def test_second_sigterm_exits_at_once(chat_model: Path, tmp_path: Path) -> None:
    with serve(chat_model, tmp_path, "--drain-timeout", "60") as server:
        reader = start_stream(server, 32, 4, 240)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert server.proc.poll() is None       # draining, up to 60 s
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert server.proc.wait(30) == 0, server.log
        assert time.monotonic() - sent < 10, server.log
        reader.join(10)
        assert "data: [DONE]" not in reader.lines
