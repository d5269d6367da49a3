"""The interactive lane (`workers.lane`): woken by the NOTIFY of the commit that stores
interactive sub-tasks, it runs them with no message, and leaves bulk work to the pool."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from sqlalchemy import Engine, event, text

from pipeline import ledger
from pipeline.pipelines.digits import held_out_strips
from pipeline.scratch import delete_keys
from pipeline.settings import Settings
from pipeline.states import Priority
from tests.helpers import Processes, RunServices, split_batch, store_batch, wait_for
from workers.__main__ import POOL_NICE
from workers.lane import APPLICATION_NAME, run_lane

DIGIT_MODELS = ("digit-classifier", "digit-ood")
LANE = "test-lane"


@contextmanager
def lane_running(engine: Engine, settings: Settings) -> Iterator[threading.Thread]:
    """`run_lane` for the digits models in a thread, stopped (and joined) at the block's end."""
    stop = threading.Event()
    lane = threading.Thread(target=run_lane, args=(engine, settings, LANE, DIGIT_MODELS, lambda: not stop.is_set()))
    lane.start()
    try:
        yield lane
    finally:
        stop.set()
        lane.join(30)


def stored_and_split(engine: Engine, rows: int, seed: int, priority: Priority) -> uuid.UUID:
    """A digits batch of `rows` inputs stored and split in-process: its sub-tasks are
    dispatched and announced, and no message is published for them."""
    batch_id, _ = store_batch(engine, held_out_strips(rows, max_digits=6, seed=seed), priority=priority)
    split_batch(engine, batch_id, {})
    return batch_id


def runs_of(engine: Engine, batch_id: uuid.UUID) -> tuple[str, list[str | None]]:
    """The batch's state and the workers that ran its sub-tasks (None for none yet)."""
    with engine.connect() as conn:
        state = conn.execute(text("SELECT state FROM batches WHERE id = :b"), {"b": batch_id}).scalar_one()
        workers = conn.execute(
            text("SELECT DISTINCT worker FROM subtasks WHERE batch_id = :b"), {"b": batch_id}
        ).scalars()
        return str(state), sorted(workers, key=str)


def test_the_interactive_lane_runs_announced_interactive_batches_with_no_message_and_leaves_bulk_ones(
    quiet_engine: Engine, quiet_services: RunServices, models_dir: Path
) -> None:
    settings = quiet_services.settings(models_dir)
    bulk = stored_and_split(quiet_engine, 4, seed=1, priority=Priority.bulk)
    with lane_running(quiet_engine, settings) as lane:
        interactive = [stored_and_split(quiet_engine, 1, seed, Priority.interactive) for seed in range(3)]
        wait_for(
            lambda: all(runs_of(quiet_engine, b)[0] == "succeeded" for b in interactive),
            60,
            "the lane to run the interactive batches",
        )
    assert not lane.is_alive()
    assert all(runs_of(quiet_engine, b) == ("succeeded", [LANE]) for b in interactive)
    # Bulk work is the pool's: its sub-tasks are still dispatched, run by nobody.
    assert runs_of(quiet_engine, bulk) == ("running", [None])


def test_the_interactive_lane_listens_again_after_its_connection_is_killed(
    quiet_engine: Engine, quiet_services: RunServices, models_dir: Path
) -> None:
    settings = quiet_services.settings(models_dir)
    with lane_running(quiet_engine, settings) as lane:
        first = stored_and_split(quiet_engine, 1, seed=1, priority=Priority.interactive)
        wait_for(lambda: runs_of(quiet_engine, first)[0] == "succeeded", 60, "the first batch")
        with quiet_engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :a AND datname = current_database()"
                ),
                {"a": APPLICATION_NAME},
            ).scalar_one()
        assert killed == 1
        wait_for(lambda: lane_listening(quiet_engine) == 1, 30, "the lane to listen again on a new connection")
        second = stored_and_split(quiet_engine, 1, seed=2, priority=Priority.interactive)
        wait_for(lambda: runs_of(quiet_engine, second)[0] == "succeeded", 60, "the second batch")
        assert lane.is_alive()
    assert runs_of(quiet_engine, second) == ("succeeded", [LANE])


def lane_listening(engine: Engine) -> int:
    """How many connections of a lane the server has."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a AND datname = current_database()"
                ),
                {"a": APPLICATION_NAME},
            ).scalar_one()
        )


def test_an_interactive_claim_takes_its_small_batch_s_first_round_in_one_statement(quiet_engine: Engine) -> None:
    first = stored_and_split(quiet_engine, 1, seed=5, priority=Priority.interactive)
    second = stored_and_split(quiet_engine, 1, seed=6, priority=Priority.interactive)
    statements: list[str] = []
    event.listen(quiet_engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    claims = ledger.claim_interactive(quiet_engine, DIGIT_MODELS, LANE, 60, small_items=1)
    assert len(statements) == 1
    assert [(c.batch_id, c.model) for c in claims] == [(first, DIGIT_MODELS[0]), (first, DIGIT_MODELS[1])]
    # A batch above the small-batch size: its first sub-task alone.
    claims = ledger.claim_interactive(quiet_engine, DIGIT_MODELS, LANE, 60, small_items=0)
    assert [(c.batch_id, c.model) for c in claims] == [(second, DIGIT_MODELS[0])]


def test_a_worker_forks_its_lane_runs_its_pool_at_a_lower_priority_and_takes_the_lane_down_with_it(
    quiet_engine: Engine, quiet_services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    """A real `python -m workers`: a batch whose messages it never receives (they go under
    another broker prefix) is run by its lane; the pool's processes run at `POOL_NICE`; a
    SIGTERM to the worker ends the lane too."""
    prefix = f"lane-{uuid.uuid4().hex[:8]}:"
    env = quiet_services.env(models_dir, PIPELINE_BROKER_PREFIX=prefix)
    processes = Processes(tmp_path)
    worker = processes.start("worker", ["-m", "workers", "--models", ",".join(DIGIT_MODELS), "--concurrency", "2"], env)
    try:
        wait_for(lambda: lane_listening(quiet_engine) == 1, 120, "the worker's lane to listen")
        batch = stored_and_split(quiet_engine, 1, seed=7, priority=Priority.interactive)
        wait_for(lambda: runs_of(quiet_engine, batch)[0] == "succeeded", 60, "the lane to run the batch")
        (ran_by,) = runs_of(quiet_engine, batch)[1]
        assert ran_by is not None and ran_by.startswith(f"models-{worker.pid}@") and ran_by.endswith("/lane")
        wait_for(lambda: len(psutil.Process(worker.pid).children()) == 3, 60, "the pool's two processes")
        children = psutil.Process(worker.pid).children()
        assert sorted(child.nice() for child in children) == [0, POOL_NICE, POOL_NICE]
        assert psutil.Process(worker.pid).nice() == POOL_NICE
        processes.stop(worker, timeout=60)
        psutil.wait_procs(children, timeout=30)
        assert not any(child.is_running() for child in children)
    finally:
        processes.stop_all()
        delete_keys(quiet_services.broker_url, prefix)
