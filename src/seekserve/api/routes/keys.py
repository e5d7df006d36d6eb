"""/admin/keys: API-key management for admins (the same operations as `seekserve keys`). A secret is in
the response to create and rotate only; every change is written to the audit log."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from seekserve.api.context import AppContext, Context, requires
from seekserve.api.errors import APIError
from seekserve.gateway.principal import Limits, Principal, Role, Tier
from seekserve.gateway.rbac import Permission, check_can_grant
from seekserve.store.audit import AuditEvent
from seekserve.store.keys import KeyStoreError, parse_duration

router = APIRouter(prefix="/admin/keys", tags=["admin"])
Admin = Annotated[Principal, requires(Permission.keys_manage)]
_STATUS = {"not_found": 404, "conflict": 409, "invalid": 400}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    role: Literal["developer", "admin", "auditor"] = "developer"
    tenant: str = Field(min_length=1, max_length=128)
    tier: Literal["vip", "standard", "batch"] = "standard"
    models: list[str] | None = None
    rps: float | None = Field(None, gt=0)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    expires_in: str | None = Field(None, description="e.g. 30d, 12h")


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace: str = Field("24h", description="how long the old key keeps working, e.g. 24h")


def _duration(text: str, param: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def _store_error(e: KeyStoreError) -> APIError:
    return APIError(_STATUS.get(e.kind, 400), str(e), code=f"key_{e.kind}")


def _audit(ctx: AppContext, admin: Principal, action: str, target: str, detail: dict[str, Any]) -> None:
    ctx.writer.add_audit(AuditEvent(actor=admin.subject, tenant=admin.tenant, action=action, target=target,
                                    detail=detail))


@router.get("", summary="List API keys (never their secrets)")
async def list_keys(ctx: Context, admin: Admin, tenant: str | None = None,
                    include_revoked: Annotated[bool, Query()] = True) -> dict[str, Any]:
    records = await asyncio.to_thread(ctx.keys.list, tenant, include_revoked)
    return {"object": "list", "data": [r.to_public_dict() for r in records]}


@router.post("", summary="Create an API key (the secret is shown once)", status_code=201)
async def create_key(body: KeyCreate, ctx: Context, admin: Admin) -> JSONResponse:
    role, tier = Role(body.role), Tier(body.tier)
    models = None if body.models is None else frozenset(body.models)
    limits = Limits(rps=body.rps, rpm=body.rpm, tpm=body.tpm, max_concurrency=body.max_concurrency)
    check_can_grant(admin, role, tier, models, limits)
    expires = (datetime.now(timezone.utc) + _duration(body.expires_in, "expires_in")) if body.expires_in else None
    try:
        record, secret = await asyncio.to_thread(
            ctx.keys.create, body.name, role, body.tenant, tier, None if models is None else sorted(models),
            limits, expires, admin.subject)
    except KeyStoreError as e:
        raise _store_error(e) from None
    ctx.auth.keys_changed()
    _audit(ctx, admin, "key.create", record.id, {"name": record.name, "role": role.value,
                                                  "tenant": record.tenant, "tier": tier.value})
    return JSONResponse({**record.to_public_dict(), "key": secret}, status_code=201)


@router.get("/{key}", summary="Show one API key")
async def get_key(key: str, ctx: Context, admin: Admin) -> dict[str, Any]:
    record = await asyncio.to_thread(ctx.keys.get, key)
    if record is None:
        raise APIError(404, f"No API key with id or name '{key}'.", code="key_not_found")
    return record.to_public_dict()


@router.post("/{key}/revoke", summary="Revoke an API key now")
async def revoke_key(key: str, ctx: Context, admin: Admin) -> dict[str, Any]:
    try:
        record = await asyncio.to_thread(ctx.keys.revoke, key)
    except KeyStoreError as e:
        raise _store_error(e) from None
    ctx.auth.keys_changed()
    _audit(ctx, admin, "key.revoke", record.id, {"name": record.name})
    return record.to_public_dict()


@router.post("/{key}/rotate", summary="Replace an API key; the old one works for a grace period")
async def rotate_key(key: str, ctx: Context, admin: Admin, body: KeyRotate | None = None) -> dict[str, Any]:
    grace = _duration((body or KeyRotate()).grace, "grace")
    old = await asyncio.to_thread(ctx.keys.get, key)
    if old is None:
        raise APIError(404, f"No API key with id or name '{key}'.", code="key_not_found")
    check_can_grant(admin, old.role, old.tier, old.models, old.limits)
    try:
        record, secret = await asyncio.to_thread(ctx.keys.rotate, key, grace, admin.subject)
    except KeyStoreError as e:
        raise _store_error(e) from None
    ctx.auth.keys_changed()
    _audit(ctx, admin, "key.rotate", record.id, {"name": record.name, "replaces": old.id,
                                                  "grace_seconds": grace.total_seconds()})
    return {**record.to_public_dict(), "key": secret, "replaces": old.id}
