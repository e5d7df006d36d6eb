"""Who is calling: the identity every later pipeline step (RBAC, limits, routing, metering) works from.
A Principal is built by authentication (an API key or a JWT) and never changes during a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Role(str, Enum):
    developer = "developer"   # inference on the models its key allows; its own usage
    admin = "admin"           # keys, settings, everyone's usage and audit
    auditor = "auditor"       # audit and usage records, read-only; no inference, no key management


class Tier(str, Enum):
    vip = "vip"
    standard = "standard"
    batch = "batch"


# engine priority of each tier: lower runs first (vip < standard < batch)
TIER_PRIORITY: dict[Tier, int] = {Tier.vip: 0, Tier.standard: 1, Tier.batch: 2}
# rights are ordered: a creator may only mint keys at or below its own rank
ROLE_RANK: dict[Role, int] = {Role.auditor: 0, Role.developer: 0, Role.admin: 1}


@dataclass(frozen=True)
class Limits:
    """Per-key (or per-tenant) limits; None means unlimited."""
    rps: float | None = None             # requests per second
    rpm: int | None = None               # requests per minute
    tpm: int | None = None               # tokens per minute (prompt + max_tokens reserved, then reconciled)
    max_concurrency: int | None = None   # requests in flight at once

    def is_unlimited(self) -> bool:
        return self.rps is None and self.rpm is None and self.tpm is None and self.max_concurrency is None


@dataclass(frozen=True)
class Principal:
    subject: str                          # key id ("key_…"), JWT `sub`, or "anonymous"
    name: str                             # key name or JWT subject, for logs and audit
    kind: str                             # "api_key" | "jwt" | "anonymous"
    role: Role
    tenant: str
    tier: Tier = Tier.standard
    models: frozenset[str] | None = None  # None: every served model
    limits: Limits = field(default_factory=Limits)

    @property
    def priority(self) -> int:
        return TIER_PRIORITY[self.tier]

    def may_use_model(self, model: str) -> bool:
        return self.models is None or model in self.models
