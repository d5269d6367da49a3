"""State transitions of the ledger on real PostgreSQL: duplicates and stale claims
change nothing, counters never double count, the batch flips to `aggregating` once,
and aggregate runs once."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from psycopg import _queries as psycopg_queries
from psycopg import pq
from sqlalchemy import Engine, event, text

from aggregator.assemble import aggregate_batch
from aggregator.sweeper import sweep_once
from pipeline import inputs, ledger, registry
from pipeline.client import Client
from pipeline.client_split import ClientSplit
from pipeline.definition import InputPage, ModelRows
from pipeline.errors import IdempotencyKeyError
from pipeline.inputs import encode_inputs
from pipeline.ledger.aggregation import AGGREGATE_LOCK_CLASS
from pipeline.ledger.claims import CLAIM_TURN
from pipeline.ledger.outcomes import COMPLETE
from pipeline.pipelines.digits import held_out_strips
from pipeline.schema import BatchState, FailurePolicy, Priority
from pipeline.settings import Settings
from pipeline.splitter import SplitStep, split_step, split_steps
from tests.helpers import RunServices, split_batch, store_batch, wait_for

CHUNKS = {"digit-classifier": 5, "digit-ood": 7}


@pytest.fixture
def engine(quiet_engine: Engine) -> Engine:
    """This module drives the ledger in-process: a database no worker process reads (a
    worker claims any dispatched sub-task of its models)."""
    return quiet_engine


def _split_batch(
    engine: Engine, strips: int = 6, page_items: int | None = None
) -> tuple[uuid.UUID, list[ledger.Claim]]:
    """A batch split in-process (nothing published), stored in pages of `page_items` inputs
    (default: the client's); returns its id and every sub-task claimed."""
    inputs = held_out_strips(strips, max_digits=4, seed=7)
    batch_id, created = store_batch(engine, inputs, page_items=page_items)
    assert created
    assert split_batch(engine, batch_id, CHUNKS)
    with engine.connect() as conn:
        ids = (
            conn.execute(text("SELECT id FROM subtasks WHERE batch_id = :b ORDER BY id"), {"b": batch_id})
            .scalars()
            .all()
        )
    claims = [ledger.claim_subtask(engine, i, "test-worker", lease_s=300) for i in ids]
    assert all(claims)
    return batch_id, claims  # type: ignore[return-value]


def _output(claim: ledger.Claim) -> bytes:
    """A well-formed output for the claim's rows (one-hot digit 1; in distribution)."""
    if claim.model == "digit-classifier":
        rows = np.zeros((claim.rows, 10), dtype="<f4")
        rows[:, 1] = 1
    else:
        rows = np.ones((claim.rows, 2), dtype="<f4")
    return rows.tobytes()


def _batch(engine: Engine, batch_id: uuid.UUID) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM batches WHERE id = :b"), {"b": batch_id}).mappings().one())


def test_split_twice_creates_subtasks_once(engine: Engine) -> None:
    batch_id, claims = _split_batch(engine)
    assert split_batch(engine, batch_id, CHUNKS) == 0
    assert _batch(engine, batch_id)["total"] == len(claims)


def test_duplicate_completion_counts_once_and_last_one_flips_once(engine: Engine) -> None:
    batch_id, claims = _split_batch(engine)
    flips = []
    for claim in claims:
        first = ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
        again = ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
        assert first.recorded and not again.recorded and not again.aggregate
        assert ledger.claim_subtask(engine, claim.subtask_id, "other-worker", lease_s=300) is None
        flips.append(first.aggregate)
    assert flips == [False] * (len(claims) - 1) + [True]
    batch = _batch(engine, batch_id)
    assert (batch["state"], batch["succeeded"], batch["failed"]) == ("aggregating", len(claims), 0)


def test_more_of_a_batch_is_claimed_and_completed_in_one_statement_each(engine: Engine) -> None:
    """A worker process claims several dispatched serve sub-tasks of a batch for its models at
    once (the first by `seq`, at most as many as asked), and records several outputs in one
    statement: each only for the claim it holds, the counter once per recorded one, and the
    statement that completes the batch flips it."""
    batch_id, _ = store_batch(engine, held_out_strips(6, max_digits=4, seed=7))
    assert split_batch(engine, batch_id, CHUNKS)
    first = ledger.claim_subtask(engine, _subtask_ids(engine, batch_id)[0], "test-worker", lease_s=300)
    assert first is not None and first.model == "digit-classifier"
    rest = ledger.claim_more_of_batch(engine, batch_id, ["digit-classifier"], 100, "test-worker", lease_s=300)
    classifier = [i for i, model in _subtask_models(engine, batch_id) if model == "digit-classifier"]
    assert [claim.subtask_id for claim in [first, *rest]] == classifier
    assert all(claim.payload and claim.batch_id == batch_id for claim in rest)
    assert ledger.claim_more_of_batch(engine, batch_id, ["digit-classifier"], 100, "other-worker", lease_s=300) == []
    both = ["digit-ood", "digit-classifier"]
    ood = ledger.claim_more_of_batch(engine, batch_id, both, 2, "test-worker", lease_s=300)
    ood_ids = [i for i, model in _subtask_models(engine, batch_id) if model == "digit-ood"]
    assert [claim.subtask_id for claim in ood] == ood_ids[:2]
    ood += ledger.claim_more_of_batch(engine, batch_id, both, 100, "test-worker", lease_s=300)
    assert [claim.subtask_id for claim in ood] == ood_ids

    # A stale claim among them: its lease ran out and another worker took it.
    stale = ood[0]
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE subtasks SET lease_until = clock_timestamp() - interval '1 s' WHERE id = :i"),
            {"i": stale.subtask_id},
        )
    retaken = ledger.claim_subtask(engine, stale.subtask_id, "other-worker", lease_s=300)
    assert retaken is not None

    def done(claims: list[ledger.Claim]) -> list[ledger.Completion]:
        return [ledger.Completion(claim, _output(claim), "v1", None, predict_cpu_s=0.01) for claim in claims]

    outcome = ledger.complete_subtasks(engine, done([first, *rest, *ood]))
    assert outcome.recorded and not outcome.aggregate
    batch = _batch(engine, batch_id)
    assert (batch["state"], batch["succeeded"]) == ("running", batch["total"] - 1)
    assert not ledger.complete_subtasks(engine, done([first, stale])).recorded
    last = ledger.complete_subtasks(engine, done([retaken]))
    assert last.recorded and last.aggregate
    batch = _batch(engine, batch_id)
    assert (batch["state"], batch["succeeded"], batch["failed"]) == ("aggregating", batch["total"], 0)
    assert aggregate_batch(engine, batch_id) == "succeeded"


