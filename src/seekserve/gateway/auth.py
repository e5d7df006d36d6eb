"""Authentication: `Authorization: Bearer <credential>` (the header only, never the query string) becomes a
Principal. The credential is an API key from the store (`sk-ss-…`), a static bootstrap key, or a JWT from
the configured issuer. Verified keys are cached by their HMAC hash for a few seconds, so a request does not
cost a database read; revocation therefore takes effect within `cache_ttl` on every replica."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

from seekserve.gateway.errors import unauthenticated
from seekserve.gateway.oidc import JWTVerifier, looks_like_jwt
from seekserve.gateway.principal import Limits, Principal, Role, Tier
from seekserve.store.keys import ApiKeyRecord, KeyStore, hash_secret

ANONYMOUS = Principal(subject="anonymous", name="anonymous", kind="anonymous", role=Role.developer,
                      tenant="default")
MAX_CREDENTIAL_LEN = 8192   # a JWT with many claims fits; anything longer is refused before any work


def principal_of_key(record: ApiKeyRecord) -> Principal:
    return Principal(subject=record.id, name=record.name, kind="api_key", role=record.role,
                     tenant=record.tenant, tier=record.tier, models=record.models, limits=record.limits)


@dataclass
class _Cached:
    principal: Principal | None    # None: a credential known to be invalid
    expires: float


class Authenticator:
    def __init__(self, keys: KeyStore, pepper: bytes, static_keys: list[str], jwt: JWTVerifier | None,
                 cache_ttl: float = 5.0, max_cached: int = 100_000) -> None:
        self.keys, self.pepper, self.jwt = keys, pepper, jwt
        self.static = [hash_secret(k, pepper) for k in static_keys]
        self.cache_ttl, self.max_cached = cache_ttl, max_cached
        self._cache: dict[str, _Cached] = {}
        self._store_has_keys: tuple[bool, float] = (False, 0.0)

    async def auth_required(self) -> bool:
        """Without static keys, an issuer or any key in the store, the server runs open (loopback only)."""
        if self.static or self.jwt is not None:
            return True
        has, checked = self._store_has_keys
        if not has and time.monotonic() - checked > self.cache_ttl:
            has = await asyncio.to_thread(self.keys.has_usable_keys)
            self._store_has_keys = (has, time.monotonic())
        return has

    def keys_changed(self) -> None:
        """A key was created or revoked through this process: forget cached answers now."""
        self._cache.clear()
        self._store_has_keys = (False, 0.0)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not await self.auth_required():
            # an open server (loopback, or --allow-unauthenticated): clients such as the openai SDK always
            # send some key ("unused"); there is nothing to check it against
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:   # absent, empty, or not a Bearer credential
            raise unauthenticated("You didn't provide an API key. Send it as 'Authorization: Bearer "
                                  "YOUR_KEY'.", code="missing_api_key")
        if len(token) > MAX_CREDENTIAL_LEN:
            raise unauthenticated("Incorrect API key provided.")
        if self.jwt is not None and looks_like_jwt(token):
            return await self.jwt.verify(token)
        return await self._api_key(token)

    async def _api_key(self, token: str) -> Principal:
        digest = hash_secret(token, self.pepper)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is None or hit.expires < now:
            hit = _Cached(await self._lookup(token, digest), now + self.cache_ttl)
            if len(self._cache) >= self.max_cached:
                self._cache.clear()       # bounded: a flood of random keys cannot grow memory
            self._cache[digest] = hit
        if hit.principal is None:
            raise unauthenticated("Incorrect API key provided.")
        return hit.principal

    async def _lookup(self, token: str, digest: str) -> Principal | None:
        matched = False
        for static in self.static:   # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(digest, static)
        if matched:
            # a static key (--api-key) is the bootstrap credential: an unrestricted admin
            return Principal(subject=f"static:{digest[:12]}", name="static-key", kind="static", role=Role.admin,
                             tenant="default", tier=Tier.standard, limits=Limits())
        record = await asyncio.to_thread(self.keys.verify, token)
        return principal_of_key(record) if record is not None else None

