"""Runs a worker's turn: claim a sub-task in the ledger, predict, record output and counter,
on one ledger connection for the whole turn."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import kombu.exceptions
import numpy as np
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError

from aggregator.assemble import aggregate_batch
from pipeline import broker, ledger, model_registry, registry, runtime
from pipeline.artifacts import Manifest
from pipeline.definition import ModelSpec
from pipeline.errors import ArtifactError, GuardrailViolation, InvalidArtifactError, UnknownPipelineError
from pipeline.guardrails import check_output
from pipeline.ledger.connection import autocommit
from pipeline.schema import SubtaskRole
from pipeline.settings import Settings
from pipeline.states import Priority
from workers.interactive import interactive_signal, sliced_predict
from workers.models import loaded_version, warm_once

log = logging.getLogger(__name__)

# Errors that a retry cannot fix: fail the sub-task at once.
PERMANENT_ERRORS = (ArtifactError, InvalidArtifactError, GuardrailViolation, UnknownPipelineError)
# The folders of an absolute path: a `/` not inside a word, a relative path or a URL, then
# each `name/` up to the file name.
SERVER_FOLDERS = re.compile(r"(?<![\w.~/:])/(?:[^\s/'\"]+/)+")
LEDGER_RETRY_FIRST_S = 0.2
LEDGER_RETRY_MAX_S = 5.0
T = TypeVar("T")


def public_error(message: str) -> str:
    """`message` as the ledger keeps it for users: each absolute path cut to its file name
    (`/srv/models/a.skops` → `a.skops`), so results do not show the server's folders. The
    worker's log keeps the whole message."""
    return SERVER_FOLDERS.sub("", message)


def retry_delay(settings: Settings, attempt: int) -> float:
    """Exponential backoff with full jitter for retry number `attempt` (1-based)."""
    return random.uniform(0, min(settings.retry_max_s, settings.retry_base_s * 2 ** (attempt - 1)))


def with_ledger_retry(settings: Settings, write: Callable[[], T], after_error: Callable[[], None] | None = None) -> T:
    """Run a ledger transaction, retrying with backoff while PostgreSQL is unreachable (or
    rolled it back as a deadlock's victim); `after_error` runs after each OperationalError
    (to drop a connection it left dead).

    The task does not return, so its message is not acknowledged, until the write
    went through. A transaction whose commit was lost with the connection is retried
    as a duplicate, which the guarded statements refuse harmlessly.

    Raises:
        OperationalError: still unreachable after `settings.db_retry_s`.
    """
    deadline = time.monotonic() + settings.db_retry_s
    delay = LEDGER_RETRY_FIRST_S
    while True:
        try:
            return write()
        except OperationalError as error:
            if after_error is not None:
                after_error()
            if time.monotonic() + delay > deadline:
                raise
            log.warning("ledger write failed (%s); retrying in %.1f s", error.orig or error, delay)
            time.sleep(delay)
            delay = min(delay * 2, LEDGER_RETRY_MAX_S)


class TurnConnection:
    """The ledger connection of one worker turn, in autocommit: checked out on first use and
    kept for the turn's claims, completions, failures and small-batch aggregate, instead of
    a checkout per ledger call. A context manager: returned to
    the pool on exit."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None

    def get(self) -> Connection:
        """The turn's connection, checked out now if it has none."""
        if self._conn is None:
            self._conn = autocommit(self.engine)
        return self._conn

    def discard(self) -> None:
        """Drop the connection after an OperationalError: it may be dead, so it is invalidated
        (never handed out again) and the next `get` checks out a fresh one."""
        self._release(invalidate=True)

    def _release(self, invalidate: bool) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if invalidate:
                conn.invalidate()
            conn.close()

    def run(self, settings: Settings, write: Callable[[Connection], T]) -> T:
        """`write` on the turn's connection with `with_ledger_retry`, each retry on a fresh one.

        Raises:
            OperationalError: still unreachable after `settings.db_retry_s`.
        """
        return with_ledger_retry(settings, lambda: write(self.get()), self.discard)

    def __enter__(self) -> TurnConnection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._release(invalidate=False)


