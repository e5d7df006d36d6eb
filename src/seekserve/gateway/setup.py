"""Builds the gateway's parts from Settings: the store (migrated on start-up), the key pepper, the
authenticator, the rate limiter (Redis when configured), upstream backends and the router, the sensitivity
classifier, the response cache, Kafka sync, the record writer and the pipeline. One place, so
`create_app` and the CLI read the same settings the same way."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from seekserve.backends.base import Backend
from seekserve.backends.remote import RemoteBackend, RemoteBackendConfig, RemoteModel
from seekserve.config import Settings
from seekserve.gateway.auth import Authenticator
from seekserve.gateway.bootstrap import SetupError, load_pepper, open_store  # noqa: F401 (re-exported)
from seekserve.gateway.cache import CachePolicy, ResponseCache, open_response_cache
from seekserve.gateway.oidc import JWTVerifier, OIDCConfig
from seekserve.gateway.pipeline import Gateway
from seekserve.gateway.principal import Limits, Role, Tier
from seekserve.gateway.ratelimit import InProcessRateLimiter, RateLimiter
from seekserve.gateway.resilience import BreakerConfig, RetryPolicy
from seekserve.gateway.routing import BackendEntry, Router, RouteRule, default_rules
from seekserve.gateway.sensitivity import Level, SensitivityClassifier, SensitivityPolicy
from seekserve.gateway.usage import Price, RecordWriter
from seekserve.store.audit import AuditLog
from seekserve.store.db import Database
from seekserve.store.keys import KeyStore
from seekserve.store.outbox import Outbox
from seekserve.store.usage import UsageStore

if TYPE_CHECKING:
    from seekserve.gateway.sync import EventPublisher, OutboxRelay

log = logging.getLogger("seekserve.gateway")


def oidc_config(settings: Settings) -> OIDCConfig | None:
    o = settings.oidc
    if o is None:
        return None
    return OIDCConfig(issuer=o.issuer, audience=tuple(o.audience), jwks_url=o.jwks_url, jwks_file=o.jwks_file,
                      algorithms=tuple(o.algorithms), clock_skew=o.clock_skew, role_claim=o.role_claim,
                      tenant_claim=o.tenant_claim, tier_claim=o.tier_claim, models_claim=o.models_claim,
                      default_role=None if o.default_role is None else Role(o.default_role),
                      default_tier=Tier(o.default_tier), default_tenant=o.default_tenant)


def build_limiter(settings: Settings, registry: CollectorRegistry) -> RateLimiter:
    if settings.redis_url is None:
        return InProcessRateLimiter(registry=registry)
    from seekserve.gateway.ratelimit_redis import RedisRateLimiter  # only with Redis: keeps start-up lean

    return RedisRateLimiter(settings.redis_url.get_secret_value(), failure_mode=settings.rate_limit_failure_mode,
                            registry=registry)


def build_upstreams(settings: Settings) -> dict[str, RemoteBackend]:
    out: dict[str, RemoteBackend] = {}
    for u in settings.upstreams:
        if u.name == "local" or u.name in out:
            raise SetupError(f"upstream name {u.name!r} is used twice (or is the reserved name 'local')")
        config = RemoteBackendConfig(
            name=u.name, base_url=u.base_url, api_key_env=u.api_key_env, api_key_file=u.api_key_file,
            models=tuple(RemoteModel(alias=m.alias, upstream=m.upstream or m.alias, max_model_len=m.max_model_len,
                                     reasoning=m.reasoning) for m in u.models),
            connect_timeout=u.connect_timeout, read_timeout=u.read_timeout, max_connections=u.max_connections,
            ca_file=u.ca_file, proxy=u.proxy.get_secret_value() if u.proxy else None, remote=u.remote)
        out[u.name] = RemoteBackend(config)
    return out


def build_router(settings: Settings, backends: dict[str, Backend], registry: CollectorRegistry) -> Router:
    entries = []
    for name, backend in backends.items():
        remote = isinstance(backend, RemoteBackend) and backend.config.remote
        depth = getattr(backend, "num_queued", None)
        queue_depth = (lambda b=backend: b.num_queued) if depth is not None else None
        entries.append(BackendEntry(name=name, backend=backend, remote=remote, queue_depth=queue_depth,
                                    in_process=not isinstance(backend, RemoteBackend)))
    try:
        rules = ([RouteRule.model_validate(r) for r in settings.routes] if settings.routes
                 else default_rules("local", [n for n in backends if n != "local"]))
    except ValidationError as e:
        raise SetupError(f"invalid routing rule: {e.errors(include_url=False, include_input=False)}") from None
    r = settings.retry
    return Router(entries, rules, RetryPolicy(r.max_attempts, r.base_backoff, r.max_backoff, r.max_retry_after,
                                              r.first_chunk_timeout),
                  BreakerConfig(r.failure_threshold, r.reset_timeout), registry)


def build_classifier(settings: Settings) -> SensitivityClassifier:
    s = settings.sensitivity
    policy = SensitivityPolicy(keywords=tuple(s.keywords), patterns=s.patterns,
                               tenant_levels={t: Level.parse(v) for t, v in s.tenant_levels.items()},
                               pii_level=Level.parse(s.pii_level), keyword_level=Level.parse(s.keyword_level),
                               default_level=Level.parse(s.default_level),
                               **({"detectors": frozenset(s.detectors)} if s.detectors is not None else {}))
    return SensitivityClassifier(policy)


def build_sync(settings: Settings, db: Database, registry: CollectorRegistry
               ) -> tuple[OutboxRelay, EventPublisher] | None:  # noqa: F821 (imported lazily)
    s = settings.sync
    if s is None:
        return None
    from seekserve.gateway.sync import EventPublisher, OutboxRelay, SyncConfig  # only with Kafka configured

    config = SyncConfig(bootstrap_servers=s.bootstrap_servers, site=settings.site, usage_topic=s.usage_topic,
                        audit_topic=s.audit_topic, security_protocol=s.security_protocol,
                        sasl_mechanism=s.sasl_mechanism, sasl_username=s.sasl_username,
                        sasl_password_env=s.sasl_password_env, ssl_cafile=s.ssl_cafile,
                        enable_idempotence=s.enable_idempotence, batch_size=s.batch_size,
                        poll_interval=s.poll_interval, max_backoff=s.max_backoff, send_timeout=s.send_timeout,
                        retain_delivered=s.retain_delivered)
    outbox = Outbox(db)
    relay = OutboxRelay(config, outbox, registry)
    return relay, EventPublisher(outbox, config, notify=relay.notify)


@dataclass
class GatewayParts:
    db: Database
    backends: dict[str, Backend]
    keys: KeyStore
    usage: UsageStore
    audit: AuditLog
    writer: RecordWriter
    limiter: RateLimiter
    auth: Authenticator
    gateway: Gateway
    cache: ResponseCache | None = None
    relay: OutboxRelay | None = None

    async def start(self) -> None:
        if self.relay is not None:
            await self.relay.start()

    async def close(self) -> None:
        """Flush records (into the store and the outbox), hand the outbox to Kafka, close clients."""
        await asyncio.to_thread(self.writer.close)
        if self.relay is not None:
            await self.relay.stop(timeout=5.0)
        await self.limiter.close()
        if self.cache is not None:
            await self.cache.close()
        if self.auth.jwt is not None:
            await self.auth.jwt.close()
        for name, backend in self.backends.items():
            if name != "local":     # the local engine belongs to the server, which closes it last
                await backend.close()
        self.db.close()


def build_gateway(settings: Settings, local: dict[str, Backend], registry: CollectorRegistry) -> GatewayParts:
    backends = {**local, **build_upstreams(settings)}
    router = build_router(settings, backends, registry)
    db = open_store(settings)
    pepper = load_pepper(settings)
    keys, usage, audit = KeyStore(db, pepper), UsageStore(db), AuditLog(db, settings.site)
    sync = build_sync(settings, db, registry)
    writer = RecordWriter(usage, audit, on_written=_publishing(sync[1]) if sync else None)
    oidc = oidc_config(settings)
    auth = Authenticator(keys, pepper, settings.api_key, JWTVerifier(oidc) if oidc is not None else None)
    limiter = build_limiter(settings, registry)
    rc = settings.response_cache
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url is not None else None
    cache = (open_response_cache(redis_url, registry, max_entries=rc.max_entries, max_bytes=rc.max_bytes)
             if rc.enabled else None)
    tenant_limits = {t: Limits(rps=v.rps, rpm=v.rpm, tpm=v.tpm, max_concurrency=v.max_concurrency)
                     for t, v in settings.tenant_limits.items()}
    gateway = Gateway(limiter, writer, router=router, classifier=build_classifier(settings), cache=cache,
                      cache_policy=CachePolicy(enabled=rc.enabled, ttl=rc.ttl,
                                               cache_sensitive_tenants=frozenset(rc.sensitive_tenants)),
                      tenant_limits=tenant_limits, prices={m: Price(**p) for m, p in settings.model_prices.items()},
                      default_max_tokens=settings.default_max_tokens_reservation, site=settings.site)
    return GatewayParts(db, backends, keys, usage, audit, writer, limiter, auth, gateway, cache,
                        sync[0] if sync else None)


def _publishing(publisher: EventPublisher):
    def publish(usage: list, audits: list) -> None:
        if usage:
            publisher.publish_usage(usage)
        if audits:
            publisher.publish_audit(audits)
    return publish
