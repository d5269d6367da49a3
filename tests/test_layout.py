"""Contract checks: import direction, schema from migrations, settings URL forms, the ledger's
location read without pydantic-settings."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from pipeline.database import ledger_settings, libpq_url, sqlalchemy_url
from pipeline.errors import SettingsError
from pipeline.schema import Base
from pipeline.settings import Settings

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


@pytest.mark.parametrize(
    "variables",
    [
        {},
        {"PIPELINE_DATABASE_URL": "postgresql://u:p@h:5432/db", "PIPELINE_DATA_DIR": "/srv/pipeline"},
        {"pipeline_database_url": "postgres://u@h/db", "Pipeline_Data_Dir": "data"},
        {"PIPELINE_DATABASE_URL": "mysql://u@h/db"},
        {"PIPELINE_DATABASE_URL": "postgresql://u:p@h:abc/db"},
        {"PIPELINE_DATABASE_URL": "postgresql://u:p@[::1/db"},
        {"PIPELINE_DATABASE_URL": ""},
    ],
)
def test_status_locates_the_ledger_as_settings_do(variables: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`pipeline status` reads PIPELINE_DATABASE_URL and PIPELINE_DATA_DIR without
    pydantic-settings: the same values, or the same one-line error, as `Settings`."""
    for name in list(os.environ):
        if name.lower() in ("pipeline_database_url", "pipeline_data_dir"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    try:
        settings = Settings()
    except SettingsError as error:
        with pytest.raises(SettingsError) as raised:
            ledger_settings()
        assert str(raised.value) == str(error) and str(error).startswith("invalid Settings: database_url: ")
        return
    located = ledger_settings()
    assert (located.database_url, located.data_dir) == (settings.database_url, settings.data_dir)
