"""OIDC bearer tokens: verifies JWTs from one configured issuer against its published keys (JWKS URL or
file) and maps their claims to a Principal. Only asymmetric algorithms are accepted and the header's alg
must fit the key it names, so a token never chooses how it is checked (no alg=none, no HS/RS confusion)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidSubjectError

from seekserve.gateway.errors import GatewayError, unauthenticated
from seekserve.gateway.principal import Limits, Principal, Role, Tier

logger = logging.getLogger("seekserve.gateway.oidc")

# algorithm → (key type, curve). Symmetric HS* and "none" are absent on purpose: with them the token's
# author, not the issuer's key, would decide whether the signature is good.
ALGORITHM_KEYS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None), "PS256": ("RSA", None),
    "ES256": ("EC", "secp256r1"), "ES384": ("EC", "secp384r1"),
}
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
_MAX_CLOCK_SKEW_S = 300.0
_MAX_TOKEN_CHARS = 16_384  # far above any IdP's tokens; bounds the work an anonymous caller can cause
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
E = TypeVar("E", bound=Enum)


@dataclass(frozen=True)
class OIDCConfig:
    """One trusted issuer. A claim name may be a dotted path into nested objects ("realm_access.roles");
    a top-level claim whose own name contains dots (a namespaced URL) is matched first."""
    issuer: str
    audience: tuple[str, ...]                  # the token's aud must contain at least one of these
    jwks_url: str | None = None                # exactly one of jwks_url / jwks_file
    jwks_file: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    clock_skew: float = 60.0                   # seconds of leeway for exp / nbf / iat, at most 300
    role_claim: str = "role"                   # a string, or a list: its first known role is taken
    tenant_claim: str = "tenant"
    tier_claim: str = "tier"
    default_role: Role | None = Role.developer  # None: the role claim is required
    default_tier: Tier = Tier.standard
    default_tenant: str | None = None          # None: the tenant claim is required
    models_claim: str | None = None            # list (or space-separated string) of models; absent: all
    jwks_cache_ttl: float = 300.0
    jwks_min_refresh_interval: float = 10.0    # unknown kids cannot make us fetch more often than this
    http_timeout: float = 5.0
    allow_insecure_jwks_url: bool = False      # plain http beyond loopback lets anyone on the path swap keys

    def __post_init__(self) -> None:
        # lists from a config loader become tuples; a bare string must not become a tuple of characters
        for name in ("audience", "algorithms"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        _check_identity(self)
        _check_key_source(self)
        _check_numbers(self)


def _check_identity(config: OIDCConfig) -> None:
    if not config.issuer:
        raise ValueError("oidc issuer must be set")
    if not config.audience or not all(isinstance(a, str) and a for a in config.audience):
        raise ValueError("oidc audience must be one or more non-empty strings")
    for alg in config.algorithms:
        if alg not in ALGORITHM_KEYS:
            raise ValueError(f"oidc algorithm {alg!r} is not allowed; use asymmetric ones: "
                             f"{', '.join(ALGORITHM_KEYS)}")
    if not config.algorithms:
        raise ValueError("oidc algorithms must not be empty")
    if config.default_tenant is not None and not config.default_tenant:
        raise ValueError("oidc default_tenant must be None or a non-empty string")


def _check_key_source(config: OIDCConfig) -> None:
    if (config.jwks_url is None) == (config.jwks_file is None):
        raise ValueError("oidc needs exactly one of jwks_url and jwks_file")
    if config.jwks_url is None:
        return
    parts = urlsplit(config.jwks_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("oidc jwks_url must be an http(s) URL with a host")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS and not config.allow_insecure_jwks_url:
        raise ValueError("oidc jwks_url must use https (plain http is allowed only on loopback, "
                         "or with allow_insecure_jwks_url)")


def _check_numbers(config: OIDCConfig) -> None:
    if not (math.isfinite(config.clock_skew) and 0 <= config.clock_skew <= _MAX_CLOCK_SKEW_S):
        raise ValueError(f"oidc clock_skew must be between 0 and {_MAX_CLOCK_SKEW_S:g} seconds")
    if not config.jwks_cache_ttl > 0 or not config.http_timeout > 0:
        raise ValueError("oidc jwks_cache_ttl and http_timeout must be positive")
    if not config.jwks_min_refresh_interval >= 0:
        raise ValueError("oidc jwks_min_refresh_interval must not be negative")


@dataclass(frozen=True)
class _SigningKey:
    kid: str | None
    alg: str | None  # the JWK's own "alg", when the IdP publishes one
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    def fits(self, alg: str) -> bool:
        """Whether a token whose header says `alg` may be checked with this key: same family and curve."""
        if self.alg is not None and self.alg != alg:
            return False
        kty, curve = ALGORITHM_KEYS[alg]
        if kty == "RSA":
            return isinstance(self.key, rsa.RSAPublicKey)
        return isinstance(self.key, ec.EllipticCurvePublicKey) and self.key.curve.name == curve


class _KeySet:
    def __init__(self, keys: list[_SigningKey]) -> None:
        self.keys = tuple(keys)
        self.by_kid = {k.kid: k for k in keys if k.kid is not None}


def _parse_jwks(document: Any) -> _KeySet:
    """The usable signature keys of a JWKS document; ValueError when there are none."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")  # noqa: TRY004  (bad data, not a bad call)
    keys = [key for key in map(_parse_jwk, document["keys"]) if key is not None]
    if not keys:
        raise ValueError("JWKS holds no usable RSA or EC signature key")
    return _KeySet(keys)


