"""Batches stored and split in-process, with nothing published: for ledger-level tests."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Engine

from pipeline import ledger, registry
from pipeline.inputs import encode_inputs
from pipeline.splitter import split_steps


def store_batch(
    engine: Engine, inputs: list[Any], key: str | None = None, pipeline: str = "digits"
) -> tuple[uuid.UUID, bool]:
    """Validate and store a `pending` batch as the client does, without queueing its split."""
    pages = encode_inputs(registry.get_pipeline(pipeline), inputs, 10_000, 1_000_000)
    with engine.begin() as conn:
        return ledger.insert_batch(conn, pipeline, pages, key)


def split_batch(engine: Engine, batch_id: uuid.UUID, chunk_sizes: dict[str, int], step_items: int = 3) -> int:
    """Split a `pending` batch to the end, `step_items` inputs per committed step; return how
    many sub-tasks it created (0 when not pending)."""
    return sum(len(step.published) for step in split_steps(engine, batch_id, chunk_sizes, step_items))
