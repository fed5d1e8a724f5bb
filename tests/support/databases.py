"""The shared test servers' addresses, and scratch databases on a Postgres server (shared or private)."""

from __future__ import annotations

import os

PG_ADMIN_URL = os.environ.get("TUNEFORGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379")


def drop_database(name: str, *, server: str = PG_ADMIN_URL) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def create_database(name: str, *, server: str = PG_ADMIN_URL) -> str:
    """A new, empty Postgres database called name on server (dropped first if it exists); returns its URL."""
    from sqlalchemy import create_engine, text

    drop_database(name, server=server)
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{server}/{name}"


def recreate_database(name: str, *, server: str = PG_ADMIN_URL) -> str:
    """Drop and create a Postgres database on server, migrate it, and return its URL."""
    url = create_database(name, server=server)
    from app.cli import run_migrations

    run_migrations(url)
    return url