def _parse_jwk(jwk: Any) -> _SigningKey | None:
    # "oct" (shared-secret) keys are skipped: anyone holding the secret could mint tokens
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC"):
        return None
    kid = jwk["kid"] if isinstance(jwk.get("kid"), str) else None
    try:
        key = RSAAlgorithm.from_jwk(jwk) if jwk["kty"] == "RSA" else ECAlgorithm.from_jwk(jwk)
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        logger.warning("skipping JWKS key kid=%r: %s", kid, type(exc).__name__)
        return None
    if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        logger.warning("JWKS key kid=%r carries private parts; using its public half only", kid)
        key = key.public_key()
    return _SigningKey(kid, jwk["alg"] if isinstance(jwk.get("alg"), str) else None, key)


def _safe_url(url: str) -> str:
    """The URL without credentials, query or fragment, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _keys_unavailable() -> GatewayError:
    return GatewayError(503, "identity provider keys unavailable", code="jwks_unavailable",
                        error_type="service_unavailable")


class _KeyStore:
    """The issuer's current keys. From a URL: kept for jwks_cache_ttl, refetched early for an unknown kid,
    but never more often than jwks_min_refresh_interval, and one fetch at a time serves every waiter.
    From a file: re-read whenever its mtime, size or inode changes. A failed reload keeps the old keys."""

    def __init__(self, config: OIDCConfig, client: httpx.AsyncClient | None) -> None:
        self._config = config
        self._client, self._owns_client = client, client is None
        self._keys: _KeySet | None = None
        self._loaded_at = -math.inf
        self._attempted_at = -math.inf
        self._file_stamp: tuple[int, int, int] | None = (-1, -1, -1)  # never a real stat: first call reads
        self._lock = asyncio.Lock()

    async def get(self, kid: str | None) -> _KeySet:
        path, url = self._config.jwks_file, self._config.jwks_url
        if path is not None:
            self._reload_file_if_changed(path)
        elif url is not None and not self._is_usable(kid):
            async with self._lock:
                # a concurrent caller may have refreshed while we waited; its fetch serves us too
                if not self._is_usable(kid) and self._may_fetch():
                    stale = self._keys is None or kid is None or kid in self._keys.by_kid
                    await self._fetch(url, "cache expired" if stale else "unknown key id")
        if self._keys is None:
            raise _keys_unavailable()
        return self._keys

    def _is_usable(self, kid: str | None) -> bool:
        if self._keys is None or time.monotonic() - self._loaded_at >= self._config.jwks_cache_ttl:
            return False
        return kid is None or kid in self._keys.by_kid

    def _may_fetch(self) -> bool:
        # every attempt, failed ones too, counts: an IdP that is down is not retried on each request
        return time.monotonic() - self._attempted_at >= self._config.jwks_min_refresh_interval

    async def _fetch(self, url: str, reason: str) -> None:
        self._attempted_at = time.monotonic()
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._config.http_timeout)
        try:
            response = await self._client.get(url, headers={"Accept": "application/json"},
                                              timeout=self._config.http_timeout)
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            keys = _parse_jwks(response.json())
        except httpx.HTTPError as exc:  # its text may hold the URL's credentials: log the type only
            self._load_failed(_safe_url(url), type(exc).__name__)
            return
        except ValueError as exc:
            self._load_failed(_safe_url(url), str(exc) or type(exc).__name__)
            return
        self._install(keys, _safe_url(url), reason)

    def _reload_file_if_changed(self, path: str) -> None:
        try:
            st = os.stat(path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp  # a broken or missing file is reported once per change, not per request
        try:
            with open(path, "rb") as f:
                keys = _parse_jwks(json.loads(f.read()))
        except (OSError, ValueError) as exc:
            self._load_failed(path, f"{type(exc).__name__}: {exc}")
            return
        self._install(keys, path, "file changed")

    def _install(self, keys: _KeySet, source: str, reason: str) -> None:
        first = self._keys is None
        self._keys, self._loaded_at = keys, time.monotonic()
        logger.info("loaded %d signing keys (kids: %s) from %s (%s)", len(keys.keys),
                    ", ".join(sorted(keys.by_kid)) or "-", source, "first load" if first else reason)

    def _load_failed(self, source: str, detail: str) -> None:
        if self._keys is None:
            logger.error("cannot load signing keys from %s: %s", source, detail)
        else:
            logger.warning("cannot refresh signing keys from %s: %s; keeping %d cached keys",
                           source, detail, len(self._keys.keys))

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None


def _refused(message: str) -> GatewayError:
    return unauthenticated(message, code="invalid_token")


# PyJWT's refusals, most specific first (InvalidSignatureError is a DecodeError)
_DECODE_ERRORS: tuple[tuple[type[jwt.InvalidTokenError], str], ...] = (
    (jwt.ExpiredSignatureError, "token has expired"),
    (jwt.ImmatureSignatureError, "token is not valid yet (nbf or iat is in the future)"),
    (jwt.InvalidAudienceError, "token audience is not accepted"),
    (jwt.InvalidIssuerError, "token issuer does not match"),
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.InvalidAlgorithmError, "token signing algorithm is not allowed"),
    (jwt.InvalidIssuedAtError, "token 'iat' claim is malformed"),
    (InvalidSubjectError, "token 'sub' claim must be a string"),
    (jwt.DecodeError, "malformed bearer token"),
)


class JWTVerifier:
    """Turns a bearer JWT into a Principal, or refuses it with a 401 saying why (never echoing the token)."""

    def __init__(self, config: OIDCConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._keys = _KeyStore(config, client)

    async def verify(self, token: str) -> Principal:
        try:
            return _principal(self.config, await self._verified_claims(token))
        except GatewayError as exc:
            logger.debug("bearer token refused: %s", exc.message)
            raise

    async def close(self) -> None:
        await self._keys.close()

    async def _verified_claims(self, token: str) -> dict[str, Any]:
        header = _header(token)
        alg = header.get("alg")
        # checked before any key is touched: "none", HS*, or anything this issuer does not use
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            raise _refused("token signing algorithm is not allowed")
        if "crit" in header:
            raise _refused("token uses critical header extensions that are not supported")
        kid = header.get("kid")  # jku / x5u / jwk headers are ignored: keys only come from the config
        keys = await self._keys.get(kid)
        key = keys.by_kid.get(kid) if kid is not None else (keys.keys[0] if len(keys.keys) == 1 else None)
        if key is None:
            raise _refused("token signing key is unknown" if kid is not None else
                           "token has no key id (kid) and the issuer publishes several keys")
        if not key.fits(alg):
            raise _refused("token signing algorithm does not match its key")
        try:
            return jwt.decode(token, key.key, algorithms=[alg], audience=list(self.config.audience),
                              issuer=self.config.issuer, leeway=self.config.clock_skew,
                              options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.MissingRequiredClaimError as exc:
            raise _refused(f"token is missing the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            message = next((m for cls, m in _DECODE_ERRORS if isinstance(exc, cls)), "token is invalid")
            raise _refused(message) from None


def _header(token: str) -> dict[str, Any]:
    if not isinstance(token, str) or not token:
        raise _refused("bearer token is empty")
    if len(token) > _MAX_TOKEN_CHARS:
        raise _refused("bearer token is too large")
    try:
        return jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise _refused("malformed bearer token") from None


def _claim(claims: dict[str, Any], path: str) -> Any:
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _enum_claim(claims: dict[str, Any], name: str, kind: type[E], default: E | None) -> E:
    """A string claim naming one member of `kind`, or a list whose first known member wins."""
    value = _claim(claims, name)
    if value is None:
        if default is None:
            raise _refused(f"token is missing the {name!r} claim")
        return default
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and item in kind._value2member_map_:
            return kind(item)
    known = ", ".join(str(m.value) for m in kind)
    raise _refused(f"token {name!r} claim holds no known {kind.__name__.lower()} ({known})")


def _principal(config: OIDCConfig, claims: dict[str, Any]) -> Principal:
    subject = claims["sub"]  # required by decode
    if not isinstance(subject, str) or not subject.strip():
        raise _refused("token 'sub' claim is empty")
    tenant = _claim(claims, config.tenant_claim)
    if tenant is None and config.default_tenant is None:
        raise _refused(f"token is missing the {config.tenant_claim!r} claim")
    tenant = config.default_tenant if tenant is None else tenant
    if not isinstance(tenant, str) or not tenant.strip():
        raise _refused(f"token {config.tenant_claim!r} claim must be a non-empty string")
    return Principal(subject=f"jwt:{subject}", name=subject, kind="jwt",
                     role=_enum_claim(claims, config.role_claim, Role, config.default_role),
                     tenant=tenant, tier=_enum_claim(claims, config.tier_claim, Tier, config.default_tier),
                     models=_models(claims, config.models_claim), limits=Limits())


def _models(claims: dict[str, Any], name: str | None) -> frozenset[str] | None:
    value = None if name is None else _claim(claims, name)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split()  # space-separated, like OAuth's scope claim
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise _refused(f"token {name!r} claim must be a list of model names")
    return frozenset(value)


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer credential is shaped like a JWT (three base64url segments, a JSON header with
    "alg"), so the auth step sends it to JWTVerifier instead of the API-key lookup ("sk-ss-…")."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1] or not all(_B64URL.fullmatch(p) for p in parts):
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(header, dict) and "alg" in header
