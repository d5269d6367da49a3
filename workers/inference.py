"""Runs one sub-task: claim it in the ledger, predict, record output and counter."""

from __future__ import annotations

import logging
import random

import numpy as np
from sqlalchemy import Engine

from pipeline import broker, ledger, registry, runtime
from pipeline.artifacts import ArtifactError
from pipeline.settings import Settings
from workers.guardrails import GuardrailViolation, check_output
from workers.models import loaded_model

log = logging.getLogger(__name__)

# Errors that a retry cannot fix: fail the sub-task at once.
PERMANENT_ERRORS = (ArtifactError, GuardrailViolation, registry.UnknownPipelineError)
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0


def retry_delay(attempt: int) -> float:
    """Exponential backoff with full jitter for retry number `attempt` (1-based)."""
    return random.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1)))


def run_subtask(engine: Engine, settings: Settings, subtask_id: int, worker: str) -> float | None:
    """Run sub-task `subtask_id` once.

    Returns a delay in seconds when the sub-task must be retried, else None (done,
    failed for good, or not ours to run: finished, cancelled or leased elsewhere).
    """
    claim = ledger.claim_subtask(engine, subtask_id, worker, settings.lease_s)
    if claim is None:
        log.info("sub-task %d is not claimable (finished, cancelled or leased); dropping the message", subtask_id)
        return None

    try:
        spec = registry.get_model(claim.model)
        estimator, manifest = loaded_model(spec.name)
        X = np.frombuffer(claim.payload, dtype="<f4").reshape(claim.rows, spec.n_features)
        output = check_output(spec, spec.predict(estimator, X), claim.rows)
    except PERMANENT_ERRORS as error:
        outcome = ledger.fail_subtask(
            engine, claim, f"{type(error).__name__}: {error}", retry=False, lease_s=settings.lease_s
        )
        delay = None
    # A model may raise anything; the error is recorded in the ledger and the sub-task retried.
    except Exception as error:  # noqa: BLE001
        retry = claim.attempt < claim.max_attempts
        message = f"{type(error).__name__}: {error} (attempt {claim.attempt} of {claim.max_attempts})"
        log.warning("sub-task %d failed: %s", subtask_id, message)
        outcome = ledger.fail_subtask(engine, claim, message, retry=retry, lease_s=settings.lease_s)
        delay = retry_delay(claim.attempt) if retry and outcome.recorded else None
    else:
        outcome = ledger.complete_subtask(engine, claim, output.tobytes(), manifest.version)
        delay = None
    if outcome.aggregate:
        broker.publish_aggregate(runtime.celery_app(), str(claim.batch_id))
    return delay
