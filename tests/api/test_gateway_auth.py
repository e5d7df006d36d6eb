"""Identity end to end: keys made by the CLI work on the server, revocation and rotation, OIDC tokens,
the query string is never read, loopback-only without credentials, and no secret ever reaches a log or
an error body."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from seekserve.config import Settings
from seekserve.gateway.bootstrap import SetupError
from seekserve.server import check_exposure
from tests.api.conftest import free_port, running_server

MODEL = "tiny-chat"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEKSERVE_")}
    return subprocess.run([sys.executable, "-m", "seekserve.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env=env, timeout=120)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def cli_key(data_dir: Path) -> str:
    r = cli(data_dir, "keys", "create", "--name", "alice", "--role", "developer", "--tenant", "risk",
            "--tier", "vip", "--models", MODEL, "--rpm", "600")
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip()
    assert secret.startswith("sk-ss-") and len(secret) == 6 + 43
    return secret


@pytest.fixture(scope="module")
def server(chat_model: Path, data_dir: Path, cli_key: str) -> Iterator[tuple[str, object]]:
    with running_server(chat_model, served_model_name=[MODEL], data_dir=str(data_dir)) as (base, _, app):
        yield base, app


def test_cli_key_works_and_list_never_shows_secrets(server, data_dir, cli_key):
    base, _ = server
    r = httpx.post(f"{base}/v1/chat/completions", headers=bearer(cli_key), json=CHAT, timeout=30)
    assert r.status_code == 200, r.text
    listed = cli(data_dir, "keys", "list", "--json")
    assert listed.returncode == 0
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["alice"]
    assert rows[0]["role"] == "developer" and rows[0]["tier"] == "vip" and rows[0]["limits"]["rpm"] == 600
    assert rows[0]["last_used_at"] is not None
    assert cli_key not in listed.stdout and cli_key[6:20] not in listed.stdout
    table = cli(data_dir, "keys", "list")
    assert "alice" in table.stdout and "STATUS" in table.stdout and cli_key not in table.stdout


def test_missing_wrong_and_query_string_keys_are_refused(server, cli_key):
    base, _ = server
    r = httpx.post(f"{base}/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{base}/v1/chat/completions", params={"api_key": cli_key}, json=CHAT)
    assert r.status_code == 401                           # the query string is never read
    r = httpx.post(f"{base}/v1/chat/completions", headers=bearer(cli_key[:-1] + "x"), json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Basic {cli_key}"}, json=CHAT)
    assert r.status_code == 401
    r = httpx.post(f"{base}/v1/chat/completions", headers=bearer("x' OR '1'='1"), json=CHAT)
    assert r.status_code == 401                           # stored hashes only: nothing to inject into


def test_model_restriction_hides_other_models(server, cli_key):
    base, _ = server
    other = {**CHAT, "model": "not-mine"}
    r = httpx.post(f"{base}/v1/chat/completions", headers=bearer(cli_key), json=other)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in httpx.get(f"{base}/v1/models", headers=bearer(cli_key)).json()["data"]] == [MODEL]


def test_revoke_and_rotate_from_the_cli_take_effect(server, data_dir):
    base, _ = server
    r = cli(data_dir, "keys", "create", "--name", "bob", "--role", "developer", "--tenant", "risk")
    bob = r.stdout.strip()
    assert httpx.post(f"{base}/v1/chat/completions", headers=bearer(bob), json=CHAT, timeout=30).status_code == 200
    rotated = cli(data_dir, "keys", "rotate", "bob", "--grace", "1h")
    assert rotated.returncode == 0, rotated.stderr
    bob2 = rotated.stdout.strip()
    assert bob2 != bob
    for secret in (bob, bob2):                          # the old key works during the grace period
        assert httpx.post(f"{base}/v1/chat/completions", headers=bearer(secret), json=CHAT,
                          timeout=30).status_code == 200
    # revoking by name revokes every key of that name, the old one still in its grace period included
    assert cli(data_dir, "keys", "revoke", "bob").returncode == 0
    deadline = time.monotonic() + 10                    # another process revoked it: within the 5 s cache
    for secret in (bob2, bob):
        while httpx.post(f"{base}/v1/chat/completions", headers=bearer(secret), json=CHAT,
                         timeout=30).status_code != 401:
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_admin_cannot_mint_more_rights_than_its_own(server):
    base, app = server
    keys = app.state.gateway_parts.keys
    from seekserve.gateway.principal import Limits, Role, Tier

    _, admin = keys.create("lead", Role.admin, "risk", Tier.standard, [MODEL], Limits(rpm=100))
    cases = [({"tier": "vip"}, "tier"), ({"models": [MODEL, "other"]}, "models"), ({}, "models"),
             ({"models": [MODEL], "rpm": 1000}, "rpm"), ({"models": [MODEL]}, "rpm")]
    for extra, why in cases:
        r = httpx.post(f"{base}/admin/keys", headers=bearer(admin),
                       json={"name": f"x-{why}", "role": "developer", "tenant": "risk", **extra})
        assert r.status_code == 403, (extra, r.text)
    r = httpx.post(f"{base}/admin/keys", headers=bearer(admin),
                   json={"name": "ok-one", "role": "developer", "tenant": "risk", "models": [MODEL], "rpm": 50})
    assert r.status_code == 201 and r.json()["key"].startswith("sk-ss-")


def test_exposure_needs_credentials_or_explicit_consent(tmp_path):
    base = {"data_dir": str(tmp_path), "host": "0.0.0.0"}
    with pytest.raises(SetupError, match="allow-unauthenticated"):
        check_exposure(Settings(**base))
    check_exposure(Settings(**base, allow_unauthenticated=True))
    check_exposure(Settings(data_dir=str(tmp_path), host="127.0.0.1"))
    check_exposure(Settings(**base, api_key=["sk-static-0123456789abcdef"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEKSERVE_")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "seekserve.cli", "serve", "--host", "0.0.0.0", "--port",
                        str(free_port()), "--data-dir", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "allow-unauthenticated" in r.stderr + r.stdout
    assert time.monotonic() - t0 < 30                    # refused before loading the model
    assert cli(tmp_path, "keys", "create", "--name", "ops", "--role", "admin", "--tenant", "ops").returncode == 0
    check_exposure(Settings(**base))


# -- OIDC ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oidc(tmp_path_factory) -> dict:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="ES256")
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return {"key": key, "jwks_file": str(path)}


def token(oidc: dict, **claims) -> str:
    now = int(time.time())
    body = {"iss": "https://idp.example", "aud": "seekserve", "sub": "carol", "exp": now + 300, "iat": now,
            "tenant": "risk", "role": "auditor", **claims}
    return jwt.encode(body, oidc["key"], algorithm="ES256", headers={"kid": "k1"})


def test_oidc_tokens_map_to_roles(chat_model: Path, tmp_path: Path, oidc: dict):
    settings = {"issuer": "https://idp.example", "audience": ["seekserve"], "jwks_file": oidc["jwks_file"]}
    with running_server(chat_model, served_model_name=[MODEL], data_dir=str(tmp_path), oidc=settings) as (base, _, _):
        auditor = bearer(token(oidc))
        assert httpx.get(f"{base}/admin/audit", headers=auditor).status_code == 200
        assert httpx.post(f"{base}/v1/chat/completions", headers=auditor, json=CHAT).status_code == 403
        dev = bearer(token(oidc, role="developer", sub="dave"))
        assert httpx.post(f"{base}/v1/chat/completions", headers=dev, json=CHAT, timeout=30).status_code == 200
        expired = token(oidc, exp=int(time.time()) - 3600)
        r = httpx.get(f"{base}/admin/audit", headers=bearer(expired))
        assert r.status_code == 401 and expired not in r.text
        wrong_aud = token(oidc, aud="someone-else")
        assert httpx.get(f"{base}/admin/audit", headers=bearer(wrong_aud)).status_code == 401


def test_the_server_runs_on_postgresql_too(chat_model: Path, tmp_path: Path, postgres_url: str):
    """The same gateway on the shared PostgreSQL store: a key made by the CLI against that URL works, and the
    call's usage and audit records land there."""
    import uuid

    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEKSERVE_")}
    pepper = "pepper-" + uuid.uuid4().hex
    env.update(SEEKSERVE_DATABASE_URL=postgres_url, SEEKSERVE_KEY_PEPPER=pepper)
    name = f"pg-{uuid.uuid4().hex[:8]}"
    made = subprocess.run([sys.executable, "-m", "seekserve.cli", "keys", "create", "--name", name, "--role",
                           "developer", "--tenant", name], capture_output=True, text=True, env=env, timeout=120)
    assert made.returncode == 0, made.stderr
    with running_server(chat_model, served_model_name=[MODEL], data_dir=str(tmp_path), database_url=postgres_url,
                        key_pepper=pepper) as (base, _, app):
        r = httpx.post(f"{base}/v1/chat/completions", headers=bearer(made.stdout.strip()), json=CHAT, timeout=30)
        assert r.status_code == 200, r.text
        usage = httpx.get(f"{base}/v1/usage", headers=bearer(made.stdout.strip())).json()["data"]
        assert [u["tenant"] for u in usage] == [name]
        assert app.state.gateway_parts.db.dialect == "postgresql"


def test_a_shared_database_needs_an_explicit_pepper(tmp_path: Path, postgres_url: str):
    from seekserve.gateway.bootstrap import load_pepper

    with pytest.raises(SetupError, match="SEEKSERVE_KEY_PEPPER"):
        load_pepper(Settings(data_dir=str(tmp_path), database_url=postgres_url))
