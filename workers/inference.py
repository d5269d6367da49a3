"""Runs one sub-task: claim it in the ledger, predict, record output and counter."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from aggregator.assemble import aggregate_batch
from pipeline import broker, ledger, model_registry, registry, runtime
from pipeline.errors import ArtifactError, GuardrailViolation, InvalidArtifactError, UnknownPipelineError
from pipeline.guardrails import check_output
from pipeline.settings import Settings
from workers.models import loaded_version

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


def with_ledger_retry(settings: Settings, write: Callable[[], T]) -> T:
    """Run a ledger transaction, retrying with backoff while PostgreSQL is unreachable.

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
            if time.monotonic() + delay > deadline:
                raise
            log.warning("ledger unreachable (%s); retrying in %.1f s", error.orig or error, delay)
            time.sleep(delay)
            delay = min(delay * 2, LEDGER_RETRY_MAX_S)


def run_subtask(engine: Engine, settings: Settings, subtask_id: int, worker: str, served: Sequence[str] = ()) -> None:
    """Take a turn for a predict message of sub-task `subtask_id`: claim what it should run
    (`ledger.claim_subtask`: its own retry, or its model's best dispatched sub-task) and run
    it. When that belongs to a small batch (at most `small_batch_items` inputs), go on with
    the batch's other `dispatched` sub-tasks for the `served` models, claimed from the
    ledger: a one-input batch then waits for no message delivery of a model this process
    serves (their messages find them claimed).
    """
    claim = with_ledger_retry(settings, lambda: ledger.claim_subtask(engine, subtask_id, worker, settings.lease_s))
    if claim is None:
        log.info("message of sub-task %d: nothing of its model is claimable; dropping it", subtask_id)
        return
    if run_claimed(engine, settings, claim) or not settings.is_small_batch(claim.batch_items) or not served:
        return
    while (
        taken := with_ledger_retry(
            settings,
            lambda: ledger.claim_next_of_batch(engine, claim.batch_id, served, worker, settings.lease_s),
        )
    ) is not None:
        if run_claimed(engine, settings, taken):
            return


def run_claimed(engine: Engine, settings: Settings, claim: ledger.Claim) -> bool:
    """Predict a claimed sub-task and record its output or failure; aggregate its batch when
    it was the last. A failure to retry is published again with its backoff as countdown (the
    message that claimed it may have been another sub-task's). Returns True when it
    completed its batch's counters (nothing of the batch is left to run)."""
    try:
        spec = registry.get_model(claim.model)
        # The version the split pinned; the champion for a sub-task split before the registry.
        version = claim.model_version or model_registry.champion(engine, spec.name)
        estimator, manifest = loaded_version(engine, settings, spec.name, version)
        X = np.frombuffer(claim.payload, dtype="<f4").reshape(claim.rows, spec.n_features)
        # CPU time, not wall time: the roll-out gate compares versions whose sub-tasks run at
        # different moments (shadow work after its batch's), beside different neighbours.
        cpu_before = time.process_time()
        predicted = spec.predict(estimator, X)
        predict_cpu_s = time.process_time() - cpu_before
        output = check_output(spec, predicted, claim.rows)
        # Drift counts are made here, in parallel workers, where the rows already are.
        reference = manifest.reference
        bin_counts = (
            None if reference is None else reference.bin_counts(X, spec.output_score(output)).astype("<i8").tobytes()
        )
    except PERMANENT_ERRORS as error:
        message = f"{type(error).__name__}: {error}"
        log.error("sub-task %d failed for good: %s", claim.subtask_id, message, exc_info=error)
        outcome = with_ledger_retry(
            settings,
            lambda: ledger.fail_subtask(engine, claim, public_error(message), retry=False, lease_s=settings.lease_s),
        )
    # A model may raise anything; the error is recorded in the ledger and the sub-task retried.
    except Exception as error:  # noqa: BLE001
        retry = claim.attempt < claim.max_attempts
        message = f"{type(error).__name__}: {error} (attempt {claim.attempt} of {claim.max_attempts})"
        log.warning("sub-task %d failed: %s", claim.subtask_id, message, exc_info=error)
        outcome = with_ledger_retry(
            settings,
            lambda: ledger.fail_subtask(engine, claim, public_error(message), retry=retry, lease_s=settings.lease_s),
        )
        if retry and outcome.recorded:
            broker.publish_predictions(
                runtime.celery_app(),
                [(claim.subtask_id, claim.model, claim.priority)],
                countdown=retry_delay(settings, claim.attempt),
            )
    else:
        outcome = with_ledger_retry(
            settings,
            lambda: ledger.complete_subtask(
                engine, claim, output.tobytes(), version, bin_counts, predict_cpu_s=predict_cpu_s
            ),
        )
    if outcome.aggregate:
        aggregate_or_hand_over(engine, settings, claim)
    return outcome.aggregate


def aggregate_or_hand_over(engine: Engine, settings: Settings, claim: ledger.Claim) -> None:
    """Aggregate the batch whose last sub-task `claim` finished: here when it has at most
    `small_batch_items` inputs (one message hop less for its latency), else, or when that
    fails, through the aggregator's `aggregate` queue."""
    if settings.is_small_batch(claim.batch_items):
        try:
            aggregate_batch(engine, claim.batch_id)
            return
        # Whatever failed (a manifest missing on this host, a pipeline's aggregate raising),
        # the aggregator's path owns the outcome: it retries, and its sweeper re-aggregates.
        except Exception:  # noqa: BLE001
            log.exception("batch %s: aggregating it here failed; handing it to the aggregator", claim.batch_id)
    broker.publish_aggregate(runtime.celery_app(), str(claim.batch_id))
