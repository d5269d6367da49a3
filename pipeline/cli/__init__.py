"""The `pipeline` command: a thin layer over the library.

Reading commands print rich tables, or JSON with `--json`. An error a user can make
(unknown batch or pipeline, services unreachable or not migrated, a bad input
file, a bad option) prints one line on stderr and exits 1, without a traceback.

Each command imports what it needs when it runs: loading this module costs click
alone, so `pipeline --help` answers at once and `pipeline status` loads neither
Celery, nor Alembic, nor the models' libraries; its list of the newest batches not even
SQLAlchemy nor pydantic-settings (it reads the ledger on a psycopg connection).
"""

from __future__ import annotations

from pipeline.cli import batches, monitoring, services, submitting
from pipeline.cli.base import main
from pipeline.cli.models import models, rollout

# Each module's commands register on `main` when it is imported; these two are groups.
main.add_command(models)
main.add_command(rollout)

__all__ = ["batches", "main", "monitoring", "services", "submitting"]
