"""`seekserve keys …` and `seekserve db upgrade`: key management and migrations straight on the store.
They read the same settings as `serve` (--database-url / SEEKSERVE_DATABASE_URL, --data-dir, the config
file, SEEKSERVE_KEY_PEPPER), so a key created here works on every replica sharing that store."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from seekserve.gateway.principal import Limits, Role, Tier

KEY_COLUMNS = ("id", "name", "role", "tenant", "tier", "limits", "created_at", "last_used_at", "status")


def _settings(a: argparse.Namespace):
    from seekserve.config import load_settings

    flags = {"database_url": a.database_url, "data_dir": a.data_dir}
    return load_settings(flags, a.config_file)


def _store(a: argparse.Namespace):
    from seekserve.gateway.bootstrap import load_pepper, open_store
    from seekserve.store.keys import KeyStore

    settings = _settings(a)
    return KeyStore(open_store(settings), load_pepper(settings)), settings


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="config_file", default=None, help="YAML file of settings [env SEEKSERVE_CONFIG]")
    p.add_argument("--database-url", default=None,
                   help="SQLAlchemy URL of the store (default: SQLite in --data-dir) [env SEEKSERVE_DATABASE_URL]")
    p.add_argument("--data-dir", default=None, help="folder of the embedded store [env SEEKSERVE_DATA_DIR]")


def _limits_text(limits: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in limits.items() if v is not None]
    return ",".join(parts) or "-"


def _print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[str(r[c] if c != "limits" else _limits_text(r[c])) if r[c] is not None else "-" for c in KEY_COLUMNS]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(KEY_COLUMNS)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(KEY_COLUMNS, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _show_secret(record: dict[str, Any], secret: str, what: str) -> None:
    print(f"{what} {record['id']} ({record['name']}, role {record['role']}, tenant {record['tenant']}, "
          f"tier {record['tier']}).", file=sys.stderr)
    print("The secret is shown once; store it now:", file=sys.stderr)
    print(secret)


def cmd_keys_create(a: argparse.Namespace) -> int:
    from seekserve.store.keys import parse_duration

    store, _ = _store(a)
    expires = datetime.now(timezone.utc) + parse_duration(a.expires) if a.expires else None
    models = [m.strip() for m in a.models.split(",") if m.strip()] if a.models else None
    record, secret = store.create(a.name, Role(a.role), a.tenant, Tier(a.tier), models,
                                  Limits(rps=a.rps, rpm=a.rpm, tpm=a.tpm, max_concurrency=a.max_concurrency),
                                  expires, "cli")
    _show_secret(record.to_public_dict(), secret, "Created key")
    return 0


def cmd_keys_list(a: argparse.Namespace) -> int:
    store, _ = _store(a)
    rows = [r.to_public_dict() for r in store.list(a.tenant, include_revoked=not a.active)]
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


def cmd_keys_revoke(a: argparse.Namespace) -> int:
    store, _ = _store(a)
    record = store.revoke(a.key)
    print(f"Revoked {record.id} ({record.name}).")
    return 0


def cmd_keys_rotate(a: argparse.Namespace) -> int:
    from seekserve.store.keys import parse_duration

    store, _ = _store(a)
    old = store.get(a.key)
    record, secret = store.rotate(a.key, parse_duration(a.grace), "cli")
    print(f"The old key {old.id if old else a.key} keeps working for {a.grace}.", file=sys.stderr)
    _show_secret(record.to_public_dict(), secret, "New key")
    return 0


def cmd_db_upgrade(a: argparse.Namespace) -> int:
    from seekserve.store.db import current_revision, upgrade

    url = _settings(a).effective_database_url()
    upgrade(url)
    print(f"database at revision {current_revision(url)}")
    return 0


def cmd_sync_consume(a: argparse.Namespace) -> int:
    import asyncio

    from seekserve.gateway.sync_consumer import run_consumer_cli

    settings = _settings(a)
    sync = settings.sync
    bootstrap = a.bootstrap_servers or (sync.bootstrap_servers if sync else None)
    if not bootstrap:
        print("seekserve: error: give --bootstrap-servers (or sync.bootstrap_servers in the config)", file=sys.stderr)
        return 2
    options: dict[str, Any] = {}
    if sync is not None:
        options = {k: getattr(sync, k) for k in ("usage_topic", "audit_topic", "security_protocol", "sasl_mechanism",
                                                 "sasl_username", "sasl_password_env", "ssl_cafile")}
    return asyncio.run(run_consumer_cli(settings.effective_database_url(), bootstrap, a.site or settings.site,
                                        a.group_id, a.once, options=options, idle_timeout=a.idle_timeout))


def add_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys (create, list, revoke, rotate)")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="create a key; prints the secret once")
    c.add_argument("--name", required=True, help="unique name ([A-Za-z0-9._-], up to 64)")
    c.add_argument("--role", required=True, choices=[r.value for r in Role])
    c.add_argument("--tenant", required=True, help="the team or customer the key belongs to")
    c.add_argument("--tier", default="standard", choices=[t.value for t in Tier],
                   help="scheduling priority: vip > standard > batch (default standard)")
    c.add_argument("--models", default=None, help="comma-separated models the key may call (default: all)")
    c.add_argument("--rps", type=float, default=None, help="requests per second")
    c.add_argument("--rpm", type=int, default=None, help="requests per minute")
    c.add_argument("--tpm", type=int, default=None, help="tokens per minute (prompt + completion)")
    c.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at once")
    c.add_argument("--expires", default=None, help="lifetime, e.g. 30d, 12h (default: never)")
    c.set_defaults(func=cmd_keys_create)
    ls = ks.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--tenant", default=None)
    ls.add_argument("--active", action="store_true", help="hide revoked keys")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    ls.set_defaults(func=cmd_keys_list)
    rv = ks.add_parser("revoke", help="revoke a key now")
    rv.add_argument("key", metavar="ID_OR_NAME")
    rv.set_defaults(func=cmd_keys_revoke)
    ro = ks.add_parser("rotate", help="replace a key; the old one works for a grace period")
    ro.add_argument("key", metavar="ID_OR_NAME")
    ro.add_argument("--grace", default="24h", help="how long the old key stays valid (default 24h)")
    ro.set_defaults(func=cmd_keys_rotate)
    for p in (c, ls, rv, ro):
        add_store_args(p)
    sync = sub.add_parser("sync", help="Kafka sync between sites")
    ss = sync.add_subparsers(dest="sync_command", required=True)
    co = ss.add_parser("consume", help="ingest other sites' usage and audit events into this store "
                                       "(idempotent: an event is stored once, however often it arrives)")
    co.add_argument("--bootstrap-servers", default=None,
                    help="Kafka brokers host:port[,...] (default: sync.bootstrap_servers of the config)")
    co.add_argument("--site", default=None, help="this site's name; its own events are skipped (default: --site "
                                                 "of the settings)")
    co.add_argument("--group-id", default=None, help="consumer group (default: seekserve-sync-<site>)")
    co.add_argument("--once", action="store_true", help="stop when caught up (after --idle-timeout s of silence)")
    co.add_argument("--idle-timeout", type=float, default=5.0)
    add_store_args(co)
    co.set_defaults(func=cmd_sync_consume)
    db = sub.add_parser("db", help="database maintenance")
    ds = db.add_subparsers(dest="db_command", required=True)
    up = ds.add_parser("upgrade", help="run the schema migrations (serve also does this at start-up)")
    add_store_args(up)
    up.set_defaults(func=cmd_db_upgrade)
