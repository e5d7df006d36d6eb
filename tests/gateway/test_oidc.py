"""OIDC bearer tokens checked against a real JWKS server on a loopback port, with keys made in the test:
claims map to principals; alg=none, HS/RS confusion, expired, early and wrong-audience tokens are refused;
keys rotate, floods of unknown kids cannot hammer the IdP, and no token ever reaches a message or a log."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from seekserve.gateway.errors import GatewayError
from seekserve.gateway.oidc import JWTVerifier, OIDCConfig, looks_like_jwt
from seekserve.gateway.principal import Limits, Principal, Role, Tier

ISSUER = "https://idp.test/realms/seekserve"
AUDIENCE = "seekserve-api"
_ISSUED: list[str] = []  # every token made by a test; none may show up in a message or a log line


class JWKSServer:
    """A real HTTP server on 127.0.0.1 that publishes a JWKS document, counts GETs and can fail or stop."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.document: dict[str, Any] = {"keys": keys}
        self.status, self.raw_body, self.requests = 200, b"", 0
        self._lock, self._stopped = threading.Lock(), False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/certs"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    body = server.raw_body or json.dumps(server.document).encode()
                    status = server.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # keeps pytest output to our own logs

        return Handler

    def publish(self, keys: list[dict[str, Any]]) -> None:
        with self._lock:
            self.document = {"keys": keys}

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()


def _jwk(private_key: Any, kid: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    return {**algorithm.to_jwk(private_key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


@pytest.fixture(scope="module")
def keys() -> SimpleNamespace:
    rsa_a, rsa_b, rogue = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3))
    ec_p256, ec_p384 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())
    return SimpleNamespace(rsa_a=rsa_a, rsa_b=rsa_b, rogue=rogue, ec=ec_p256, ec384=ec_p384,
                           jwk_a=_jwk(rsa_a, "rsa-a"), jwk_b=_jwk(rsa_b, "rsa-b"), jwk_ec=_jwk(ec_p256, "ec-1"))


@pytest.fixture()
def idp(keys: SimpleNamespace) -> Iterator[JWKSServer]:
    server = JWKSServer([keys.jwk_a, keys.jwk_ec])
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="seekserve.gateway.oidc")
    _ISSUED.clear()
    yield
    for issued in _ISSUED:
        signature = issued.rsplit(".", 1)[-1]
        assert issued not in caplog.text and (not signature or signature not in caplog.text)


def config(server: JWKSServer | None = None, **overrides: Any) -> OIDCConfig:
    source = {"jwks_url": server.url} if server is not None else {}
    return OIDCConfig(**{"issuer": ISSUER, "audience": (AUDIENCE,), **source, **overrides})


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid claim set; an override of None drops that claim."""
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300,
            "role": "admin", "tenant": "acme", "tier": "vip"}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def token(key: Any, alg: str = "RS256", kid: str | None = "rsa-a", **overrides: Any) -> str:
    made = jwt.encode(claims(**overrides), key, algorithm=alg, headers={"kid": kid} if kid else None)
    _ISSUED.append(made)
    return made


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], signer: Any = None) -> str:
    """A token built by hand: unsigned, or signed by `signer(signing_input)`."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims()).encode())}"
    made = f"{signing_input}.{_b64(signer(signing_input.encode())) if signer else ''}"
    _ISSUED.append(made)
    return made


async def _verify_once(cfg: OIDCConfig, *tokens: str) -> list[Principal]:
    verifier = JWTVerifier(cfg)
    try:
        return [await verifier.verify(t) for t in tokens]
    finally:
        await verifier.close()


def verify(cfg: OIDCConfig, tok: str) -> Principal:
    return asyncio.run(_verify_once(cfg, tok))[0]


def assert_refused(exc: GatewayError, fragment: str, tok: str, status: int = 401) -> None:
    assert exc.status == status, exc.message
    assert fragment in exc.message, exc.message
    if status == 401:
        assert exc.code == "invalid_token" and exc.headers == {"WWW-Authenticate": "Bearer"}
    for part in [tok, *tok.split(".")]:
        assert not part or len(part) < 8 or part not in f"{exc.message} {exc!r} {exc.args}"