def run_subtask(
    engine: Engine,
    settings: Settings,
    subtask_id: int,
    worker: str,
    served: Sequence[str] = (),
    priority: Priority = Priority.bulk,
) -> None:
    """Take a turn for a predict message of sub-task `subtask_id` (of `priority`): claim what
    it should run (`ledger.claim_turn`: its own retry, or its model's best dispatched
    sub-task, with the first round of its small batch) and run it (`run_turn`). The whole
    turn runs on one `TurnConnection`. A message that claimed a rider (published on another
    sub-task's message, `ledger.riders`) is published again first: the sub-task it was
    published for has none left."""
    with TurnConnection(engine) as turn:
        claims = turn.run(
            settings,
            lambda conn: ledger.claim_turn(
                conn, subtask_id, worker, settings.lease_s, served, settings.small_batch_items
            ),
        )
        if not claims:
            log.info("message of sub-task %d: nothing of its model is claimable; dropping it", subtask_id)
            return
        if claims[0].rides and claims[0].subtask_id != subtask_id:
            publish_again(subtask_id, claims[0].model, priority)
        run_turn(turn, settings, claims, worker, served, first_round_claimed=True)


def publish_again(subtask_id: int, model: str, priority: Priority) -> None:
    """Publish the predict message of `subtask_id` again: its first delivery claimed a rider.
    An unreachable broker leaves the sub-task to the sweeper, once its lease is over."""
    try:
        broker.publish_predictions(runtime.celery_app(), [(subtask_id, model, priority.rank)])
    except kombu.exceptions.OperationalError as error:
        log.warning("message of sub-task %d not published again (it claimed a rider): %s", subtask_id, error)


def run_turn(
    turn: TurnConnection,
    settings: Settings,
    claims: Sequence[ledger.Claim],
    worker: str,
    served: Sequence[str],
    first_round_claimed: bool = False,
) -> None:
    """Run claimed sub-tasks `claims`, of one batch. When the first is a serve sub-task of a
    small batch (at most `small_batch_items` inputs), run it with more of the batch's
    `dispatched` sub-tasks for the `served` models, then go on with the rest, in rounds of at
    most one sub-task per served model, each round claimed in one statement and completed in
    one (`ledger.claim_more_of_batch`, `run_claims`); the first round's others come with
    `claims` when `first_round_claimed` (`ledger.claim_turn`). A one-input batch then waits
    for no message delivery of a model this process serves (their messages find them
    claimed) and pays one claim and one completion, while a small batch of many chunks still
    shows its progress and is shared with the processes its messages reach."""
    claim = claims[0]
    rounds = bool(served) and claim.role == SubtaskRole.serve and settings.is_small_batch(claim.batch_items)

    def more(most: int) -> list[ledger.Claim]:
        return turn.run(
            settings,
            lambda conn: ledger.claim_more_of_batch(conn, claim.batch_id, served, most, worker, settings.lease_s),
        )

    if rounds and not first_round_claimed and len(served) > 1:
        claims = [*claims, *more(len(served) - len(claims))]
    while claims:
        if run_claims(turn, settings, claims, worker, served) or not rounds:
            return
        claims = more(len(served))


def run_claims(
    turn: TurnConnection, settings: Settings, claims: Sequence[ledger.Claim], worker: str, served: Sequence[str]
) -> bool:
    """`run_claimed`. During a bulk sub-task, the interactive sub-tasks of the `served`
    models announced meanwhile run after its predict, after its outcome and, while
    interactive work comes, between slices of its predict (`run_announced`,
    `workers.interactive`). A shadow sub-task is never sliced: the gate compares its
    predict's CPU time with its champion's, timed whole. Not where the worker runs an
    interactive lane (`workers.lane`), which takes them as they come. Returns True when the
    claims completed their batch's counters."""
    if (
        served
        and not settings.interactive_lane
        and settings.interactive_slice_ms > 0
        and claims[0].priority == Priority.bulk.rank
    ):
        signal = interactive_signal(turn.engine)
        with signal.listening() as announced:
            between = partial(run_announced, announced, turn.engine, settings, worker, served)
            slice_s = settings.interactive_slice_ms / 1000 if signal.recently_announced() else 0.0
            return run_claimed(turn, settings, claims, between, slice_s)
    return run_claimed(turn, settings, claims)


