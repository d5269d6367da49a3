"""The Celery app Flower monitors: `celery --app pipeline.flower flower`.

Configured like the workers' app (broker URL, `PIPELINE_BROKER_PREFIX` as the
transport's key prefix, JSON only), so Flower finds their prefixed event
channels and queues. Only the Flower process imports this module.

Basic auth comes from `PIPELINE_FLOWER_USER` / `PIPELINE_FLOWER_PASSWORD`, handed to
Flower as its `FLOWER_BASIC_AUTH` variable (Flower reads `FLOWER_*` variables before its
command line): never `--basic-auth` on the command line, which every local user can read
in `ps`. Without a password Flower does not start.
"""

from __future__ import annotations

import os

from celery import Celery

from pipeline import broker, runtime
from pipeline.settings import get_settings


def basic_auth(user: str, password: str | None) -> str:
    """Flower's `user:password` credential.

    Raises:
        SystemExit: the password is unset, or either part has a comma (Flower splits its
            list of credentials on commas).
    """
    if not password:
        raise SystemExit("Flower needs a password: set PIPELINE_FLOWER_PASSWORD (its user is PIPELINE_FLOWER_USER)")
    if "," in user or "," in password:
        raise SystemExit("PIPELINE_FLOWER_USER and PIPELINE_FLOWER_PASSWORD must not contain a comma")
    return f"{user}:{password}"


_settings = get_settings()
os.environ["FLOWER_BASIC_AUTH"] = basic_auth(_settings.flower_user, _settings.flower_password)
# Only the broker is needed: no database is started or reached when its URL is set.
app = broker.configure(Celery("pipeline-flower"), _settings.broker_url or runtime.service_urls().broker_url, _settings)