def refused(cfg: OIDCConfig, tok: str, fragment: str, status: int = 401) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        verify(cfg, tok)
    assert_refused(info.value, fragment, tok, status)
    return info.value


# ------------------------------------------------------------------ valid tokens and claim mapping

def test_valid_rs256_and_es256_tokens_map_claims(keys: SimpleNamespace, idp: JWKSServer) -> None:
    expected = Principal(subject="jwt:alice", name="alice", kind="jwt", role=Role.admin, tenant="acme",
                         tier=Tier.vip, models=None, limits=Limits())
    assert verify(config(idp), token(keys.rsa_a)) == expected
    cfg = config(idp, algorithms=("ES256",))
    assert verify(cfg, token(keys.ec, "ES256", "ec-1")) == expected


def test_nested_namespaced_and_list_valued_claims(keys: SimpleNamespace, idp: JWKSServer) -> None:
    cfg = config(idp, role_claim="realm_access.roles", tenant_claim="https://seekserve.dev/tenant",
                 tier_claim="plan.tier", models_claim="models")
    tok = token(keys.rsa_a, role=None, tenant=None, tier=None, models=["deepseek-chat", "tiny"],
                realm_access={"roles": ["offline_access", "auditor", "admin"]},
                plan={"tier": "batch"}, **{"https://seekserve.dev/tenant": "globex"})
    principal = verify(cfg, tok)
    # the first known role of the list wins, whatever comes after it
    assert (principal.role, principal.tenant, principal.tier) == (Role.auditor, "globex", Tier.batch)
    assert principal.models == frozenset({"deepseek-chat", "tiny"})
    assert verify(cfg, token(keys.rsa_a, models="tiny other", realm_access={"roles": ["admin"]},
                             **{"https://seekserve.dev/tenant": "g"})).models == frozenset({"tiny", "other"})


def test_defaults_fill_missing_role_tier_and_tenant(keys: SimpleNamespace, idp: JWKSServer) -> None:
    tok = token(keys.rsa_a, role=None, tier=None, tenant=None)
    principal = verify(config(idp, default_tenant="shared"), tok)
    assert (principal.role, principal.tier, principal.tenant) == (Role.developer, Tier.standard, "shared")
    refused(config(idp), tok, "missing the 'tenant' claim")
    refused(config(idp, default_role=None, default_tenant="shared"), tok, "missing the 'role' claim")


def test_unknown_role_tier_and_bad_tenant_refused(keys: SimpleNamespace, idp: JWKSServer) -> None:
    refused(config(idp), token(keys.rsa_a, role="superuser"), "'role' claim holds no known role")
    refused(config(idp), token(keys.rsa_a, role=["owner", "root"]), "no known role")
    refused(config(idp), token(keys.rsa_a, tier="platinum"), "'tier' claim holds no known tier")
    refused(config(idp), token(keys.rsa_a, tenant=["a", "b"]), "'tenant' claim must be a non-empty string")
    refused(config(idp, models_claim="models"), token(keys.rsa_a, models=[1, 2]), "list of model names")


# ------------------------------------------------------------------ algorithm attacks

def test_alg_none_refused(idp: JWKSServer) -> None:
    for alg in ("none", "None", "NONE"):
        refused(config(idp), forged({"alg": alg, "typ": "JWT", "kid": "rsa-a"}), "algorithm is not allowed")
    refused(config(idp), forged({"typ": "JWT", "kid": "rsa-a"}), "algorithm is not allowed")


def test_hs256_signed_with_the_rsa_public_key_refused(keys: SimpleNamespace, idp: JWKSServer) -> None:
    # the classic confusion: a verifier that feeds the RSA public key PEM to HMAC would accept this
    pem = keys.rsa_a.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
        tok = forged({"alg": alg, "typ": "JWT", "kid": "rsa-a"}, lambda m, d=digest: hmac.new(pem, m, d).digest())
        refused(config(idp), tok, "algorithm is not allowed")
    assert idp.requests == 0  # refused before any key was even fetched