def _subtask_ids(engine: Engine, batch_id: uuid.UUID) -> list[int]:
    return [subtask_id for subtask_id, _ in _subtask_models(engine, batch_id)]


def test_a_message_s_turn_claims_the_first_round_of_its_small_batch_in_one_statement(engine: Engine) -> None:
    """`claim_turn`: the message's claim first, then (a serve sub-task of a small batch) more
    of its batch for the served models, at most one fewer than they are, never the one just
    claimed twice; a batch over the small size, or a single served model, gets the message's
    claim alone; nothing claimable gives nothing."""
    both = ["digit-classifier", "digit-ood"]

    def one_input_batch(seed: int) -> list[tuple[int, str]]:
        batch_id, _ = store_batch(engine, held_out_strips(1, max_digits=4, seed=seed), priority=Priority.interactive)
        assert split_batch(engine, batch_id, CHUNKS)
        return _subtask_models(engine, batch_id)

    (ood, _), (classifier, _) = sorted(one_input_batch(21), key=lambda row: row[1] != "digit-ood")
    turn = ledger.claim_turn(engine, ood, "w", 300, both, small_items=10)
    assert [(c.subtask_id, c.model, c.attempt) for c in turn] == [
        (ood, "digit-ood", 1),
        (classifier, "digit-classifier", 1),
    ]
    assert all(c.payload for c in turn)
    # Both claimed: the other message finds nothing of its model.
    assert ledger.claim_turn(engine, classifier, "w", 300, both, small_items=10) == []

    for small_items, served in ((0, both), (10, both[:1])):
        ids = dict((model, i) for i, model in one_input_batch(22 + small_items))
        turn = ledger.claim_turn(engine, ids["digit-classifier"], "w", 300, served, small_items=small_items)
        assert [c.subtask_id for c in turn] == [ids["digit-classifier"]]
        assert ledger.claim_subtask(engine, ids["digit-ood"], "w", lease_s=300) is not None


def test_claims_settle_on_a_generic_plan_with_a_backlog_of_dispatched_sub_tasks(engine: Engine) -> None:
    """With hundreds of dispatched sub-tasks, a claim's prepared statement is planned once
    and reused (its generic plan reads the partial index of dispatched sub-tasks), not
    planned again at every claim: `ledger.connection.inline` writes the state into its SQL."""
    batch_id, _ = store_batch(engine, held_out_strips(300, max_digits=4, seed=31))
    assert split_batch(engine, batch_id, {"digit-classifier": 1, "digit-ood": 1})
    ids = _subtask_ids(engine, batch_id)
    with ledger.connection.autocommit(engine) as conn:
        for subtask_id in ids[:20]:
            assert ledger.claim_subtask(conn, subtask_id, "w", lease_s=300) is not None
        generic, custom = conn.execute(
            text("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE :claims"),
            {"claims": "WITH claimed AS%"},
        ).one()
    assert generic > 0 and custom <= 5, (generic, custom)


def _subtask_models(engine: Engine, batch_id: uuid.UUID) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, model FROM subtasks WHERE batch_id = :b ORDER BY id"), {"b": batch_id})
        return [(row.id, row.model) for row in rows]


def test_stale_claim_cannot_finish(engine: Engine) -> None:
    batch_id, claims = _split_batch(engine)
    claim = claims[0]
    with engine.begin() as conn:  # the first worker's lease runs out
        conn.execute(
            text("UPDATE subtasks SET lease_until = clock_timestamp() - interval '1 s' WHERE id = :i"),
            {"i": claim.subtask_id},
        )
    second = ledger.claim_subtask(engine, claim.subtask_id, "second-worker", lease_s=300)
    assert second is not None and second.attempt == claim.attempt + 1
    assert not ledger.complete_subtask(engine, claim, _output(claim), "v1", None).recorded
    assert not ledger.fail_subtask(engine, claim, "late failure", retry=False, lease_s=300).recorded
    assert ledger.complete_subtask(engine, second, _output(second), "v1", None).recorded
    batch = _batch(engine, batch_id)
    assert (batch["succeeded"], batch["failed"]) == (1, 0)


def test_live_lease_is_not_claimed_twice(engine: Engine) -> None:
    _, claims = _split_batch(engine)
    assert ledger.claim_subtask(engine, claims[0].subtask_id, "other-worker", lease_s=300) is None


def test_aggregate_twice_runs_once_and_failed_subtask_becomes_item_errors(engine: Engine) -> None:
    batch_id, claims = _split_batch(engine)
    failed = claims[0]
    ledger.fail_subtask(engine, failed, "RuntimeError: boom", retry=False, lease_s=300)
    for claim in claims[1:]:
        ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
    assert aggregate_batch(engine, batch_id) == "partial"
    assert aggregate_batch(engine, batch_id) is None
    batch = _batch(engine, batch_id)
    assert batch["aggregate_runs"] == 1 and batch["state"] == "partial"
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT item, output, error FROM results WHERE batch_id = :b ORDER BY item"), {"b": batch_id}
        ).all()
        failed_items = conn.execute(text("SELECT items FROM subtasks WHERE id = :i"), {"i": failed.subtask_id}).scalar()
    assert [r.item for r in rows] == list(range(batch["items"]))
    for row in rows:
        if row.item in failed_items:
            assert row.output is None and "boom" in row.error
        else:
            assert row.error is None and set(row.output["text"]) == {"1"}
    assert batch["result"] == {"items": 6, "answered": 6 - len(set(failed_items)), "unanswered": len(set(failed_items))}


