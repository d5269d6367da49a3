"""The Celery app Flower monitors: `celery --app pipeline.flower flower`.

Configured like the workers' app (broker URL, `PIPELINE_BROKER_PREFIX` as the
transport's key prefix, JSON only), so Flower finds their prefixed event
channels and queues. Only the Flower process imports this module.
"""

from __future__ import annotations

from celery import Celery

from pipeline import broker, runtime
from pipeline.settings import get_settings

_settings = get_settings()
# Only the broker is needed: no database is started or reached when its URL is set.
app = broker.configure(Celery("pipeline-flower"), _settings.broker_url or runtime.service_urls().broker_url, _settings)
