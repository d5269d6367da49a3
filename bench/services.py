"""The services one benchmark run owns: a database and a broker key prefix of its own on
the servers named by PIPELINE_DATABASE_URL / PIPELINE_BROKER_URL, or on embedded ones
started in the run's folder; created at the start, removed at the end (as the tests do)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

from pipeline import ledger
from pipeline.embedded import ensure_services, stop_services
from pipeline.settings import Settings, libpq_url


@dataclass(frozen=True)
class BenchServices:
    database_url: str
    broker_url: str
    broker_prefix: str
    models_dir: Path
    # "embedded" or "given", for the report.
    origin: str

    def settings(self) -> Settings:
        return Settings(
            database_url=self.database_url,
            broker_url=self.broker_url,
            broker_prefix=self.broker_prefix,
            models_dir=self.models_dir,
        )

    def env(self) -> dict[str, str]:
        """The environment of every process the run starts."""
        return dict(
            os.environ,
            PIPELINE_DATABASE_URL=self.database_url,
            PIPELINE_BROKER_URL=self.broker_url,
            PIPELINE_BROKER_PREFIX=self.broker_prefix,
            PIPELINE_MODELS_DIR=str(self.models_dir),
        )


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _delete_keys(broker_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(broker_url)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


@contextmanager
def bench_services(folder: Path) -> Iterator[BenchServices]:
    """A migrated database `pipeline_bench_<run>` and the broker prefix `bench-<run>:`."""
    given = (os.environ.get("PIPELINE_DATABASE_URL"), os.environ.get("PIPELINE_BROKER_URL"))
    embedded_dir = folder / "embedded"
    urls = ensure_services(*given, embedded_dir)
    run = uuid.uuid4().hex[:12]
    database = f"pipeline_bench_{run}"
    admin_url = libpq_url(_with_database(urls.database_url, "postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    services = BenchServices(
        _with_database(urls.database_url, database),
        urls.broker_url,
        f"bench-{run}:",
        folder / "models",
        "given" if all(given) else "embedded" if not any(given) else "mixed",
    )
    try:
        ledger.migrate(services.database_url)
        yield services
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        _delete_keys(services.broker_url, services.broker_prefix)
        if urls.started:
            stop_services(embedded_dir)