def run_announced(
    announced: Callable[[], bool], engine: Engine, settings: Settings, worker: str, served: Sequence[str]
) -> None:
    """Within a bulk sub-task's turn (between two slices of its predict, after the predict,
    after its outcome is recorded): once `announced()`, run the interactive sub-tasks of
    the `served` models (each with its small batch's other sub-tasks, `run_turn`) on a
    connection of their own, until none is left. A ledger that cannot be reached leaves
    them to their messages: the bulk sub-task goes on."""
    if not announced():
        return
    try:
        with TurnConnection(engine) as turn:
            while claims := turn.run(
                settings,
                lambda conn: ledger.claim_interactive(
                    conn, served, worker, settings.lease_s, settings.small_batch_items
                ),
            ):
                run_turn(turn, settings, claims, worker, served, first_round_claimed=True)
    # Unreachable ledger or broker (a retry's message): the interactive sub-tasks are left
    # to their messages and the sweeper, and the bulk sub-task is not charged with it.
    except (OperationalError, kombu.exceptions.OperationalError) as error:
        log.warning("interactive sub-tasks left to their messages: %s", error)


@dataclass(frozen=True)
class Failure:
    """Why a claimed sub-task's predict failed (as users may read it), and whether to retry it."""

    claim: ledger.Claim
    error: str
    retry: bool


def run_claimed(
    turn: TurnConnection,
    settings: Settings,
    claims: Sequence[ledger.Claim],
    between: Callable[[], None] | None = None,
    slice_s: float = 0.0,
) -> bool:
    """Predict claimed sub-tasks (of one batch); record their outputs together in one
    statement, then each failure (so a failure that aborts the batch never cancels an
    output already made); aggregate the batch when that completed it. With `between` (a
    bulk sub-task's), `between()` runs after each predict and after the outcomes are
    recorded (`run_announced`: the interactive sub-tasks announced meanwhile), and with
    `slice_s` also between slices of about that many CPU seconds. Returns True when they
    completed their batch's counters (nothing of the batch is left to run)."""
    results = [predicted(turn, settings, claim, between, slice_s) for claim in claims]
    completions = [result for result in results if isinstance(result, ledger.Completion)]
    completed = (
        turn.run(settings, lambda conn: ledger.complete_subtasks(conn, completions, settings.small_batch_items))
        if completions
        else ledger.Outcome(recorded=False)
    )
    aggregate = completed.aggregate
    for failure in (result for result in results if isinstance(result, Failure)):
        aggregate = record_failure(turn, settings, failure).aggregate or aggregate
    if between is not None:
        between()
    if aggregate:
        aggregate_or_hand_over(turn, settings, claims[0], completed.due)
    return aggregate


def record_failure(turn: TurnConnection, settings: Settings, failure: Failure) -> ledger.Outcome:
    """Record a failed predict (`ledger.fail_subtask`); a failure to retry is published again
    with its backoff as countdown (the message that claimed it may have been another
    sub-task's)."""
    claim = failure.claim
    outcome = turn.run(
        settings,
        lambda conn: ledger.fail_subtask(conn, claim, failure.error, retry=failure.retry, lease_s=settings.lease_s),
    )
    if failure.retry and outcome.recorded:
        broker.publish_predictions(
            runtime.celery_app(),
            [(claim.subtask_id, claim.model, claim.priority)],
            countdown=retry_delay(settings, claim.attempt),
        )
    return outcome