def test_alg_must_fit_the_key_its_kid_names(keys: SimpleNamespace, idp: JWKSServer) -> None:
    cfg = config(idp, algorithms=("RS256", "ES256", "ES384"))
    refused(cfg, token(keys.rsa_a, "RS256", "ec-1"), "does not match its key")
    refused(cfg, token(keys.ec, "ES256", "rsa-a"), "does not match its key")
    refused(cfg, token(keys.ec384, "ES384", "ec-1"), "does not match its key")  # right family, wrong curve
    # a fitting key does not help an algorithm this issuer was not configured for
    refused(config(idp, algorithms=("RS256",)), token(keys.ec, "ES256", "ec-1"), "algorithm is not allowed")


def test_jwk_alg_pins_the_algorithm(keys: SimpleNamespace) -> None:
    server = JWKSServer([{**keys.jwk_a, "alg": "RS512"}])
    try:
        cfg = config(server, algorithms=("RS256", "RS512"))
        refused(cfg, token(keys.rsa_a, "RS256"), "does not match its key")
        assert verify(cfg, token(keys.rsa_a, "RS512")).name == "alice"
    finally:
        server.stop()


def test_bad_signature_and_malformed_tokens_refused(keys: SimpleNamespace, idp: JWKSServer) -> None:
    refused(config(idp), token(keys.rogue, kid="rsa-a"), "signature is invalid")
    head, _, sig = token(keys.rsa_a).split(".")
    tampered = f"{head}.{_b64(json.dumps(claims(role='admin', sub='mallory')).encode())}.{sig}"
    _ISSUED.append(tampered)
    refused(config(idp), tampered, "signature is invalid")
    for junk in ("not-a-jwt", "a.b.c", "x" * 20_000):
        refused(config(idp), junk, "bearer token")
    refused(config(idp), "", "empty")


# ------------------------------------------------------------------ time and identity claims

def test_expiry_is_checked_with_bounded_skew(keys: SimpleNamespace, idp: JWKSServer) -> None:
    now = int(time.time())
    refused(config(idp), token(keys.rsa_a, exp=now - 120), "expired")
    assert verify(config(idp), token(keys.rsa_a, exp=now - 30)).name == "alice"  # within the 60 s skew
    refused(config(idp, clock_skew=0), token(keys.rsa_a, exp=now - 5), "expired")


def test_not_before_and_issued_at_in_the_future_refused(keys: SimpleNamespace, idp: JWKSServer) -> None:
    now = int(time.time())
    refused(config(idp), token(keys.rsa_a, nbf=now + 120), "not valid yet")
    assert verify(config(idp), token(keys.rsa_a, nbf=now + 30)).name == "alice"
    refused(config(idp), token(keys.rsa_a, iat=now + 120), "not valid yet")


def test_audience_and_issuer_must_match(keys: SimpleNamespace, idp: JWKSServer) -> None:
    refused(config(idp), token(keys.rsa_a, aud="another-api"), "audience is not accepted")
    refused(config(idp), token(keys.rsa_a, aud=[]), "aud")  # PyJWT calls an empty list missing
    assert verify(config(idp), token(keys.rsa_a, aud=["another-api", AUDIENCE])).name == "alice"
    assert verify(config(idp, audience=("x", AUDIENCE)), token(keys.rsa_a)).name == "alice"
    refused(config(idp), token(keys.rsa_a, iss="https://evil.test/"), "issuer does not match")


def test_required_claims(keys: SimpleNamespace, idp: JWKSServer) -> None:
    for claim in ("exp", "iss", "aud", "sub"):
        dropped: dict[str, Any] = {claim: None}
        refused(config(idp), token(keys.rsa_a, **dropped), f"missing the '{claim}' claim")
    refused(config(idp), token(keys.rsa_a, sub=" "), "'sub' claim is empty")


def test_kid_rules(keys: SimpleNamespace, idp: JWKSServer) -> None:
    refused(config(idp), token(keys.rsa_a, kid=None), "no key id (kid)")
    refused(config(idp), token(keys.rsa_a, kid="nope"), "signing key is unknown")
    single = JWKSServer([keys.jwk_a])
    try:
        assert verify(config(single), token(keys.rsa_a, kid=None)).name == "alice"
    finally:
        single.stop()


# ------------------------------------------------------------------ the JWKS cache

