"""Interactive work ahead of a running bulk sub-task: while a worker process runs a bulk
sub-task, it listens on `ledger.INTERACTIVE_CHANNEL` and checks, after the predict, after
recording the outcome and, while interactive work comes (`RECENT_S` after it last saw
some), between slices of the predict, whether interactive sub-tasks were committed; if so
it runs them (and aggregates their small batches) first. An interactive sub-task then
waits for about one slice (`Settings.interactive_slice_ms`) or one of the bulk turn's
ledger statements, not for a whole bulk sub-task: a predict cannot be interrupted, but it
can be cut, as chunks already cut a batch's rows. A bulk batch alone is not sliced.

The check costs no round trip: notifications arrive on the listening connection's socket
and are read without blocking. The process listens only while it runs a bulk sub-task, so
no notification piles up on a connection nobody reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import Engine

from pipeline.database import libpq_url
from pipeline.definition import ModelSpec
from pipeline.ledger import INTERACTIVE_CHANNEL

log = logging.getLogger(__name__)

# How the connection shows in pg_stat_activity.
APPLICATION_NAME = "pipeline-worker-interactive"
# Rows of a bulk sub-task's first slice, as a share of its rows: its CPU time per row sizes
# the next slices.
FIRST_SLICE_SHARE = 8
# A process slices its bulk predicts for this long after it last saw interactive sub-tasks
# announced: slicing costs a few % of predict CPU (a forest pays its per-tree dispatch per
# call), which a bulk batch with no interactive work beside it does not pay.
RECENT_S = 10.0


class InteractiveSignal:
    """A worker process's LISTEN connection for `INTERACTIVE_CHANNEL`, opened on first use.
    A connection that fails is dropped, and opened again on the next `listening`: the signal
    only ever shortens a wait, so losing it loses nothing but that."""

    def __init__(self, database_url: str) -> None:
        self._url = libpq_url(database_url)
        self._conn: psycopg.Connection[Any] | None = None
        self._announced_at = -math.inf

    def recently_announced(self) -> bool:
        """Whether this process saw interactive sub-tasks announced in the last `RECENT_S`."""
        return time.monotonic() - self._announced_at < RECENT_S

    @contextmanager
    def listening(self) -> Iterator[Callable[[], bool]]:
        """Within the block, the returned function tells (without blocking) whether an
        interactive sub-task was announced since it was last asked."""
        try:
            if self._conn is None:
                self._conn = psycopg.connect(self._url, autocommit=True, application_name=APPLICATION_NAME)
            self._conn.execute(f"LISTEN {INTERACTIVE_CHANNEL}")
        except psycopg.Error as error:
            self._drop(error)
            yield lambda: False
            return
        try:
            yield self._announced
        finally:
            if self._conn is not None:
                try:
                    self._conn.execute(f"UNLISTEN {INTERACTIVE_CHANNEL}")
                    # Announced after the last check: read now, or the next block would see them.
                    self._announced()
                except psycopg.Error as error:
                    self._drop(error)

    def _announced(self) -> bool:
        if self._conn is None:
            return False
        try:
            # Every notification so far (one per storing transaction), without waiting.
            announced = sum(1 for _ in self._conn.notifies(timeout=0)) > 0
        except psycopg.Error as error:
            self._drop(error)
            return False
        if announced:
            self._announced_at = time.monotonic()
        return announced

    def _drop(self, error: psycopg.Error) -> None:
        log.warning("interactive signal: connection lost (%s); bulk predicts run whole until it is back", error)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@lru_cache(maxsize=1)
def interactive_signal(engine: Engine) -> InteractiveSignal:
    """The process's signal on `engine`'s database, made on first use (in a forked worker
    child, never in its parent)."""
    return InteractiveSignal(engine.url.render_as_string(hide_password=False))


def sliced_predict(
    spec: ModelSpec, estimator: Any, X: np.ndarray, slice_s: float, between: Callable[[], None]
) -> tuple[np.ndarray, float]:
    """`spec.predict(estimator, X)` in slices of about `slice_s` CPU seconds, or longer for a
    model whose every call costs more than `MAX_CALL_SHARE` of that (`call_overhead_s`),
    calling `between()` after each slice but the last; returns the outputs and the CPU seconds
    of the slices (not of `between`). The first slice holds 1/`FIRST_SLICE_SHARE` of the
    rows; its time per row sizes the rest. Models predict each row on its own, as chunking
    assumes."""
    rows = len(X)
    size = max(1, rows // FIRST_SLICE_SHARE)
    if size < rows:
        slice_s = max(slice_s, call_overhead_s(spec, estimator, X) / MAX_CALL_SHARE)
    outputs: list[np.ndarray] = []
    cpu_s = 0.0
    start = 0
    while start < rows:
        before = time.process_time()
        outputs.append(np.asarray(spec.predict(estimator, X[start : start + size])))
        spent = time.process_time() - before
        cpu_s += spent
        done = min(size, rows - start)
        start += done
        if start < rows:
            between()
            size = max(1, int(slice_s * done / spent)) if spent > 0 else rows
    return (outputs[0] if len(outputs) == 1 else np.concatenate(outputs)), cpu_s


# A slice is at least this many times a model's cost per call: slicing adds at most 5 %.
MAX_CALL_SHARE = 0.05
# Rows of the two calls whose times give a model's cost per call (`call_overhead_s`): as
# many as a slice has, at least, so that they take the path a slice takes (a few rows
# may take a cheaper one, as `pipeline.forests` walks a few rows through every tree at once).
CALL_PROBE_ROWS = (64, 256)
# By `id` of the loaded estimator (an estimator may be any object, not always weak-referable):
# a version loaded again may be timed again, nothing worse.
_call_overheads: dict[int, float] = {}


def call_overhead_s(spec: ModelSpec, estimator: Any, X: np.ndarray) -> float:
    """CPU seconds a predict of `estimator` costs per call whatever its rows (a forest's
    per-tree dispatch, input validation), measured once per loaded estimator on rows of `X`:
    the intercept of the line through the times of calls on `CALL_PROBE_ROWS` rows, and no
    less than a one-row call's time (the least of three runs each). With fewer rows than the
    probes need, a one-row call's time."""
    overhead = _call_overheads.get(id(estimator))
    if overhead is None:
        overhead = _least_call_s(spec, estimator, X[:1])
        few, many = CALL_PROBE_ROWS
        if len(X) >= many:
            few_s, many_s = (_least_call_s(spec, estimator, X[:rows]) for rows in CALL_PROBE_ROWS)
            overhead = max(overhead, few_s - few * (many_s - few_s) / (many - few))
        _call_overheads[id(estimator)] = overhead
    return overhead


def _least_call_s(spec: ModelSpec, estimator: Any, X: np.ndarray) -> float:
    """The least CPU seconds of three `spec.predict(estimator, X)` calls."""
    times = []
    for _ in range(3):
        before = time.process_time()
        spec.predict(estimator, X)
        times.append(time.process_time() - before)
    return min(times)