def test_a_batch_s_latency_counts_its_sub_tasks_that_ran_to_an_outcome_as_postgresql_would(engine: Engine) -> None:
    """The latency figures come from the outputs' read (no statement of their own): they
    count the succeeded and failed serve sub-tasks, not the cancelled ones, with
    PostgreSQL's `percentile_cont`."""
    batch_id, _ = store_batch(engine, held_out_strips(6, max_digits=4, seed=7))
    split_batch(engine, batch_id, CHUNKS)
    ids = _subtask_ids(engine, batch_id)
    assert len(ids) > 4
    claims = [ledger.claim_subtask(engine, i, "test-worker", lease_s=300) for i in ids[:-2]]
    assert all(claims)
    ledger.fail_subtask(engine, claims[0], "RuntimeError: boom", retry=False, lease_s=300)  # type: ignore[arg-type]
    for claim in claims[1:]:
        assert claim is not None
        ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
    assert ledger.cancel_batch(engine, batch_id).aggregate  # the last two never ran
    assert aggregate_batch(engine, batch_id) == "cancelled"
    metrics = _batch(engine, batch_id)["metrics"]
    with engine.connect() as conn:
        expected = conn.execute(
            text(
                "WITH t AS (SELECT model, rows, extract(epoch FROM started_at - queued_at)::float8 AS wait,"
                " extract(epoch FROM finished_at - started_at)::float8 AS compute FROM subtasks"
                " WHERE batch_id = :b AND role = 'serve' AND state IN ('succeeded', 'failed'))"
                " SELECT model, count(*) AS subtasks, sum(rows) AS rows,"
                " percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY wait) || max(wait) AS wait,"
                " percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY compute) || max(compute) AS compute,"
                " sum(compute) AS compute_total FROM t GROUP BY ROLLUP (model)"
            ),
            {"b": batch_id},
        ).all()
    assert sum(row.subtasks for row in expected if row.model is not None) == len(claims)
    for row in expected:
        figures = metrics["latency"]["subtasks"] if row.model is None else metrics["models"][row.model]
        assert (figures["subtasks"], figures["rows"]) == (row.subtasks, row.rows)
        for key, values in (("queue_wait_s", row.wait), ("compute_s", row.compute)):
            assert [figures[key][k] for k in ("p50", "p95", "p99", "max")] == pytest.approx(values, abs=1e-6)
        assert figures["compute_total_s"] == pytest.approx(row.compute_total, abs=1e-6)


def test_retry_returns_subtask_to_pending(engine: Engine) -> None:
    batch_id, claims = _split_batch(engine)
    claim = claims[0]
    assert ledger.fail_subtask(engine, claim, "flaky", retry=True, lease_s=0).recorded
    again = ledger.claim_subtask(engine, claim.subtask_id, "test-worker", lease_s=300)
    assert again is not None and again.attempt == 2
    assert _batch(engine, batch_id)["failed"] == 0


def test_cancel_skips_unstarted_subtasks(engine: Engine) -> None:
    inputs = held_out_strips(4, seed=3)
    batch_id, _ = store_batch(engine, inputs)
    split_batch(engine, batch_id, CHUNKS)
    first = ledger.cancel_batch(engine, batch_id)
    assert first.recorded and first.aggregate  # nothing was running: results can be assembled now
    assert not ledger.cancel_batch(engine, batch_id).recorded
    batch = _batch(engine, batch_id)
    assert batch["state"] == "cancelled" and batch["cancelled"] == batch["total"] > 0
    with engine.connect() as conn:
        first = conn.execute(text("SELECT min(id) FROM subtasks WHERE batch_id = :b"), {"b": batch_id}).scalar()
    assert ledger.claim_subtask(engine, first, "test-worker", lease_s=300) is None


def test_a_cancel_chosen_as_a_deadlocks_victim_runs_again_and_cancels(engine: Engine) -> None:
    """A cancel locks the batch's row, then its sub-tasks'; a transaction holding one of those
    sub-tasks and then asking for the batch's row (the sweep, a worker) makes a deadlock, and
    PostgreSQL rolls the cancel back (its wait began first). The cancel runs again and cancels."""
    batch_id, _ = store_batch(engine, held_out_strips(4, seed=5))
    split_batch(engine, batch_id, CHUNKS)
    with engine.connect() as holder:
        holder.execute(text("SET LOCAL deadlock_timeout = '60s'"))  # the cancel's side detects the cycle
        first = "SELECT min(id) FROM subtasks WHERE batch_id = :b"
        holder.execute(text(f"UPDATE subtasks SET seq = seq WHERE id = ({first})"), {"b": batch_id})
        with ThreadPoolExecutor(1) as pool:
            cancelled = pool.submit(ledger.cancel_batch, engine, batch_id)
            wait_for(lambda: _lock_waits(engine) > 0, 30, "the cancel to wait for the held sub-task")
            holder.execute(text("UPDATE batches SET succeeded = succeeded WHERE id = :b"), {"b": batch_id})
            holder.commit()
            outcome = cancelled.result(timeout=60)
    assert outcome.recorded and outcome.aggregate
    batch = _batch(engine, batch_id)
    assert batch["state"] == "cancelled" and batch["cancelled"] == batch["total"] > 0


