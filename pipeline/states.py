"""The states and kinds the ledger's columns take, as enums: importable without SQLAlchemy
(the CLI offers them as choices before it loads anything else)."""

from __future__ import annotations

import enum


class BatchState(enum.StrEnum):
    pending = "pending"
    running = "running"
    aggregating = "aggregating"
    succeeded = "succeeded"
    partial = "partial"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_BATCH_STATES


FINISHED_BATCH_STATES = frozenset({BatchState.succeeded, BatchState.partial, BatchState.failed, BatchState.cancelled})


class SubtaskState(enum.StrEnum):
    pending = "pending"
    dispatched = "dispatched"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class FailurePolicy(enum.StrEnum):
    # Finish as `partial` with every result that could be produced.
    best_effort = "best_effort"
    # The first failed sub-task fails the batch and cancels the rest.
    fail_fast = "fail_fast"


class Priority(enum.StrEnum):
    """Who waits on a batch's sub-tasks: a worker claims interactive ones first, then bulk
    ones (round-robin over bulk batches), then shadow ones (a roll-out's extra scoring, once
    its batch has finished)."""

    interactive = "interactive"
    bulk = "bulk"
    shadow = "shadow"

    @property
    def rank(self) -> int:
        """`subtasks.priority`: lower is claimed first."""
        return PRIORITY_RANKS[self]


PRIORITY_RANKS = {Priority.interactive: 0, Priority.bulk: 1, Priority.shadow: 2}


class RejectionReason(enum.StrEnum):
    """Why a message was refused; the `reason` label of `pipeline_rejected_messages_total`."""

    # Not a Celery protocol 2 task message as the pipeline publishes it: body, headers or
    # protocol 1.
    shape = "shape"
    # The task's keyword arguments fail its message model (`pipeline.broker.MESSAGES`).
    arguments = "arguments"
    # Not a task of the pipeline that this process runs.
    unknown_task = "unknown_task"
    # Its content type is refused: anything but JSON (pickle, YAML, ...).
    content_type = "content_type"
    # The body does not decode (not JSON, nested too deep, a failed decompression).
    undecodable = "undecodable"
    # Celery refused it while taking it (e.g. an ETA that is no date).
    invalid = "invalid"


class Alias(enum.StrEnum):
    """A model's aliases (`model_aliases.alias`): the champion serves new batches; a
    challenger is the version a roll-out tries."""

    champion = "champion"
    challenger = "challenger"


class VersionSource(enum.StrEnum):
    """Where a model version came from (`model_versions.source`)."""

    trained = "trained"
    registered = "registered"
    # A models-dir artifact of a deployment from before the registry.
    migrated = "migrated"


class ModelEvent(enum.StrEnum):
    """What a `model_events` row records."""

    registered = "registered"
    alias_set = "alias_set"
    rollback = "rollback"
    # A roll-out's life (`rollouts`): started, a new gate verdict, promoted (the champion
    # alias moved to its version) or aborted (by hand or automatically).
    rollout_started = "rollout_started"
    rollout_verdict = "rollout_verdict"
    rollout_promoted = "rollout_promoted"
    rollout_aborted = "rollout_aborted"


class SubtaskRole(enum.StrEnum):
    """`subtasks.role`: a `serve` sub-task's output makes the batch's results and counters;
    a `shadow` one is a roll-out's challenger scoring the same rows, kept only for the gate."""

    serve = "serve"
    shadow = "shadow"


class RolloutMode(enum.StrEnum):
    """How a roll-out tries its version: on copies of every batch's rows (`shadow`), or by
    serving a stable share of the inputs (`canary`)."""

    shadow = "shadow"
    canary = "canary"


class RolloutState(enum.StrEnum):
    """`rollouts.state`: at most one `active` roll-out per model."""

    active = "active"
    promoted = "promoted"
    aborted = "aborted"
