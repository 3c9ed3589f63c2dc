"""The real servers the integration tests use: PostgreSQL and Redis on 127.0.0.1 (.ci/run starts them).

Shared by the test modules so each does not carry its own copy of these fixtures' bodies.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from smartpush.ledger import Ledger

#: The PostgreSQL server, without a database name.
PG = "postgresql://postgres@127.0.0.1:5432"
#: A database in which ledger tests make a schema of their own.
PG_URL = os.environ.get("SMARTPUSH_TEST_POSTGRESQL", f"{PG}/test")


def services_up(redis_db: int) -> bool:
    """Whether PostgreSQL and Redis (database ``redis_db``) answer."""
    try:
        import redis

        with psycopg.connect(f"{PG}/postgres", connect_timeout=3):
            pass
        client = redis.Redis(host="127.0.0.1", port=6379, db=redis_db, socket_timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def needs_services(redis_db: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not services_up(redis_db), reason="needs Redis and PostgreSQL on 127.0.0.1 (.ci/run starts them)"
    )


@contextmanager
def throwaway_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database's URL, dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{PG}/{name}"
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def flushed_redis(db: int) -> Iterator[str]:
    """The URL of Redis database ``db``, emptied before and after."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    client.flushdb()
    try:
        yield f"redis://127.0.0.1:6379/{db}"
    finally:
        client.flushdb()
        client.close()


@contextmanager
def ledger_of_kind(kind: str, tmp_path: Path, prefix: str) -> Iterator[Ledger]:
    """An empty, migrated ledger: ``sqlite`` (a file) or ``postgresql`` (a schema of its own, dropped
    afterwards; the test is skipped when PostgreSQL is unreachable)."""
    if kind == "sqlite":
        led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
        try:
            led.migrate()
            yield led
        finally:
            led.close()
        return
    with throwaway_schema(prefix) as url:
        led = Ledger(url)
        try:
            led.migrate()
            yield led
        finally:
            led.close()


@contextmanager
def throwaway_schema(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL schema of its own (dropped afterwards); the test is skipped
    when PostgreSQL is unreachable."""
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable ({exc}); set SMARTPUSH_TEST_POSTGRESQL")
    schema = f"{prefix}_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{PG_URL}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