def _lock_waits(engine: Engine) -> int:
    """How many sessions of this database wait for a lock."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def test_idempotency_key_returns_the_same_batch_for_the_same_request(engine: Engine) -> None:
    key = f"run-{uuid.uuid4()}"
    data = held_out_strips(3)
    first, created = store_batch(engine, data, key)
    second, created_again = store_batch(engine, data, key)
    assert created and not created_again and first == second
    pages = encode_inputs(registry.get_pipeline("digits"), data, 10, 10_000)
    with pytest.raises(IdempotencyKeyError, match=f"already names batch {first} of pipeline 'digits'"):
        with engine.begin() as conn:
            ledger.insert_batch(conn, "other", pages, key)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT sum(items) FROM input_pages WHERE batch_id = :b"), {"b": first}).scalar()
        fingerprint = conn.execute(text("SELECT request_sha256 FROM batches WHERE id = :b"), {"b": first}).scalar()
    assert stored == 3 and len(fingerprint) == 64


@pytest.mark.parametrize("first_as", [list, iter], ids=["first in hand", "first streamed"])
def test_pages_in_hand_and_streamed_pages_store_the_same_batch_row(engine: Engine, first_as: Any) -> None:
    """A list of pages (a small batch's) is counted and fingerprinted before its row is
    inserted; an iterator as it is stored: the same request gets the same row either way,
    and is recognised by its key from the other."""
    key = f"run-{uuid.uuid4()}"
    pages = encode_inputs(registry.get_pipeline("digits"), held_out_strips(25, seed=7), 100, 1_000_000, 10)
    second_as = iter if first_as is list else list
    with engine.begin() as conn:
        first, created = ledger.insert_batch(conn, "digits", first_as(pages), key)
    with engine.begin() as conn:
        again, created_again = ledger.insert_batch(conn, "digits", second_as(pages), key)
        keyless, _ = ledger.insert_batch(conn, "digits", second_as(pages), None)
    assert created and not created_again and again == first
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, items, request_sha256 FROM batches WHERE id IN (:a, :b)"), {"a": first, "b": keyless}
        ).all()
    by_id = {row.id: row for row in rows}
    assert by_id[first].items == by_id[keyless].items == 25
    assert len(by_id[first].request_sha256) == 64 and by_id[keyless].request_sha256 is None


def _insert(engine: Engine, key: str, inputs: list[dict], **options: object) -> uuid.UUID:
    pages = encode_inputs(registry.get_pipeline("digits"), inputs, 10, 1_000_000)
    with engine.begin() as conn:
        return ledger.insert_batch(conn, "digits", pages, key, **options)[0]  # type: ignore[arg-type]


def _relabelled(strip: dict) -> dict:
    """The strip with the first digit of its label changed."""
    label = strip["label"]
    return {**strip, "label": str((int(label[0]) + 1) % 10) + label[1:]}


@pytest.mark.parametrize(
    ("inputs_of", "options"),
    [
        (lambda strips: strips[:2], {}),  # fewer inputs
        (lambda strips: [strips[0], _relabelled(strips[1]), strips[2]], {}),  # one digit of one label
        (lambda strips: strips, {"failure_policy": FailurePolicy.fail_fast}),
        (lambda strips: strips, {"max_failed_fraction": 0.5}),
        (lambda strips: strips, {"deadline_s": 60.0}),
    ],
    ids=["fewer-inputs", "one-label", "failure-policy", "max-failed-fraction", "deadline"],
)
def test_idempotency_key_of_another_request_is_refused_naming_its_batch(
    engine: Engine, inputs_of: Any, options: dict[str, object]
) -> None:
    key = f"run-{uuid.uuid4()}"
    strips = held_out_strips(3, seed=4)
    first = _insert(engine, key, strips)
    with pytest.raises(IdempotencyKeyError, match=f"already names batch {first}, submitted with other inputs or"):
        _insert(engine, key, inputs_of(strips), **options)
    with engine.connect() as conn:
        batches = conn.execute(text("SELECT count(*) FROM batches WHERE idempotency_key = :k"), {"k": key}).scalar()
    assert batches == 1
    # The same request again still returns the batch.
    assert _insert(engine, key, strips) == first


def test_idempotency_key_of_a_batch_stored_before_fingerprints_is_accepted(engine: Engine) -> None:
    key = f"run-{uuid.uuid4()}"
    first = _insert(engine, key, held_out_strips(2, seed=5))
    with engine.begin() as conn:  # as revision 0006 leaves a batch stored before it
        conn.execute(text("UPDATE batches SET request_sha256 = NULL WHERE id = :b"), {"b": first})
    assert _insert(engine, key, held_out_strips(3, seed=6)) == first


def test_a_cancelled_batch_is_finished_once_its_results_are_written(engine: Engine) -> None:
    batch_id, claims = _split_batch(engine)
    running = claims[0]  # claimed: running when the batch is cancelled
    with engine.begin() as conn:  # the other sub-tasks were never claimed
        conn.execute(
            text("UPDATE subtasks SET state = 'dispatched', attempts = 0 WHERE batch_id = :b AND id <> :i"),
            {"b": batch_id, "i": running.subtask_id},
        )
    assert not ledger.cancel_batch(engine, batch_id).aggregate
    status = ledger.batch_status_row(engine, batch_id)
    assert status is not None and status["state"] == "cancelled" and not status["results_ready"]
    assert ledger.complete_subtask(engine, running, _output(running), "v1", None).aggregate
    assert aggregate_batch(engine, batch_id) == "cancelled"
    status = ledger.batch_status_row(engine, batch_id)
    assert status is not None and status["results_ready"]


def test_an_aggregation_lock_held_elsewhere_refuses_at_once_without_waiting_on_the_row(engine: Engine) -> None:
    batch_id, claims = _split_batch(engine)
    for claim in claims:
        ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
    with engine.begin() as holder, engine.begin() as duplicate:
        held, batch = ledger.lock_aggregation(holder, batch_id)
        assert held and batch is not None and batch.id == batch_id and batch.state == "aggregating"
        # Waiting on the row lock the holder took would hit this timeout.
        duplicate.execute(text("SET LOCAL lock_timeout = '2s'"))
        assert ledger.lock_aggregation(duplicate, batch_id) == (False, None)
    assert aggregate_batch(engine, batch_id) == "succeeded"
    # Not due any more: the lock is taken, no row is.
    with engine.begin() as conn:
        assert ledger.lock_aggregation(conn, batch_id) == (True, None)


def test_a_turn_engine_commits_without_waiting_for_the_flush_but_an_aggregate_waits(
    engine: Engine, quiet_services: RunServices
) -> None:
    """A worker's turns commit claims and completions asynchronously (a crash redoes them
    like a lost worker's); the aggregate's transaction, on the same session, is durable, and
    so is the one statement finishing a one-page batch with no transaction (shown here in a
    transaction: a statement's own commit ends the same way)."""
    turns = ledger.make_engine(quiet_services.database_url, durable_commits=False)
    show = text("SHOW synchronous_commit")
    try:
        with turns.connect() as conn:
            assert conn.execute(show).scalar_one() == "off"
            conn.commit()
            batch_id, claims = _split_batch(engine)
            with conn.begin():
                ledger.lock_aggregation(conn, batch_id)
                assert conn.execute(show).scalar_one() == "on"
            assert conn.execute(show).scalar_one() == "off"
            conn.commit()
            for claim in claims:
                ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
            with conn.begin():
                due = ledger.one_page_batch_due(conn, batch_id)
                assert due is not None and conn.execute(show).scalar_one() == "off"
                assert ledger.finish_batch(conn, due.batch, BatchState.succeeded, None, {}, {}) is False
                assert conn.execute(show).scalar_one() == "on"
            assert conn.execute(show).scalar_one() == "off"
    finally:
        turns.dispose()
    with engine.connect() as conn:
        assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "on"


def test_the_bytea_reads_of_claims_and_the_aggregate_come_back_in_binary_format(engine: Engine) -> None:
    """A claim's rows to score, an input page's features and the sub-tasks' outputs are
    `bytea`: read in binary format (as their bytes, not hex-escaped), by the aggregate of a
    one-page batch (one read) and of a batch of more pages (a read per page and for the
    outputs); a statement without the `BINARY_RESULTS` option still reads text."""
    formats: list[tuple[str, int]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if cursor.pgresult is not None and cursor.pgresult.nfields:
            formats.append((statement, cursor.pgresult.fformat(0)))

    event.listen(engine, "after_cursor_execute", record)
    try:
        for page_items in (None, 4):
            batch_id, claims = _split_batch(engine, page_items=page_items)
            for claim in claims:
                n_features = registry.get_model(claim.model).n_features
                assert claim.payload and len(claim.payload) == claim.rows * 4 * n_features
                ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
            assert aggregate_batch(engine, batch_id) == "succeeded"
            ledger.batch_status_row(engine, batch_id)
    finally:
        event.remove(engine, "after_cursor_execute", record)

    def format_of(start: str) -> set[int]:
        return {fmt for statement, fmt in formats if statement.lstrip().startswith(start)}

    assert format_of("WITH claimed AS") == {pq.Format.BINARY}
    assert {fmt for statement, fmt in formats if "AS page_features" in statement} == {pq.Format.BINARY}
    assert format_of("SELECT input_pages.first_item") == {pq.Format.BINARY}
    assert format_of("SELECT m.n, c.seq") == {pq.Format.BINARY}
    assert format_of("SELECT s.*") == {pq.Format.TEXT}


def test_sweeper_cancels_what_a_cancelled_batch_still_runs_past_its_lease(engine: Engine, client: Client) -> None:
    """A worker died running a sub-task of a cancelled batch: past its lease the sweeper
    cancels it instead of publishing it again, and the batch is due for its results."""
    batch_id, claims = _split_batch(engine)
    for claim in claims[1:]:
        ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
    assert not ledger.cancel_batch(engine, batch_id).aggregate  # claims[0] is still running
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE subtasks SET lease_until = clock_timestamp() - interval '1 s' WHERE id = :i"),
            {"i": claims[0].subtask_id},
        )
    # As the sweeper thread does, publishing what it found (the run's aggregator, if up, takes it).
    found = sweep_once(engine, client.publisher(), client.settings)
    assert found is not None
    assert claims[0].subtask_id not in [subtask_id for subtask_id, _ in found.predict]
    assert found.aggregate.count(batch_id) == 1
    batch = _batch(engine, batch_id)
    assert batch["cancelled"] == 1 and batch["succeeded"] == len(claims) - 1
    aggregate_batch(engine, batch_id)  # here, or by the aggregator: once
    batch = _batch(engine, batch_id)
    assert batch["state"] == "cancelled" and batch["aggregate_runs"] == 1


def test_a_split_resumes_after_its_last_committed_step(engine: Engine) -> None:
    """Interrupted after its first step, a split goes on from `split_items` and makes the same
    sub-tasks as one that ran through."""
    inputs = held_out_strips(10, max_digits=4, seed=9)
    interrupted, _ = store_batch(engine, inputs, page_items=3)
    first_step = next(split_steps(engine, interrupted, CHUNKS, 3))
    assert not first_step.finished and _batch(engine, interrupted)["split_items"] == 3
    assert _batch(engine, interrupted)["state"] == "pending"
    split_batch(engine, interrupted, CHUNKS)
    straight, _ = store_batch(engine, inputs, page_items=3)
    split_batch(engine, straight, CHUNKS)

    def chunks(batch_id: uuid.UUID) -> list[tuple[str, int, list[int]]]:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT model, seq, items FROM subtasks WHERE batch_id = :b ORDER BY model, seq"), {"b": batch_id}
            ).all()
        return [(model, seq, list(items)) for model, seq, items in rows]

    assert chunks(interrupted) == chunks(straight)
    assert _batch(engine, interrupted)["state"] == _batch(engine, straight)["state"] == "running"
    assert _batch(engine, interrupted)["total"] == len(chunks(straight))


def test_a_step_leaves_the_batch_row_unlocked_while_it_is_made_and_a_raced_step_writes_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a split step splits its pages, a worker's count on the batch's row does not wait
    for it; a step whose inputs another split counted meanwhile is refused and writes nothing."""
    batch_id, _ = store_batch(engine, held_out_strips(10, max_digits=4, seed=11), page_items=3)
    pipeline = registry.get_pipeline("digits")
    split_page = pipeline.split_page
    raced: list[SplitStep | None] = []

    def split_while_racing(page: InputPage) -> dict[str, ModelRows]:
        if not raced:
            raced.append(None)  # the racing split's own pages are split as they are
            with engine.connect() as conn:
                conn.execute(text("SET lock_timeout = '2s'"))
                # What a worker's completion does to the batch's row.
                conn.execute(text("UPDATE batches SET succeeded = succeeded WHERE id = :b"), {"b": batch_id})
                conn.commit()
            raced[0] = next(split_steps(engine, batch_id, CHUNKS, 3))
        return split_page(page)

    monkeypatch.setattr(pipeline, "split_page", split_while_racing)
    with engine.begin() as conn:
        assert split_step(conn, batch_id, CHUNKS, 3) is None
    batch = _batch(engine, batch_id)
    assert raced[0] is not None
    assert batch["split_items"] == 3 and batch["total"] == len(raced[0].published) > 0
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM subtasks WHERE batch_id = :b"), {"b": batch_id}).scalar_one()
    assert stored == batch["total"]


def _dispatched(engine: Engine, batch_id: uuid.UUID, model: str) -> list[int]:
    """The batch's sub-tasks of `model`, in seq order."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT id FROM subtasks WHERE batch_id = :b AND model = :m ORDER BY seq"),
                {"b": batch_id, "m": model},
            ).scalars()
        )


