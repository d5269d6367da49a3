"""Per-process wiring: resolved service URLs, the ledger engine, the configured Celery app.

Everything here is created lazily, on first use in the process that uses it,
so a forked worker child never shares its parent's connections.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from sqlalchemy import Engine

from pipeline import broker, ledger
from pipeline.embedded import ServiceUrls, ensure_services
from pipeline.settings import get_settings


@lru_cache(maxsize=1)
def service_urls() -> ServiceUrls:
    """The configured URLs, or the embedded services' (started when not running)."""
    settings = get_settings()
    return ensure_services(settings.database_url, settings.broker_url, settings.data_dir)


@lru_cache(maxsize=1)
def engine() -> Engine:
    return ledger.make_engine(service_urls().database_url)


@lru_cache(maxsize=1)
def turn_engine() -> Engine:
    """The engine of a worker's turns: commits that do not wait for the WAL flush
    (`ledger.make_engine`'s `durable_commits`)."""
    return ledger.make_engine(service_urls().database_url, durable_commits=False)


@lru_cache(maxsize=1)
def celery_app() -> Celery:
    return broker.configure(broker.app, service_urls().broker_url, get_settings())
