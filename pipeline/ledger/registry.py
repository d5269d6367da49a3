"""The model registry's reads and writes: versions, aliases and their append-only events.

A registration is one statement (the version and its `registered` event); an alias change
is one statement guarded by the version the alias named before, with its event
(`queries.sql`: `register_version`, `set_alias`). Validating an artifact and writing it to
the store directory happen before, in `pipeline.model_registry`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Text, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY

from pipeline.ledger import queries
from pipeline.ledger.connection import BINARY_RESULTS
from pipeline.schema import Alias, ModelAlias, ModelEvent, ModelEventRow, ModelVersion


@dataclass(frozen=True)
class VersionRecord:
    """A registered version, without its artifact: `aliases` are those naming it now."""

    model: str
    version: str
    source: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    size_bytes: int
    stored_inline: bool
    created_by: str
    created_at: datetime
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class StoredArtifact:
    """Where a version's artifact is: its bytes, or its path in the store directory."""

    manifest: dict[str, Any]
    data: bytes | None
    path: str | None


# The split's lookup (once per model per split) and the worker's fetch: built once.
ALIASES_OF = select(ModelAlias.model, ModelAlias.version).where(
    ModelAlias.alias == bindparam("alias"), ModelAlias.model == func.any(bindparam("models", type_=ARRAY(Text)))
)
# The artifact is a `bytea` of up to several MB: read in binary format.
ARTIFACT_OF = (
    select(ModelVersion.manifest, ModelVersion.artifact, ModelVersion.artifact_path)
    .where(ModelVersion.model == bindparam("model"), ModelVersion.version == bindparam("version"))
    .execution_options(**BINARY_RESULTS)
)
_alias_names = (
    select(func.array_agg(ModelAlias.alias))
    .where(ModelAlias.model == ModelVersion.model, ModelAlias.version == ModelVersion.version)
    .scalar_subquery()
)
VERSIONS_OF = select(
    ModelVersion.model,
    ModelVersion.version,
    ModelVersion.source,
    ModelVersion.manifest,
    ModelVersion.metrics,
    ModelVersion.size_bytes,
    ModelVersion.artifact.is_not(None).label("stored_inline"),
    ModelVersion.created_by,
    ModelVersion.created_at,
    _alias_names.label("aliases"),
).where(ModelVersion.model == bindparam("model"))


def insert_version(
    conn: Connection,
    *,
    model: str,
    version: str,
    source: str,
    manifest: dict[str, Any],
    metrics: dict[str, Any],
    artifact: bytes | None,
    artifact_path: str | None,
    size_bytes: int,
    created_by: str,
) -> bool:
    """Add a version with its `registered` event; False when the model already has it."""
    added = conn.execute(
        queries.REGISTER_VERSION,
        {
            "model": model,
            "version": version,
            "source": source,
            "manifest": json.dumps(manifest),
            "metrics": json.dumps(metrics),
            "size_bytes": size_bytes,
            "artifact": artifact,
            "artifact_path": artifact_path,
            "created_by": created_by,
        },
    ).first()
    return added is not None


def set_alias(
    conn: Connection,
    *,
    model: str,
    alias: Alias,
    version: str,
    expected: str | None,
    actor: str,
    reason: str | None,
    event: ModelEvent = ModelEvent.alias_set,
) -> bool:
    """Point `alias` of `model` at `version` if it still names `expected` (None: no version
    yet), recording `event`: one statement. False when it named another version meanwhile."""
    moved = conn.execute(
        queries.SET_ALIAS,
        {
            "model": model,
            "alias": alias.value,
            "version": version,
            "expected": expected,
            "actor": actor,
            "reason": reason,
            "event": event.value,
        },
    ).first()
    return moved is not None


def aliases_of(conn: Connection, models: Sequence[str], alias: Alias = Alias.champion) -> dict[str, str]:
    """Per model of `models` that has one, the version `alias` names (one query)."""
    rows = conn.execute(ALIASES_OF, {"alias": alias.value, "models": list(models)}).all()
    return {row.model: row.version for row in rows}


def versions_of(conn: Connection, model: str) -> list[VersionRecord]:
    """Every version of `model`, oldest first, without the artifacts."""
    rows = conn.execute(VERSIONS_OF.order_by(ModelVersion.created_at, ModelVersion.version), {"model": model})
    return [
        VersionRecord(
            r.model,
            r.version,
            r.source,
            r.manifest,
            r.metrics,
            r.size_bytes,
            r.stored_inline,
            r.created_by,
            r.created_at,
            tuple(sorted(r.aliases or ())),
        )
        for r in rows
    ]


def manifests_of(conn: Connection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The manifests of the (model, version) pairs `keys` that are registered (one query)."""
    if not keys:
        return {}
    rows = conn.execute(
        select(ModelVersion.model, ModelVersion.version, ModelVersion.manifest).where(
            ModelVersion.model == func.any(bindparam("models", type_=ARRAY(Text))),
            ModelVersion.version == func.any(bindparam("versions", type_=ARRAY(Text))),
        ),
        {"models": sorted({model for model, _ in keys}), "versions": sorted({version for _, version in keys})},
    ).all()
    wanted = set(keys)
    return {(row.model, row.version): row.manifest for row in rows if (row.model, row.version) in wanted}


def stored_artifact(conn: Connection, model: str, version: str) -> StoredArtifact | None:
    """Where the artifact of `version` of `model` is, with its manifest; None when unregistered."""
    row = conn.execute(ARTIFACT_OF, {"model": model, "version": version}).first()
    return None if row is None else StoredArtifact(row.manifest, row.artifact, row.artifact_path)


def previous_champion(conn: Connection, model: str) -> str | None:
    """The version that was `model`'s champion just before the current one (None: none was)."""
    return conn.execute(
        select(ModelEventRow.previous_version)
        .where(ModelEventRow.model == model, ModelEventRow.alias == Alias.champion.value)
        .order_by(ModelEventRow.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def events_of(conn: Connection, model: str) -> list[dict[str, Any]]:
    """Every registry event of `model`, oldest first, as JSON-able dicts."""
    table = ModelEventRow.__table__
    rows = conn.execute(select(table).where(table.c.model == model).order_by(table.c.id)).mappings()
    return [{**row, "at": row["at"].isoformat()} for row in rows]