def _split(engine: Engine, strips: int, priority: Priority, seed: int) -> uuid.UUID:
    # Pages of 3: split in steps of 3 inputs (`split_batch`).
    batch_id, _ = store_batch(engine, held_out_strips(strips, max_digits=4, seed=seed), priority=priority, page_items=3)
    assert split_batch(engine, batch_id, CHUNKS)
    return batch_id


def test_a_message_claims_interactive_work_before_its_own_bulk_sub_task(engine: Engine) -> None:
    bulk = _split(engine, 12, Priority.bulk, seed=1)
    interactive = _split(engine, 1, Priority.interactive, seed=2)
    queued_first = _dispatched(engine, bulk, "digit-ood")[0]
    taken = ledger.claim_subtask(engine, queued_first, "w", lease_s=300)
    assert taken is not None and taken.batch_id == interactive and taken.priority == Priority.interactive.rank
    # The bulk sub-task whose message that was is still dispatched: the next message takes it.
    again = ledger.claim_subtask(engine, _dispatched(engine, bulk, "digit-ood")[1], "w", lease_s=300)
    assert again is not None and again.subtask_id == queued_first


def test_bulk_batches_share_the_claims_round_robin(engine: Engine) -> None:
    first = _split(engine, 12, Priority.bulk, seed=3)
    second = _split(engine, 12, Priority.bulk, seed=4)
    # Every message of the first batch's model, in the order they were published.
    messages = _dispatched(engine, first, "digit-ood") + _dispatched(engine, second, "digit-ood")
    taken = [ledger.claim_subtask(engine, message, "w", lease_s=300) for message in messages]
    order = [claim.batch_id for claim in taken if claim is not None]
    assert len(order) == len(messages), "every message claimed a sub-task"
    half = len(order) // 2
    assert order[:4] == [first, second, first, second]
    assert order[:half].count(first) == order[:half].count(second) == half // 2


