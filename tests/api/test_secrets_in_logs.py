"""No secret reaches a log line or an error body: the server runs at DEBUG with every kind of secret in
play (key pepper, static key, store keys created/rotated/refused, JWTs, a Redis password, an upstream API
key), and everything it printed is scanned for each of them."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from tests.api.conftest import free_port
from tests.backends.upstream import FakeUpstream
from tests.services import wait_ready


def test_no_secret_in_logs_or_error_bodies(tmp_path: Path) -> None:
    pepper, static = secrets.token_urlsafe(32), "sk-static-" + secrets.token_urlsafe(24)
    upstream_key, redis_password = "sk-upstream-" + secrets.token_urlsafe(24), secrets.token_urlsafe(16)
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="ES256")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims = {"iss": "https://idp.example", "aud": "seekserve", "sub": "eve", "iat": now, "tenant": "risk"}
    good_jwt = jwt.encode({**claims, "exp": now + 600}, key, "ES256", headers={"kid": "k1"})
    expired_jwt = jwt.encode({**claims, "exp": now - 600}, key, "ES256", headers={"kid": "k1"})
    # a Redis URL with a password, where nothing listens: the limiter fails (open) and logs about it
    host = f"127.0.0.1:{free_port()}"
    with FakeUpstream(models=("cloud-chat",)) as upstream:
        config = {"oidc": {"issuer": "https://idp.example", "audience": ["seekserve"],
                           "jwks_file": str(tmp_path / "jwks.json")},
                  "upstreams": [{"name": "cloud", "base_url": upstream.url, "api_key_env": "CLOUD_KEY",
                                 "models": [{"alias": "cloud-chat"}]}],
                  "routes": [{"name": "all-cloud", "backends": ["cloud", "local"]}]}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEEKSERVE_")}
        env.update(SEEKSERVE_KEY_PEPPER=pepper, SEEKSERVE_API_KEY=static, CLOUD_KEY=upstream_key,
                   SEEKSERVE_REDIS_URL=f"redis://:{redis_password}@{host}/0", PYTHONUNBUFFERED="1")
        log = tmp_path / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "seekserve.cli", "serve", "--port", str(port),
                                     "--data-dir", str(tmp_path / "data"), "--config", str(tmp_path / "config.yaml"),
                                     "--log-level", "debug"], stdout=out, stderr=subprocess.STDOUT, env=env)
        used = [pepper, static, upstream_key, redis_password, good_jwt, expired_jwt]
        bodies: list[str] = []
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, proc, log)
            with httpx.Client(base_url=base, timeout=30) as c:
                admin = {"Authorization": f"Bearer {static}"}
                made = c.post("/admin/keys", headers=admin, json={"name": "dev", "role": "developer",
                                                                  "tenant": "risk", "rpm": 1000}).json()
                rotated = c.post("/admin/keys/dev/rotate", headers=admin, json={"grace": "1h"}).json()
                used += [made["key"], rotated["key"]]
                chat = {"model": "cloud-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
                for credential in (made["key"], rotated["key"], good_jwt, expired_jwt, made["key"][:-2] + "zz",
                                   "sk-ss-" + secrets.token_urlsafe(32), static):
                    r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {credential}"}, json=chat)
                    bodies.append(r.text)
                    if credential == made["key"][:-2] + "zz":
                        used.append(credential)
                    assert r.status_code in (200, 401), r.text
                r = c.get("/admin/settings", headers=admin)
                assert r.status_code == 200
                bodies.append(r.text)
                assert upstream.requests and upstream.requests[-1].headers["authorization"] == f"Bearer {upstream_key}"
        finally:
            proc.terminate()
            proc.wait(60)
    printed = log.read_text()
    assert "DEBUG" in printed and "WARNING seekserve.gateway.ratelimit" in printed   # it logged the outage
    for secret in used:
        assert secret not in printed, f"a secret ({secret[:6]}…) is in the server log"
        for body in bodies:
            assert secret not in body or body.startswith('{"id"'), "a secret is in an error body"
    settings_body = bodies[-1]
    assert all(s not in settings_body for s in used)
