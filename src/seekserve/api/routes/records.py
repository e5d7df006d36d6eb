"""Usage and audit records. Developers see their own key's usage only: asking for another key or tenant
answers 404, exactly as for records that do not exist, so the API does not reveal what others have.
Admins and auditors read everyone's usage; auditors read the audit log and can verify its hash chain."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from seekserve.api.context import Context, requires
from seekserve.api.errors import APIError
from seekserve.gateway.principal import Principal
from seekserve.gateway.rbac import Permission, has_permission

router = APIRouter(tags=["records"])
Limit = Annotated[int, Query(ge=1, le=10_000)]


def _scope(principal: Principal, tenant: str | None, key_id: str | None) -> tuple[str | None, str | None]:
    """Object-level rule: without usage:read:all, the only records are the caller's own."""
    if has_permission(principal, Permission.usage_read_all):
        return tenant, key_id
    if (tenant is not None and tenant != principal.tenant) or (key_id is not None and key_id != principal.subject):
        raise APIError(404, "No usage records found for that tenant or key.", code="not_found")
    return principal.tenant, principal.subject


@router.get("/v1/usage", summary="Usage records, newest first")
async def usage(ctx: Context, principal: Annotated[Principal, requires(Permission.usage_read_own)],
                tenant: str | None = None, key_id: str | None = None, since: datetime | None = None,
                until: datetime | None = None, limit: Limit = 1000) -> dict[str, Any]:
    tenant, key_id = _scope(principal, tenant, key_id)
    await asyncio.to_thread(ctx.writer.flush, 2.0)   # what this caller just did is included
    records = await asyncio.to_thread(ctx.usage.query, tenant, key_id, since, until, limit)
    return {"object": "list", "data": [r.to_dict() for r in records]}


@router.get("/v1/usage/summary", summary="Usage totals by tenant, key and model")
async def usage_summary(ctx: Context, principal: Annotated[Principal, requires(Permission.usage_read_own)],
                        tenant: str | None = None, key_id: str | None = None, since: datetime | None = None,
                        until: datetime | None = None) -> dict[str, Any]:
    tenant, key_id = _scope(principal, tenant, key_id)
    await asyncio.to_thread(ctx.writer.flush, 2.0)
    return {"object": "list", "data": await asyncio.to_thread(ctx.usage.summary, tenant, key_id, since, until)}


@router.get("/admin/audit", summary="Audit records, newest first")
async def audit(ctx: Context, principal: Annotated[Principal, requires(Permission.audit_read)],
                tenant: str | None = None, action: str | None = None, since: datetime | None = None,
                until: datetime | None = None, limit: Limit = 1000) -> dict[str, Any]:
    await asyncio.to_thread(ctx.writer.flush, 2.0)
    records = await asyncio.to_thread(ctx.audit.query, tenant, since, until, action, limit)
    return {"object": "list", "data": [r.to_dict() for r in records]}


@router.get("/admin/audit/verify", summary="Recompute the audit hash chain")
async def audit_verify(ctx: Context, principal: Annotated[Principal, requires(Permission.audit_read)]
                       ) -> dict[str, Any]:
    await asyncio.to_thread(ctx.writer.flush, 2.0)
    ok, first_bad = await asyncio.to_thread(ctx.audit.verify)
    return {"ok": ok, "first_bad_seq": first_bad}


@router.get("/admin/settings", summary="The effective settings (secrets masked)")
async def settings(ctx: Context, principal: Annotated[Principal, requires(Permission.settings_read)]
                   ) -> dict[str, Any]:
    data = ctx.settings.model_dump(mode="json")            # SecretStr fields dump as "**********"
    data["api_key"] = ["**********" for _ in data.get("api_key", [])]
    return data