def predicted(
    turn: TurnConnection,
    settings: Settings,
    claim: ledger.Claim,
    between: Callable[[], None] | None = None,
    slice_s: float = 0.0,
) -> ledger.Completion | Failure:
    """Predict a claimed sub-task: its `Completion` to record, or its `Failure`: for good
    (`PERMANENT_ERRORS`), else to retry while it has attempts left. `between` and `slice_s`
    as `run_claimed`."""
    try:
        spec = registry.get_model(claim.model)
        # The version the split pinned; the champion for a sub-task split before the registry.
        version = claim.model_version or turn.run(settings, lambda conn: model_registry.champion(conn, spec.name))
        X = np.frombuffer(claim.payload, dtype="<f4").reshape(claim.rows, spec.n_features)
        estimator, manifest = version_to_time(turn, settings, spec, version, X)
        # A shadow sub-task also times its champion on the same rows, now: the gate compares
        # the two versions in pairs measured alike. Which runs first alternates (by id), so
        # neither always finds the other's data in the cache.
        champion = shadow_champion(turn, settings, claim, spec, X)
        champion_first = champion is not None and claim.subtask_id % 2 == 0
        champion_cpu_s = timed_predict(spec, champion, X)[1] if champion_first else None
        if between is not None and slice_s > 0:
            output, predict_cpu_s = sliced_predict(spec, estimator, X, slice_s, between)
        else:
            output, predict_cpu_s = timed_predict(spec, estimator, X)
        if between is not None:
            between()
        if champion is not None and not champion_first:
            champion_cpu_s = timed_predict(spec, champion, X)[1]
        output = check_output(spec, output, claim.rows)
        # Drift counts are made here, in parallel workers, where the rows already are.
        reference = manifest.reference
        bin_counts = (
            None if reference is None else reference.bin_counts(X, spec.output_score(output)).astype("<i8").tobytes()
        )
    except PERMANENT_ERRORS as error:
        message = f"{type(error).__name__}: {error}"
        log.error("sub-task %d failed for good: %s", claim.subtask_id, message, exc_info=error)
        return Failure(claim, public_error(message), retry=False)
    # A model may raise anything; the error is recorded in the ledger and the sub-task retried.
    except Exception as error:  # noqa: BLE001
        message = f"{type(error).__name__}: {error} (attempt {claim.attempt} of {claim.max_attempts})"
        log.warning("sub-task %d failed: %s", claim.subtask_id, message, exc_info=error)
        return Failure(claim, public_error(message), retry=claim.attempt < claim.max_attempts)
    return ledger.Completion(
        claim, output.tobytes(), version, bin_counts, predict_cpu_s=predict_cpu_s, champion_cpu_s=champion_cpu_s
    )


def timed_predict(spec: ModelSpec, estimator: Any, X: np.ndarray) -> tuple[np.ndarray, float]:
    """`spec.predict(estimator, X)` and the CPU seconds of this process it took. CPU time, not
    wall time: what else runs on the machine at that moment does not count."""
    before = time.process_time()
    predicted = spec.predict(estimator, X)
    return predicted, time.process_time() - before


def version_to_time(
    turn: TurnConnection, settings: Settings, spec: ModelSpec, version: str, X: np.ndarray
) -> tuple[Any, Manifest]:
    """(estimator, manifest) of `version` of `spec`'s model (`loaded_version`), run once
    untimed on the first row of `X` on its first use in this process (`warm_once`), so that
    the timed predicts that follow hold no one-time work.

    Raises:
        ArtifactError, InvalidArtifactError, OSError: as `loaded_version`.
        Exception: whatever the model's predict raises on its first use.
    """
    estimator, manifest = loaded_version(turn.engine, settings, spec.name, version)
    warm_once(spec.name, version, lambda: spec.predict(estimator, X[:1]))
    return estimator, manifest


def shadow_champion(
    turn: TurnConnection, settings: Settings, claim: ledger.Claim, spec: ModelSpec, X: np.ndarray
) -> Any | None:
    """The champion's estimator of a shadow sub-task's model (`spec`), ready to time on the
    same rows `X` (`version_to_time`); None for a serve sub-task, or when the shadow's
    version is the champion.

    Raises:
        NoChampionError: the model has no champion (a roll-out needs one).
        ArtifactError, InvalidArtifactError, OSError, Exception: as `version_to_time`.
    """
    if claim.role != SubtaskRole.shadow:
        return None
    version = turn.run(settings, lambda conn: model_registry.champion(conn, claim.model))
    if version == claim.model_version:
        return None
    return version_to_time(turn, settings, spec, version, X)[0]


def aggregate_or_hand_over(
    turn: TurnConnection, settings: Settings, claim: ledger.Claim, due: ledger.OnePageBatch | None = None
) -> None:
    """Aggregate the batch whose last sub-task `claim` finished: here, on the turn's
    connection, when it has at most `small_batch_items` inputs (one message hop less for its
    latency; `due`: its aggregate's read, made by the completion), else, or when that fails,
    through the aggregator's `aggregate` queue."""
    if settings.is_small_batch(claim.batch_items):
        try:
            aggregate_batch(turn.get(), claim.batch_id, due)
            return
        # Whatever failed (a manifest missing on this host, a pipeline's aggregate raising),
        # the aggregator's path owns the outcome: it retries, and its sweeper re-aggregates.
        except Exception:  # noqa: BLE001
            log.exception("batch %s: aggregating it here failed; handing it to the aggregator", claim.batch_id)
    broker.publish_aggregate(runtime.celery_app(), str(claim.batch_id))