def test_a_retry_waits_for_its_own_message(engine: Engine) -> None:
    batch_id = _split(engine, 12, Priority.bulk, seed=5)
    ids = _dispatched(engine, batch_id, "digit-ood")
    failed = ledger.claim_subtask(engine, ids[0], "w", lease_s=300)
    assert failed is not None and failed.subtask_id == ids[0]
    assert ledger.fail_subtask(engine, failed, "flaky", retry=True, lease_s=300).recorded
    # Another message does not take the sub-task waiting out its backoff, but the next dispatched one.
    other = ledger.claim_subtask(engine, ids[1], "w", lease_s=300)
    assert other is not None and other.subtask_id == ids[1]
    own = ledger.claim_subtask(engine, ids[0], "w", lease_s=300)
    assert own is not None and own.subtask_id == ids[0] and own.attempt == 2


def test_the_sweeper_republishes_a_pending_split_once_a_lease(engine: Engine) -> None:
    """A batch still `pending` a lease after submission has its split published again, and
    not again at the next sweep: only once its last publish is a lease old."""
    batch_id, _ = store_batch(engine, held_out_strips(2, seed=3))

    def backdate(column: str) -> None:
        with engine.begin() as conn:
            conn.execute(
                text(f"UPDATE batches SET {column} = clock_timestamp() - interval '2 s' WHERE id = :i"),
                {"i": batch_id},
            )

    def swept_splits() -> list[uuid.UUID]:
        found = ledger.sweep(engine, 1.0, 100)
        assert found is not None
        return [split for split in found.split if split == batch_id]

    assert swept_splits() == []  # submitted less than a lease ago
    backdate("created_at")
    assert swept_splits() == [batch_id]
    assert swept_splits() == []  # just published again
    backdate("split_published_at")
    assert swept_splits() == [batch_id]


