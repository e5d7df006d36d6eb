"""RBAC: every (role, route) pair against the matrix in docs/security.md, plus object-level checks (a
developer asking for another tenant's or key's records gets 404, never their data)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from seekserve.gateway.principal import Role, Tier
from seekserve.gateway.rbac import ROLE_PERMISSIONS, Permission
from tests.api.conftest import running_server

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def gw(chat_model: Path) -> Iterator[dict[str, Any]]:
    with running_server(chat_model, served_model_name=[MODEL]) as (base, _, app):
        keys = app.state.gateway_parts.keys
        made = {}
        for name, role, tenant in [("dev-a", Role.developer, "team-a"), ("dev-b", Role.developer, "team-b"),
                                   ("boss", Role.admin, "ops"), ("aud", Role.auditor, "compliance")]:
            record, secret = keys.create(name, role, tenant, Tier.standard)
            made[name] = (record, secret)
        yield {"base": base, "app": app, "keys": made}


def _routes(app) -> list[tuple[str, str, Permission]]:
    return app.state.route_table


BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    "/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    "/admin/keys": {"name": "made-by-test", "role": "developer", "tenant": "team-a"},
}


def _call(gw: dict[str, Any], method: str, path: str, secret: str | None) -> httpx.Response:
    target = gw["keys"]["dev-b"][0].id
    url = gw["base"] + path.replace("{model}", MODEL).replace("{key}", target)
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    body = BODIES.get(path)
    if path == "/admin/keys" and method == "POST":
        body = {**body, "name": f"made-{secret[-6:] if secret else 'anon'}"}
    return httpx.request(method, url, headers=headers, json=body if method == "POST" else None, timeout=30)


def test_every_route_declares_a_permission(gw):
    routes = _routes(gw["app"])
    assert routes and all(p is not None for _, _, p in routes)
    # usage:read:all is not a route's permission: it widens what /v1/usage returns (object level)
    assert {p for _, _, p in routes} == set(Permission) - {Permission.usage_read_all}


@pytest.mark.parametrize("role", ["developer", "admin", "auditor", "anonymous"])
def test_role_route_matrix(gw, role):
    secret = {"developer": gw["keys"]["dev-a"][1], "admin": gw["keys"]["boss"][1],
              "auditor": gw["keys"]["aud"][1], "anonymous": None}[role]
    checked = 0
    for method, path, permission in _routes(gw["app"]):
        if path.endswith("/revoke"):
            continue   # would revoke the target key for the following routes; covered below
        r = _call(gw, method, path, secret)
        if permission is Permission.public:
            assert r.status_code < 400, (role, method, path, r.status_code)
        elif role == "anonymous":
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
        elif permission in ROLE_PERMISSIONS[Role(role)]:
            assert r.status_code in (200, 201), (role, method, path, r.status_code, r.text)
        else:
            assert r.status_code == 403, (role, method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "permission_denied"
        checked += 1
    assert checked >= 15


def test_revoke_is_admin_only(gw):
    victim, _ = gw["app"].state.gateway_parts.keys.create("victim", Role.developer, "team-a", Tier.standard)
    for name in ("dev-a", "aud"):
        r = httpx.post(f"{gw['base']}/admin/keys/{victim.id}/revoke",
                       headers={"Authorization": f"Bearer {gw['keys'][name][1]}"})
        assert r.status_code == 403
    r = httpx.post(f"{gw['base']}/admin/keys/{victim.id}/revoke",
                   headers={"Authorization": f"Bearer {gw['keys']['boss'][1]}"})
    assert r.status_code == 200 and r.json()["status"] == "revoked"


def test_developer_sees_only_its_own_usage(gw):
    dev_a, dev_b = gw["keys"]["dev-a"], gw["keys"]["dev-b"]
    for secret in (dev_a[1], dev_b[1]):
        r = httpx.post(f"{gw['base']}/v1/completions", headers={"Authorization": f"Bearer {secret}"},
                       json=BODIES["/v1/completions"], timeout=30)
        assert r.status_code == 200
    auth = {"Authorization": f"Bearer {dev_a[1]}"}
    mine = httpx.get(f"{gw['base']}/v1/usage", headers=auth).json()["data"]
    assert mine and {r["key_id"] for r in mine} == {dev_a[0].id}
    for query in ({"tenant": "team-b"}, {"key_id": dev_b[0].id}, {"tenant": "team-a", "key_id": dev_b[0].id}):
        r = httpx.get(f"{gw['base']}/v1/usage", headers=auth, params=query)
        assert r.status_code == 404, query
        assert dev_b[0].id not in r.text
        r = httpx.get(f"{gw['base']}/v1/usage/summary", headers=auth, params=query)
        assert r.status_code == 404, query
    everyone = httpx.get(f"{gw['base']}/v1/usage", headers={"Authorization": f"Bearer {gw['keys']['aud'][1]}"},
                         params={"tenant": "team-b"}).json()["data"]
    assert everyone and {r["tenant"] for r in everyone} == {"team-b"}


def test_auditor_verifies_the_audit_chain(gw):
    auth = {"Authorization": f"Bearer {gw['keys']['aud'][1]}"}
    r = httpx.get(f"{gw['base']}/admin/audit/verify", headers=auth)
    assert r.status_code == 200 and r.json() == {"ok": True, "first_bad_seq": None}
    actions = {rec["action"] for rec in httpx.get(f"{gw['base']}/admin/audit", headers=auth).json()["data"]}
    assert "key.create" in actions and any(a.startswith("inference.") for a in actions)
