"""Contract checks: import direction, schema from migrations, settings URL forms."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from pipeline.schema import Base
from pipeline.settings import Settings, libpq_url, sqlalchemy_url

ROOT = Path(__file__).resolve().parent.parent


def test_pipeline_never_imports_workers_or_aggregator() -> None:
    offenders = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("workers", "aggregator")]
    assert offenders == []


def test_migrations_match_the_typed_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_database_url_accepted_in_both_forms() -> None:
    plain = "postgresql://u:p@h:5432/db"
    driver = "postgresql+psycopg://u:p@h:5432/db"
    assert sqlalchemy_url(plain) == sqlalchemy_url(driver) == driver
    assert libpq_url(driver) == libpq_url(plain) == plain
    assert Settings(database_url=driver).database_url == driver
    with pytest.raises(ValueError, match="must start with postgresql://"):
        Settings(database_url="mysql://u@h/db")
