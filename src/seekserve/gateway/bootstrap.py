"""What every command needs before anything else: the store (migrated) and the key pepper. Kept light
(no engine, no torch), so `seekserve keys …` and `seekserve db …` start in a second."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from seekserve.config import Settings
from seekserve.store.db import Database, upgrade

log = logging.getLogger("seekserve.gateway")


class SetupError(ValueError):
    """Settings that cannot work together (said before anything is served)."""


def load_pepper(settings: Settings) -> bytes:
    """--key-pepper, else <data-dir>/pepper, created once with 0600. Replicas sharing a PostgreSQL store must
    share the pepper too, so with --database-url it must be given explicitly."""
    if settings.key_pepper is not None:
        value = settings.key_pepper.get_secret_value().encode()
        if len(value) < 16:
            raise SetupError("key_pepper must be at least 16 characters")
        return value
    url = settings.effective_database_url()
    if not url.startswith("sqlite"):
        raise SetupError("with a shared database (--database-url) every replica needs the same key pepper: set "
                         "SEEKSERVE_KEY_PEPPER (a random string of 32+ characters, kept in a secret store)")
    path = Path(settings.data_dir) / "pepper"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        log.info("generated a key pepper in %s", path)
    return path.read_text().strip().encode()


def open_store(settings: Settings, migrate: bool = True) -> Database:
    url = settings.effective_database_url()
    if migrate:
        upgrade(url)
    return Database(url)


