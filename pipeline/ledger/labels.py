"""Labels that arrive after a batch: stored set-based with their history, and the batch's
realised KPIs recomputed from its stored results and current labels (no model runs)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, func, literal_column, select, update
from sqlalchemy.dialects.postgresql import JSONB

from pipeline import registry
from pipeline.definition import Pipeline
from pipeline.errors import BatchNotFoundError
from pipeline.labels import refuse, validated_labels
from pipeline.ledger import queries
from pipeline.ledger.monitor import store_label_counts
from pipeline.schema import FINISHED_BATCH_STATES, Batch

LOCK_BATCH = select(Batch.pipeline, Batch.items, Batch.state, Batch.aggregate_runs).where(
    Batch.id == bindparam("batch_id")
)
STORE_REALISED = (
    update(Batch)
    .where(Batch.id == bindparam("batch_id"))
    .values(
        metrics=func.jsonb_set(
            Batch.metrics, literal_column("'{realised}'::text[]"), bindparam("realised", type_=JSONB)
        )
    )
)


@dataclass(frozen=True)
class StoredLabels:
    """What storing labels did: `added` inputs labelled for the first time, `changed` given
    another label (the old one kept as history), `unchanged` given their current label again;
    and the batch's realised figures after it (`metrics.realised`)."""

    added: int
    changed: int
    unchanged: int
    realised: dict[str, Any]


def realised_figures(pipeline: Pipeline, items: int, labelled: Sequence[Row[Any]]) -> dict[str, Any]:
    """`metrics.realised` of a batch of `items` inputs from its labelled results (rows of
    `labelled_results`): labelled inputs and share, the label counts and the KPIs they give."""
    counts = pipeline.label_counts([row.output for row in labelled], [row.label for row in labelled])
    return {
        "labelled_items": len(labelled),
        "labelled_share": round(len(labelled) / items, 6) if items else 0.0,
        "counts": counts,
        "kpis": pipeline.realised_kpis(counts),
    }


def store_labels(engine: Engine, batch_id: uuid.UUID, labels: Iterable[tuple[Any, Any]]) -> StoredLabels:
    """Store ground truth for inputs of a finished batch, all or nothing, and recompute the
    batch's realised KPIs in the same transaction (also in its window contributions).

    `labels`: (input index, label) pairs. The same label again changes nothing; another
    label for a labelled input replaces it, the old one kept with its `replaced_at`.

    Raises:
        BatchNotFoundError: no such batch.
        InvalidLabelError: the batch's results are not written yet, its pipeline takes no
            labels, or an index or label is bad; nothing was stored.
        UnknownPipelineError: the batch's pipeline is not registered here.
    """
    with engine.begin() as conn:
        # Locked: labels of one batch are stored one call at a time, each recomputing from all.
        batch = conn.execute(LOCK_BATCH.with_for_update(), {"batch_id": batch_id}).first()
        if batch is None:
            raise BatchNotFoundError(f"no batch {batch_id}")
        # Its results are written once it has been aggregated (a cancelled one, later than its state).
        if batch.state not in FINISHED_BATCH_STATES or batch.aggregate_runs == 0:
            raise refuse(str(batch_id), [f"the batch is {batch.state}: labels are taken once its results are written"])
        pipeline = registry.get_pipeline(batch.pipeline)
        stored = validated_labels(pipeline, str(batch_id), batch.items, labels)
        parameters = {"batch_id": batch_id, "items": list(stored), "labels": list(stored.values())}
        changed = len(conn.execute(queries.REPLACE_CHANGED_LABELS, parameters).all())
        inserted = len(conn.execute(queries.INSERT_LABELS, parameters).all())
        realised = _recompute_realised(conn, pipeline, batch_id, batch.items)
    return StoredLabels(inserted - changed, changed, len(stored) - inserted, realised)


def _recompute_realised(conn: Connection, pipeline: Pipeline, batch_id: uuid.UUID, items: int) -> dict[str, Any]:
    labelled = conn.execute(queries.LABELLED_RESULTS, {"batch_id": batch_id}).all()
    realised = realised_figures(pipeline, items, labelled)
    conn.execute(STORE_REALISED, {"batch_id": batch_id, "realised": realised})
    store_label_counts(conn, batch_id, realised["counts"])
    return realised
