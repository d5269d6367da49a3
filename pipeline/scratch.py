"""Services one run owns (a test run, a benchmark): a database and a broker key
prefix of its own on the servers named by PIPELINE_DATABASE_URL /
PIPELINE_BROKER_URL, or on embedded ones started in a folder of the run's;
created and migrated at the start, removed at the end."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy.engine import make_url

from pipeline import ledger
from pipeline.database import libpq_url
from pipeline.embedded import ensure_services, stop_services
from pipeline.settings import Settings


@dataclass(frozen=True)
class ScratchServices:
    database_url: str
    broker_url: str
    broker_prefix: str
    # "given", "embedded" or "mixed": where the servers came from.
    origin: str

    def settings(self, models_dir: Path, **overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            database_url=self.database_url,
            broker_url=self.broker_url,
            broker_prefix=self.broker_prefix,
            models_dir=models_dir,
        )
        return Settings(**{**values, **overrides})

    def env(self, models_dir: Path, **overrides: str) -> dict[str, str]:
        """The environment of a process started on these services."""
        return {
            **os.environ,
            "PIPELINE_DATABASE_URL": self.database_url,
            "PIPELINE_BROKER_URL": self.broker_url,
            "PIPELINE_BROKER_PREFIX": self.broker_prefix,
            "PIPELINE_MODELS_DIR": str(models_dir),
            **overrides,
        }


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def delete_keys(broker_url: str, prefix: str) -> None:
    """Delete every broker key under `prefix`."""
    client = redis.Redis.from_url(broker_url)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


@contextmanager
def scratch_services(kind: str, embedded_dir: Path) -> Iterator[ScratchServices]:
    """Yield a migrated database `pipeline_<kind>_<run>` and broker prefix `<kind>-<run>:`;
    drop and delete them (and stop embedded servers started here) on exit."""
    given = (os.environ.get("PIPELINE_DATABASE_URL"), os.environ.get("PIPELINE_BROKER_URL"))
    urls = ensure_services(*given, embedded_dir)
    run = uuid.uuid4().hex[:12]
    database = f"pipeline_{kind}_{run}"
    admin_url = libpq_url(_with_database(urls.database_url, "postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    origin = "given" if all(given) else "embedded" if not any(given) else "mixed"
    scratch = ScratchServices(_with_database(urls.database_url, database), urls.broker_url, f"{kind}-{run}:", origin)
    try:
        ledger.migrate(scratch.database_url)
        yield scratch
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        delete_keys(scratch.broker_url, scratch.broker_prefix)
        if urls.started:
            stop_services(embedded_dir)