def test_concurrent_verifications_share_one_fetch(keys: SimpleNamespace, idp: JWKSServer) -> None:
    async def main() -> list[Principal]:
        verifier = JWTVerifier(config(idp))
        try:
            return await asyncio.gather(*(verifier.verify(token(keys.rsa_a)) for _ in range(20)))
        finally:
            await verifier.close()

    assert len(asyncio.run(main())) == 20
    assert idp.requests == 1


def test_key_rotation_is_picked_up_with_one_refetch(keys: SimpleNamespace, idp: JWKSServer) -> None:
    async def main() -> None:
        verifier = JWTVerifier(config(idp, jwks_min_refresh_interval=0.2))
        try:
            await verifier.verify(token(keys.rsa_a))
            idp.publish([keys.jwk_a, keys.jwk_b, keys.jwk_ec])  # the IdP rolls in a new key
            await asyncio.sleep(0.25)
            assert (await verifier.verify(token(keys.rsa_b, kid="rsa-b"))).name == "alice"
            assert idp.requests == 2
            await verifier.verify(token(keys.rsa_b, kid="rsa-b"))
            await verifier.verify(token(keys.rsa_a))
            assert idp.requests == 2  # both kids are cached now
        finally:
            await verifier.close()

    asyncio.run(main())


def test_flood_of_unknown_kids_refetches_at_most_once(keys: SimpleNamespace, idp: JWKSServer) -> None:
    # signed up front, so that the first flood surely lands within the interval even on a slow machine
    floods = [[token(keys.rsa_a, kid=uuid.uuid4().hex) for _ in range(50)] for _ in range(2)]

    async def flood(verifier: JWTVerifier, forgeries: list[str]) -> list[Any]:
        return await asyncio.gather(*(verifier.verify(t) for t in forgeries), return_exceptions=True)

    async def main() -> None:
        verifier = JWTVerifier(config(idp, jwks_min_refresh_interval=0.5))
        try:
            await verifier.verify(token(keys.rsa_a))
            results = await flood(verifier, floods[0])  # within the interval of the first fetch: no refetch
            assert idp.requests == 1
            await asyncio.sleep(0.55)
            results += await flood(verifier, floods[1])  # past it: the first unknown kid refetches, rest wait
            assert idp.requests == 2
            for exc in results:
                assert isinstance(exc, GatewayError) and exc.message == "token signing key is unknown"
        finally:
            await verifier.close()

    asyncio.run(main())


def test_cached_keys_survive_an_idp_outage(keys: SimpleNamespace, idp: JWKSServer,
                                           caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        verifier = JWTVerifier(config(idp, jwks_cache_ttl=0.05, jwks_min_refresh_interval=0))
        try:
            await verifier.verify(token(keys.rsa_a))
            idp.status = 500
            await asyncio.sleep(0.1)
            assert (await verifier.verify(token(keys.rsa_a))).name == "alice"
            idp.stop()  # now nothing listens at all
            await asyncio.sleep(0.1)
            assert (await verifier.verify(token(keys.ec, "ES256", "ec-1"))).name == "alice"
        finally:
            await verifier.close()

    asyncio.run(main())
    assert idp.requests == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HTTP 500" in w and "keeping 2 cached keys" in w for w in warnings)
    assert any("ConnectError" in w for w in warnings)


def test_no_keys_at_all_is_503_and_the_idp_is_not_hammered(keys: SimpleNamespace, idp: JWKSServer) -> None:
    tok = token(keys.rsa_a)
    idp.raw_body = b"<html>oops</html>"
    exc = refused(config(idp), tok, "identity provider keys unavailable", status=503)
    assert exc.code == "jwks_unavailable"
    idp.raw_body, idp.status = b"", 404
    refused(config(idp), tok, "identity provider keys unavailable", status=503)
    idp.raw_body, idp.status = json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "rsa-a"}]}).encode(), 200
    refused(config(idp), tok, "identity provider keys unavailable", status=503)  # shared secrets never count

    async def main() -> None:
        verifier = JWTVerifier(config(idp))
        try:
            for _ in range(5):
                with pytest.raises(GatewayError) as info:
                    await verifier.verify(tok)
                assert info.value.status == 503
        finally:
            await verifier.close()

    before = idp.requests
    asyncio.run(main())
    assert idp.requests == before + 1  # failed fetches are rate-limited too


