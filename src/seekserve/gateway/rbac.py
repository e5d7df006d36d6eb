"""Role-based access control: which role holds which permission. Every HTTP route declares exactly one
permission (checked at app start-up), so a route added without one fails loudly instead of being open.
Object-level rules (a developer only sees its own records) live with the data queries, not here."""

from __future__ import annotations

from enum import Enum

from seekserve.gateway.errors import GatewayError
from seekserve.gateway.principal import ROLE_RANK, TIER_PRIORITY, Limits, Principal, Role, Tier


class Permission(str, Enum):
    public = "public"                    # probes and metrics: no credentials needed
    inference = "inference"              # chat/completions on the models the key allows
    models_read = "models:read"          # list the models the key allows
    usage_read_own = "usage:read:own"    # the caller's own usage records
    usage_read_all = "usage:read:all"    # every tenant's usage records
    audit_read = "audit:read"            # the audit log and its verification
    keys_manage = "keys:manage"          # create, list, revoke, rotate API keys
    settings_read = "settings:read"      # the effective settings, secrets masked


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.developer: frozenset({Permission.inference, Permission.models_read, Permission.usage_read_own}),
    # admins run the service: keys, settings, all usage, and they may call models. They do not read the
    # audit log: that is the auditor's record of what admins did (separation of duties).
    Role.admin: frozenset({Permission.inference, Permission.models_read, Permission.usage_read_own,
                           Permission.usage_read_all, Permission.keys_manage, Permission.settings_read}),
    # auditors read records and nothing else: no inference, no key management
    Role.auditor: frozenset({Permission.usage_read_own, Permission.usage_read_all, Permission.audit_read}),
}


def has_permission(principal: Principal, permission: Permission) -> bool:
    return permission is Permission.public or permission in ROLE_PERMISSIONS[principal.role]


def check(principal: Principal, permission: Permission) -> None:
    if not has_permission(principal, permission):
        raise GatewayError(403, f"Your role '{principal.role.value}' does not have the permission "
                                f"'{permission.value}' this endpoint needs.", code="permission_denied",
                           error_type="permission_error")


def check_can_grant(creator: Principal, role: Role, tier: Tier, models: frozenset[str] | None,
                    limits: Limits) -> None:
    """A key is never minted with more rights than its creator's: no higher role, no better tier, no model
    the creator may not call, no limit looser than the creator's own."""
    def refuse(what: str) -> None:
        raise GatewayError(403, f"You cannot create a key with {what} than your own.", code="permission_denied",
                           error_type="permission_error")

    if ROLE_RANK[role] > ROLE_RANK[creator.role]:
        refuse(f"a higher role ('{role.value}')")
    if TIER_PRIORITY[tier] < TIER_PRIORITY[creator.tier]:
        refuse(f"a better tier ('{tier.value}')")
    if creator.models is not None and (models is None or not models <= creator.models):
        refuse("access to more models")
    for name in ("rps", "rpm", "tpm", "max_concurrency"):
        mine, theirs = getattr(creator.limits, name), getattr(limits, name)
        if mine is not None and (theirs is None or theirs > mine):
            refuse(f"a looser {name} limit")
