"""Where the ledger's database is: PIPELINE_DATABASE_URL, or the embedded PostgreSQL under
PIPELINE_DATA_DIR; and its URL in the form each driver takes.

`LedgerSettings` holds the two settings and their checks; `Settings` inherits them, so
`ledger_settings()` reads them exactly as `Settings` does (same names, same errors) without
loading pydantic-settings: `pipeline status` resolves its ledger with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import SettingsError, validation_line

POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
# pydantic-settings' prefix of every setting's variable.
ENV_PREFIX = "PIPELINE_"


class LedgerSettings(BaseModel):
    """The settings that locate the ledger, a part of `Settings` (its title too: an error
    reads the same from both).

    Raises:
        ValidationError: a value is malformed (`ledger_settings()` raises it as `SettingsError`).
    """

    # An invalid value is not repeated in the error: a URL holds a password.
    model_config = ConfigDict(title="Settings", hide_input_in_errors=True)

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL, `postgresql://...` or `postgresql+psycopg://...`.",
    )
    data_dir: Path = Field(default=Path(".pipeline"), description="Embedded services' data and default models folder.")

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(POSTGRES_SCHEMES):
            raise ValueError("PIPELINE_DATABASE_URL must start with postgresql:// or postgresql+psycopg://")
        return well_formed("PIPELINE_DATABASE_URL", url)

    def resolved_database_url(self) -> str:
        """`database_url`, or the embedded PostgreSQL's under `data_dir`, started (or reused) here.

        Raises:
            EmbeddedServiceError: the embedded PostgreSQL could not be started.
        """
        if self.database_url is not None:
            return self.database_url
        from pipeline.embedded import ensure_postgres

        return ensure_postgres(self.data_dir)


def ledger_settings() -> LedgerSettings:
    """PIPELINE_DATABASE_URL and PIPELINE_DATA_DIR read from the environment as `Settings`
    reads them: names matched in any case (pydantic-settings' default), the last one set
    winning, an empty value kept (and refused as a URL).

    Raises:
        SettingsError: a value is malformed (the line `Settings` gives).
    """
    environ = {name.lower(): value for name, value in os.environ.items()}
    variables = {field: f"{ENV_PREFIX}{field}".lower() for field in LedgerSettings.model_fields}
    values = {field: environ[variable] for field, variable in variables.items() if variable in environ}
    try:
        return LedgerSettings.model_validate(values)
    except ValidationError as error:
        raise SettingsError(validation_line(error)) from None


def well_formed(variable: str, url: str | None) -> str | None:
    """`url` when its host and port parse (a number in 0..65535, a closed IPv6 bracket).

    Raises:
        ValueError: naming `variable` and what is wrong, never the URL (it may hold a password).
    """
    if url is not None:
        try:
            urlsplit(url).port  # noqa: B018 (reading the port parses it: that is the check)
        except ValueError as error:
            raise ValueError(f"{variable} is not a valid URL: {error}") from None
    return url


def sqlalchemy_url(url: str) -> str:
    """Return `url` in the `postgresql+psycopg://` form SQLAlchemy needs for psycopg 3."""
    for prefix in POSTGRES_SCHEMES:
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url!r}")


def libpq_url(url: str) -> str:
    """Return `url` in the plain `postgresql://` form libpq (psycopg.connect) accepts."""
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://") :]