def test_jwks_file_is_reread_when_it_changes(keys: SimpleNamespace, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "jwks.json"

    def write(jwks: list[dict[str, Any]], when: float) -> None:
        staged = tmp_path / "jwks.json.new"
        staged.write_text(json.dumps({"keys": jwks}))
        os.utime(staged, (when, when))
        os.replace(staged, path)  # how operators (and config-map mounts) swap files: atomically

    async def main() -> None:
        verifier = JWTVerifier(config(jwks_file=str(path)))
        try:
            write([keys.jwk_a], time.time() - 10)
            assert (await verifier.verify(token(keys.rsa_a))).name == "alice"
            write([keys.jwk_b], time.time())
            assert (await verifier.verify(token(keys.rsa_b, kid="rsa-b"))).name == "alice"
            with pytest.raises(GatewayError) as info:
                await verifier.verify(token(keys.rsa_a))
            assert_refused(info.value, "signing key is unknown", _ISSUED[-1])
            path.write_text("{ not json")  # a broken edit keeps the last good keys
            assert (await verifier.verify(token(keys.rsa_b, kid="rsa-b"))).name == "alice"
        finally:
            await verifier.close()

    asyncio.run(main())
    missing = config(jwks_file=str(tmp_path / "absent.json"))
    tok = token(keys.rsa_a)

    async def absent() -> None:
        verifier = JWTVerifier(missing)
        try:
            for _ in range(3):
                with pytest.raises(GatewayError) as info:
                    await verifier.verify(tok)
                assert_refused(info.value, "identity provider keys unavailable", tok, status=503)
        finally:
            await verifier.close()

    caplog.clear()
    asyncio.run(absent())
    # reported once, not on every request
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [logging.ERROR]


# ------------------------------------------------------------------ config and token shape

@pytest.mark.parametrize("overrides, fragment", [
    ({"algorithms": ("RS256", "HS256")}, "'HS256' is not allowed"),
    ({"algorithms": ("none",)}, "'none' is not allowed"),
    ({"algorithms": ()}, "must not be empty"),
    ({"clock_skew": 301}, "clock_skew"),
    ({"clock_skew": -1}, "clock_skew"),
    ({"clock_skew": float("nan")}, "clock_skew"),
    ({"jwks_file": "/etc/jwks.json"}, "exactly one"),
    ({"jwks_url": None}, "exactly one"),
    ({"jwks_url": "http://idp.example.com/certs"}, "https"),
    ({"jwks_url": "ftp://idp.example.com/certs"}, "http(s)"),
    ({"audience": ()}, "audience"),
    ({"issuer": ""}, "issuer"),
    ({"jwks_cache_ttl": 0}, "positive"),
    ({"default_tenant": ""}, "default_tenant"),
])
def test_config_validation(overrides: dict[str, Any], fragment: str) -> None:
    base: dict[str, Any] = {"issuer": ISSUER, "audience": (AUDIENCE,), "jwks_url": "https://idp.example.com/certs"}
    with pytest.raises(ValueError, match="oidc") as info:
        OIDCConfig(**{**base, **overrides})
    assert fragment in str(info.value)


def test_config_normalises_lists_and_allows_explicit_insecure_url() -> None:
    cfg = OIDCConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url="http://keycloak:8080/certs",  # type: ignore[arg-type]
                     algorithms=["ES256"], allow_insecure_jwks_url=True)  # type: ignore[arg-type]
    assert (cfg.audience, cfg.algorithms) == ((AUDIENCE,), ("ES256",))


def test_looks_like_jwt(keys: SimpleNamespace) -> None:
    assert looks_like_jwt(token(keys.rsa_a))
    assert looks_like_jwt(forged({"alg": "none"}))  # still a JWT: the verifier refuses it with a reason
    for other in ("sk-ss-0123456789abcdef", "a.b", "a.b.c.d", f"{_b64(b'not json')}.e30.sig",
                  f"{_b64(json.dumps({'typ': 'JWT'}).encode())}.e30.sig", "e30.e30.s!g", ""):
        assert not looks_like_jwt(other), other
