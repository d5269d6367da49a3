"""Migration 0004 keeps what the per-input tables held: results and inputs become pages,
and a batch stored before it can still be split and read; after 0014 its results read the
batch's pinned versions."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import numpy as np
import psycopg
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, make_url, text

from pipeline import ledger
from pipeline.database import libpq_url, sqlalchemy_url
from pipeline.pipelines.digits import held_out_strips
from pipeline.pipelines.screening import FEATURES, held_out_records
from tests.helpers import RunServices, register_champions, split_batch


@pytest.fixture
def database_at_0003(services: RunServices) -> Iterator[str]:
    """A database of its own, migrated up to revision 0003 only; yields its URL."""
    name = f"pipeline_migrations_{uuid.uuid4().hex[:12]}"
    admin_url = libpq_url(make_url(services.database_url).set(database="postgres").render_as_string(False))
    url = make_url(services.database_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    config = Config()
    config.set_main_option("script_location", str(files("migrations")))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    command.upgrade(config, "0003")
    yield url
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _store_old_batch(engine: Engine, pipeline: str, state: str, inputs: list[dict], results: list[tuple]) -> uuid.UUID:
    batch_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO batches (id, pipeline, state, items) VALUES (:id, :p, :s, :n)"),
            {"id": batch_id, "p": pipeline, "s": state, "n": len(inputs)},
        )
        for item, data in enumerate(inputs):
            conn.execute(
                text("INSERT INTO inputs (batch_id, item, data) VALUES (:b, :i, CAST(:d AS jsonb))"),
                {"b": batch_id, "i": item, "d": json.dumps(data)},
            )
        for item, output, error in results:
            conn.execute(
                text("INSERT INTO results (batch_id, item, output, error) VALUES (:b, :i, CAST(:o AS jsonb), :e)"),
                {"b": batch_id, "i": item, "o": None if output is None else json.dumps(output), "e": error},
            )
    return batch_id


def test_upgrade_keeps_inputs_and_results(database_at_0003: str, models_dir: Path) -> None:
    engine = ledger.make_engine(database_at_0003)
    try:
        finished_results = [(0, {"text": "3"}, None), (1, None, "model 'digit-ood': boom"), (2, {"text": "14"}, None)]
        finished = _store_old_batch(engine, "digits", "succeeded", held_out_strips(3), finished_results)
        records = held_out_records(2)
        pending = _store_old_batch(engine, "screening", "pending", records, [])

        ledger.migrate(database_at_0003)
        register_champions(database_at_0003, models_dir)

        with engine.connect() as conn:
            results = conn.execute(
                text("SELECT item, output, error FROM results WHERE batch_id = :b ORDER BY item"), {"b": finished}
            ).all()
            split_items = dict(conn.execute(text("SELECT id, split_items FROM batches")).all())
        assert [tuple(row) for row in results] == finished_results
        with engine.connect() as conn:
            # Revision 0014: pages stored before it have no per-input versions; a batch that
            # pinned none (split before revision 0010) names none.
            versions = conn.execute(
                text("SELECT model_versions FROM results WHERE batch_id = :b ORDER BY item"), {"b": finished}
            ).scalars()
            assert list(versions) == [{}] * 3
            conn.execute(
                text("UPDATE batches SET model_versions = CAST(:v AS jsonb) WHERE id = :b"),
                {"b": finished, "v": json.dumps({"digit-classifier": "a" * 64})},
            )
            pinned = conn.execute(
                text("SELECT DISTINCT model_versions FROM results WHERE batch_id = :b"), {"b": finished}
            ).scalar_one()
            assert pinned == {"digit-classifier": "a" * 64}
            conn.rollback()
        assert split_items == {finished: 3, pending: 0}

        # The pending batch's inputs were stored as whole items: its split still reads their features.
        assert split_batch(engine, pending, {}) == 3
        with engine.connect() as conn:
            subtask_id = conn.execute(
                text("SELECT id FROM subtasks WHERE batch_id = :b AND model = 'screen-forest'"), {"b": pending}
            ).scalar_one()
        claim = ledger.claim_subtask(engine, subtask_id, "test-worker", lease_s=300)
        assert claim is not None
        expected = np.array([[record["features"][name] for name in FEATURES] for record in records], dtype="<f4")
        assert np.array_equal(np.frombuffer(claim.payload, "<f4").reshape(2, len(FEATURES)), expected)
    finally:
        engine.dispose()


def test_json_pages_are_compressed_with_lz4_where_the_server_has_it(engine: Engine) -> None:
    """Revision 0018: pglz's compression was most of a page's COPY."""
    with engine.connect() as conn:
        has_lz4 = conn.execute(
            text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")
        ).scalar_one()
        methods = conn.execute(
            text(
                "SELECT attrelid::regclass::text || '.' || attname, attcompression FROM pg_attribute"
                " WHERE (attrelid, attname) IN (('input_pages'::regclass, 'data'),"
                " ('result_pages'::regclass, 'outputs'), ('result_pages'::regclass, 'errors'))"
            )
        ).all()
    expected = "l" if has_lz4 else ""
    assert sorted(methods) == [
        ("input_pages.data", expected),
        ("result_pages.errors", expected),
        ("result_pages.outputs", expected),
    ]