def test_split_steps_ramp_up_from_a_small_first_step(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step covers `FIRST_STEP_ITEMS` inputs and each later one as many as are split
    already, up to the step size, in whole stored pages: a big batch's first sub-tasks are
    published early, and no page is cut (cutting a page of JSON items parses it)."""
    from pipeline import splitter

    monkeypatch.setattr(splitter, "FIRST_STEP_ITEMS", 2)
    strips = held_out_strips(11, max_digits=4, seed=5)
    # 2, then 2, 4 (doubling), then the rest (at most 6).
    assert _split_ends(engine, store_batch(engine, strips, page_items=2)[0]) == [2, 4, 8, 11]
    # Pages of 3: each step ends where a page does.
    assert _split_ends(engine, store_batch(engine, strips, page_items=3)[0]) == [3, 6, 11]


def _split_ends(engine: Engine, batch_id: uuid.UUID) -> list[int]:
    """`split_items` after each step of splitting the batch, 6 inputs a step."""
    ends = []
    for step in split_steps(engine, batch_id, CHUNKS, 6):
        assert step.published
        ends.append(_batch(engine, batch_id)["split_items"])
    return ends


def test_a_bulk_batch_s_chunks_are_cut_to_the_models_measured_predict_time(engine: Engine) -> None:
    """Once a model's large sub-tasks have a measured predict time, a bulk batch's chunks of
    it hold about `bulk_chunk_ms` of it; an interactive batch's, and an unmeasured model's,
    keep their chunk size."""
    whole = {"digit-classifier": 100_000, "digit-ood": 100_000}
    strips = held_out_strips(600, max_digits=4, seed=11)
    measured, _ = store_batch(engine, strips)
    split_batch(engine, measured, whole, step_items=10_000)
    with engine.begin() as conn:
        tiles = conn.execute(
            text(
                "UPDATE subtasks SET state = 'succeeded', predict_cpu_s = rows * 1e-5"
                " WHERE batch_id = :b AND model = 'digit-classifier' RETURNING rows"
            ),
            {"b": measured},
        ).scalar_one()
    assert tiles >= 1000  # large enough to measure the cost by

    def largest_chunks(priority: Priority) -> dict[str, int]:
        batch_id, _ = store_batch(engine, strips, priority=priority)
        list(split_steps(engine, batch_id, whole, 10_000, bulk_chunk_ms=10.0))
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT model, max(rows) FROM subtasks WHERE batch_id = :b GROUP BY model"), {"b": batch_id}
            ).all()
        return {model: largest for model, largest in rows}

    # 10 µs a row: 10 ms is 1,000 rows.
    assert largest_chunks(Priority.bulk) == {"digit-classifier": 1000, "digit-ood": tiles}
    assert largest_chunks(Priority.interactive) == {"digit-classifier": tiles, "digit-ood": tiles}


def _subtask_rows(engine: Engine, batch_id: uuid.UUID) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT model, seq, rows, items, payload, state, priority, model_version, role"
                " FROM subtasks WHERE batch_id = :b ORDER BY model, seq"
            ),
            {"b": batch_id},
        ).all()


def test_the_client_splits_json_items_as_an_aggregator_splits_their_stored_pages(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validated 3 items at a time into pages of 8 (so each page joins the splits of its parts,
    and chunks of 5 and 7 rows span pages), a batch of JSON items split by its client as it is
    stored gets the very sub-tasks a one-step split of its stored pages gets, and is
    committed `running` with all of them."""
    monkeypatch.setattr(inputs, "VALIDATE_ITEMS", 3)
    monkeypatch.setattr(inputs, "PAGE_ITEMS", 8)
    strips = held_out_strips(30, max_digits=4, seed=9)
    pages = inputs.iter_input_pages(registry.get_pipeline("digits"), strips, 100, 1_000_000, split=True)
    split = ClientSplit(Settings(chunk_sizes=CHUNKS), "digits", Priority.bulk, small=False)
    with engine.begin() as conn:
        by_client, _ = ledger.insert_batch(conn, "digits", pages, None, stored=split.page_stored)
        step = split.finish(conn, by_client)
    by_aggregator, _ = store_batch(engine, strips, page_items=8)
    assert split_batch(engine, by_aggregator, CHUNKS, step_items=1_000)
    rows = _subtask_rows(engine, by_client)
    assert rows and rows == _subtask_rows(engine, by_aggregator)
    assert sorted(d.subtask_id for d in step.published) == sorted(_subtask_ids(engine, by_client))
    batch = _batch(engine, by_client)
    assert (batch["state"], batch["split_items"], batch["total"]) == ("running", 30, len(rows))
    assert batch["model_versions"] == _batch(engine, by_aggregator)["model_versions"]


def _subtask_ids(engine: Engine, batch_id: uuid.UUID) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT id FROM subtasks WHERE batch_id = :b"), {"b": batch_id}).scalars())


def test_a_one_page_batch_is_finished_once_by_a_checked_statement(engine: Engine) -> None:
    """A batch of one input page is read whole and finished with no transaction: the
    finishing statement moves the row only as it was read and only while no other
    aggregation holds the batch's lock, and writes its result page and contributions only
    when it moved it. A second aggregate that read the batch due at the same time writes
    nothing (its result page would collide with the first's)."""
    batch_id, claims = _split_batch(engine)
    for claim in claims:
        ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
    finished = {"state": BatchState.succeeded, "error": None, "result": {"items": 6}, "metrics": {}}
    page = ledger.result_page_row(batch_id, 0, ["{}"] * 6, [None] * 6, None)
    lock = text("SELECT pg_try_advisory_xact_lock(:c, hashtext(:b))")
    with engine.connect() as conn:
        first, second = ledger.one_page_batch_due(conn, batch_id), ledger.one_page_batch_due(conn, batch_id)
        conn.commit()
        assert first is not None and second is not None
        assert first.input_page(len(registry.get_pipeline("digits").feature_names)).count == 6
        assert sum(len(outputs) for outputs in first.outputs.values()) == len(claims)
        # Another aggregation holds the lock (say one following the batch): neither the read
        # nor the finish takes the batch.
        with engine.begin() as holder:
            assert holder.execute(lock, {"c": AGGREGATE_LOCK_CLASS, "b": str(batch_id)}).scalar_one()
            assert ledger.one_page_batch_due(conn, batch_id) is None
            assert ledger.finish_batch(conn, first.batch, last_page=page, **finished) is None
            conn.commit()
        assert ledger.finish_batch(conn, first.batch, last_page=page, **finished) is False
        assert ledger.finish_batch(conn, second.batch, last_page=page, **finished) is None
        conn.commit()
        runs, pages = conn.execute(
            text(
                "SELECT aggregate_runs, (SELECT count(*) FROM result_pages WHERE batch_id = :b)"
                " FROM batches WHERE id = :b"
            ),
            {"b": batch_id},
        ).one()
        assert ledger.one_page_batch_due(conn, batch_id) is None
    assert (runs, pages) == (1, 1)


def _read_whole(read: ledger.OnePageBatch | None) -> tuple[Any, ...]:
    """What an aggregate takes from a one-page read, comparable."""
    assert read is not None
    outputs = {
        stream: [(o.seq, o.items.tolist(), o.output, o.error, o.bin_counts, o.timing) for o in chunks]
        for stream, chunks in read.outputs.items()
    }
    batch = read.batch
    return (batch.state, batch.aggregating_at, batch.aggregate_runs, read.serving, read.features, read.data, outputs)


def test_the_completion_that_makes_a_one_page_batch_due_reads_it_for_its_aggregate(engine: Engine) -> None:
    """The completion that makes a batch of one input page and at most `read_items` inputs
    due for aggregation also returns its aggregate's read, as `one_page_batch_due` reads it
    after the commit: the worker's turn finishes the batch without reading it again. A
    completion that waited for the batch row while another committed misses that sub-task in
    its snapshot: it returns no read (the aggregate then reads the batch), not one without
    that sub-task's rows; nor does one that made a batch of more than `read_items` due."""
    batch_id, claims = _split_batch(engine)
    assert len(claims) >= 3

    def done(claims: list[ledger.Claim]) -> list[ledger.Completion]:
        return [ledger.Completion(claim, _output(claim), "v1", None, predict_cpu_s=0.01) for claim in claims]

    first, *rest = claims
    assert ledger.complete_subtasks(engine, done([first]), read_items=6).due is None
    outcome = ledger.complete_subtasks(engine, done(rest), read_items=6)
    assert outcome.aggregate
    with engine.connect() as conn:
        assert _read_whole(outcome.due) == _read_whole(ledger.one_page_batch_due(conn, batch_id))
    assert sum(len(chunks) for chunks in outcome.due.outputs.values()) == len(claims)

    # Another completion holds the batch row (uncommitted) when the last one starts.
    batch_id, claims = _split_batch(engine)
    *earlier, last = claims
    with engine.connect() as holder:
        assert not ledger.complete_subtasks(holder, done(earlier)).aggregate
        with ThreadPoolExecutor(1) as pool:
            completing = pool.submit(ledger.complete_subtasks, engine, done([last]), 6)
            wait_for(lambda: _lock_waits(engine) > 0, 30, "the last completion to wait for the batch row")
            holder.commit()
            outcome = completing.result(timeout=60)
    assert outcome.aggregate and outcome.due is None
    with engine.connect() as conn:
        read = ledger.one_page_batch_due(conn, batch_id)
    assert read is not None and sum(len(chunks) for chunks in read.outputs.values()) == len(claims)
    assert aggregate_batch(engine, batch_id) == "succeeded"

    # A batch of more inputs than the reader aggregates itself: no read.
    batch_id, claims = _split_batch(engine)
    outcome = ledger.complete_subtasks(engine, done(claims), read_items=5)
    assert outcome.aggregate and outcome.due is None


def test_the_hot_statements_placeholders_are_converted_once(engine: Engine) -> None:
    """psycopg converts a statement's placeholders from its cache only below its length and
    parameter limits, which the ledger raises (`pipeline.ledger.connection`): a worker turn's
    claim (over 50 parameters) and completion (over 4 KB) are converted once, not at every
    execution."""
    convert = psycopg_queries._query2pg
    with engine.connect() as conn:
        for statement in (CLAIM_TURN, COMPLETE):
            compiled = statement.compile(dialect=conn.dialect)
            assert len(str(compiled)) > 4096 or len(compiled.params) > 50
    before = convert.cache_info()
    for _ in range(3):
        assert ledger.claim_turn(engine, -1, "test-worker", 60, ["digit-ood"], 1) == []
    after = convert.cache_info()
    assert after.hits - before.hits >= 2 and after.misses - before.misses <= 1


def test_a_batch_is_stamped_finished_by_the_finishing_statement_s_clock(engine: Engine) -> None:
    """An aggregate that followed a big batch finishes it in a transaction opened long before:
    its `finished_at` is when the finishing statement ran, not when that transaction began."""
    batch_id, claims = _split_batch(engine)
    for claim in claims:
        ledger.complete_subtask(engine, claim, _output(claim), "v1", None)
    with engine.begin() as conn:
        began = conn.execute(text("SELECT now()")).scalar_one()
        conn.execute(text("SELECT pg_sleep(0.2)"))
        due = ledger.lock_aggregating_batch(conn, batch_id)
        assert due is not None
        assert ledger.finish_batch(conn, due, BatchState.succeeded, None, {}, {}) is False
        finished = conn.execute(text("SELECT finished_at FROM batches WHERE id = :b"), {"b": batch_id}).scalar_one()
    assert (finished - began).total_seconds() >= 0.2
