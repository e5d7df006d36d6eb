"""`seekserve serve` with no arguments: the shipped model on 127.0.0.1, ready within 10 s, answering
arithmetic through the API."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from openai import OpenAI

from tests.api.conftest import free_port


def test_serve_with_no_arguments_starts_the_shipped_model(tmp_path) -> None:
    port = free_port()
    # the only non-defaults: a free port, and a data folder of the test's own (not the user's home)
    env = {**os.environ, "SEEKSERVE_PORT": str(port), "XDG_DATA_HOME": str(tmp_path)}
    env.pop("SEEKSERVE_CONFIG", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "seekserve.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        ready = None
        while time.monotonic() - t0 < 60:
            try:
                probe = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                if probe.status_code == 200:
                    ready = time.monotonic() - t0
                    assert "server" not in probe.headers and "date" in probe.headers   # no software named
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        assert ready is not None and ready < 10.0, f"not ready within 10 s ({ready})"
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["seekserve-tiny"]
        reply = client.chat.completions.create(model="seekserve-tiny", temperature=0,
                                               messages=[{"role": "user", "content": "What is 37 + 45?"}])
        assert reply.choices[0].message.content.strip() == "82"
        assert reply.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    for phase in ("load weights", "allocate KV cache", "warm-up"):
        assert phase in out
    assert "127.0.0.1" in out
