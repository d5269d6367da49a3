"""The interactive lane: a worker process outside the Celery pool that runs interactive
sub-tasks only, woken by their `ledger.INTERACTIVE_CHANNEL` notification at the commit that
stores them, with no message to wait for. It sleeps in between, so when one comes the
operating system's scheduler runs it ahead of the pool's busy processes (a task that has
slept is owed CPU time): an interactive sub-task does not wait for a pool process to reach
a slice of its bulk predict. Their predict messages still go out, and the pool's processes
run what the lane has not taken; a message whose sub-task the lane took claims its model's
next best one, or nothing, as any message does."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from sqlalchemy import Engine

from pipeline import runtime
from pipeline.database import libpq_url
from pipeline.ledger import INTERACTIVE_CHANNEL
from pipeline.settings import Settings
from workers.inference import run_announced

log = logging.getLogger(__name__)

APPLICATION_NAME = "pipeline-worker-lane"
# A wait for a notification ends after this long: the lane then checks that it should go on
# (its worker is still there) and looks for interactive work once more (one announced while
# its connection was lost).
WAKE_S = 1.0


def run_lane(
    engine: Engine, settings: Settings, worker: str, served: Sequence[str], running: Callable[[], bool]
) -> None:
    """Run the interactive sub-tasks of the `served` models as they are announced (each with
    its small batch's other sub-tasks and its aggregate, `run_announced`), while `running()`.
    A lost listening connection is opened again after `WAKE_S`; a ledger that cannot be
    reached leaves the sub-tasks to their messages."""
    url = libpq_url(engine.url.render_as_string(hide_password=False))
    conn: psycopg.Connection[Any] | None = None
    try:
        while running():
            try:
                if conn is None:
                    conn = psycopg.connect(url, autocommit=True, application_name=APPLICATION_NAME)
                    conn.execute(f"LISTEN {INTERACTIVE_CHANNEL}")
                # Read before running: what is announced while it runs ends the next wait at once.
                for _ in conn.notifies(timeout=0):
                    pass
                run_announced(lambda: True, engine, settings, worker, served)
                for _ in conn.notifies(timeout=WAKE_S, stop_after=1):
                    pass
            except psycopg.OperationalError as error:
                log.warning("interactive lane: no listening connection (%s); trying again in %.0f s", error, WAKE_S)
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(WAKE_S)
    finally:
        if conn is not None:
            conn.close()


def lane_process(settings: Settings, worker: str, served: Sequence[str], parent_pid: int) -> None:
    """The body of a worker's lane process: `run_lane` on the worker's turn engine until the
    worker (`parent_pid`) is gone or the lane is asked to stop (SIGTERM, SIGINT: a turn it
    runs is finished first, as a pool process finishes its task). An unexpected error is
    logged and the lane started again after `WAKE_S`: meanwhile the messages carry the work."""
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())

    def running() -> bool:
        return not stopping.is_set() and os.getppid() == parent_pid

    engine = runtime.turn_engine()
    while running():
        try:
            run_lane(engine, settings, worker, served, running)
        # A bug must not end interactive service for good; its traceback is in the log.
        except Exception:  # noqa: BLE001
            log.exception("interactive lane: unexpected error; starting it again in %.0f s", WAKE_S)
            time.sleep(WAKE_S)
