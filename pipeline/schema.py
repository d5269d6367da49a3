"""The batch ledger's tables, as SQLAlchemy 2 typed mappings.

The schema itself is created only by the Alembic migrations in `migrations/`;
these mappings must match them (a test compares the two).
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The column values' enums, re-exported: they are part of the schema's vocabulary.
from pipeline.states import FINISHED_BATCH_STATES as FINISHED_BATCH_STATES
from pipeline.states import PRIORITY_RANKS as PRIORITY_RANKS
from pipeline.states import Alias as Alias
from pipeline.states import BatchState as BatchState
from pipeline.states import FailurePolicy as FailurePolicy
from pipeline.states import ModelEvent as ModelEvent
from pipeline.states import Priority as Priority
from pipeline.states import RejectionReason as RejectionReason
from pipeline.states import RolloutMode as RolloutMode
from pipeline.states import RolloutState as RolloutState
from pipeline.states import SubtaskRole as SubtaskRole
from pipeline.states import SubtaskState as SubtaskState
from pipeline.states import VersionSource as VersionSource

Timestamp = TIMESTAMP(timezone=True)


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        Index("batches_state_created", "state", "created_at"),
        CheckConstraint("priority IN ('interactive', 'bulk')", name="batches_priority_known"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    pipeline: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text, server_default=BatchState.pending.value)
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    # SHA-256 (hex) of a keyed submission: pipeline, options and inputs as stored (see
    # `ledger.RequestFingerprint`); NULL without a key, or stored before revision 0006.
    request_sha256: Mapped[str | None] = mapped_column(Text)
    items: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    succeeded: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    cancelled: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    aggregate_runs: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Inputs split so far: the split commits step by step and resumes from here.
    split_items: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failure_policy: Mapped[str] = mapped_column(Text, server_default=FailurePolicy.best_effort.value)
    # `interactive` or `bulk` (`Priority`): the rank its sub-tasks are claimed in.
    priority: Mapped[str] = mapped_column(Text, server_default=Priority.bulk.value)
    max_failed_fraction: Mapped[float | None] = mapped_column(Float)
    deadline_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    aggregating_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # When the sweeper last published this pending batch's split (NULL: only the client did).
    split_published_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    # Model → version (artifact SHA-256) its first split step pinned; its later steps keep them.
    model_versions: Mapped[dict[str, str] | None] = mapped_column(JSONB)


class Subtask(Base):
    __tablename__ = "subtasks"
    __table_args__ = (
        UniqueConstraint("batch_id", "model", "seq"),
        # The sweeper's scan: unfinished sub-tasks by lease.
        Index(
            "subtasks_unfinished_lease",
            "lease_until",
            postgresql_where=text("state IN ('pending','dispatched','running')"),
        ),
        # A worker's claim: the model's next dispatched sub-task by priority, then seq (which
        # interleaves batches of one priority: round-robin), then id.
        Index(
            "subtasks_dispatched_by_priority",
            "model",
            "priority",
            "seq",
            "id",
            postgresql_where=text("state = 'dispatched'"),
        ),
        # A model's cost per row, read by the split (`ledger.model_row_costs`): its newest
        # succeeded sub-tasks of at least 1,000 rows (`split.COST_MIN_ROWS`).
        Index(
            "subtasks_model_cost",
            "model",
            "id",
            postgresql_where=text("state = 'succeeded' AND predict_cpu_s IS NOT NULL AND rows >= 1000"),
        ),
        CheckConstraint("role IN ('serve','shadow')", name="subtasks_role_known"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(Text)
    seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Text, server_default=SubtaskState.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer)
    # `Priority.rank` of its batch (or of shadow work): lower is claimed first.
    priority: Mapped[int] = mapped_column(SmallInteger, server_default=text("1"))
    rows: Mapped[int] = mapped_column(Integer)
    # Input item index of each payload row; rows are in item order.
    items: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    # The chunk's feature rows, float32 little-endian, row-major (rows x features); NULL when
    # they are the inputs' own stored features (`input_pages.features` of its items).
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The model's output rows, float32 little-endian, row-major (rows x outputs).
    output: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Drift bin counts of the chunk against its model version's reference profile,
    # int64 little-endian (`ReferenceProfile.bin_counts`); None without a profile.
    bin_counts: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(Text)
    # The model version (artifact SHA-256) that scores it, pinned by the split: its model's
    # champion when the batch's split began. NULL only for sub-tasks split before revision 0008.
    model_version: Mapped[str | None] = mapped_column(Text)
    # CPU seconds of the worker process in the model's predict call (revision 0013): what the
    # roll-out gate compares, as wall time depends on what else ran at that moment.
    predict_cpu_s: Mapped[float | None] = mapped_column(Float)
    # A shadow sub-task's paired timing (revision 0019): the champion's predict CPU seconds
    # on the same rows, in the same worker turn; what the gate compares `predict_cpu_s` with.
    champion_cpu_s: Mapped[float | None] = mapped_column(Float)
    queued_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # `serve`, or `shadow`: a roll-out's challenger scoring a copy of the rows of the serve
    # sub-task numbered `-1 - seq`; never counted in the batch's counters (revision 0011).
    role: Mapped[str] = mapped_column(Text, server_default=SubtaskRole.serve.value)
    # A small batch's sub-task published on another one's message (revision 0020,
    # `ledger.riders`); cleared when the sweeper publishes it.
    rides: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class StoredInputPage(Base):
    """Consecutive validated inputs of a batch (see `pipeline.inputs`)."""

    __tablename__ = "input_pages"
    __table_args__ = (CheckConstraint("items > 0", name="input_pages_items_positive"),)

    batch_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    first_item: Mapped[int] = mapped_column(Integer, primary_key=True)
    items: Mapped[int] = mapped_column(Integer)
    # A feature-vector pipeline's features, float32 little-endian, row-major (items x features).
    features: Mapped[bytes | None] = mapped_column(LargeBinary)
    # JSON array, one entry per input: the item, or a feature-vector pipeline's other fields.
    data: Mapped[list[Any] | None] = mapped_column(JSON)


class ResultPage(Base):
    """The results of consecutive inputs of a batch; the `results` view has one row per input."""

    __tablename__ = "result_pages"
    __table_args__ = (CheckConstraint("items > 0", name="result_pages_items_positive"),)

    batch_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    first_item: Mapped[int] = mapped_column(Integer, primary_key=True)
    items: Mapped[int] = mapped_column(Integer)
    # JSON array, per input its output object, or null when it has none.
    outputs: Mapped[list[Any]] = mapped_column(JSON)
    # JSON array, per input null or why it has no output; NULL when every input has one.
    errors: Mapped[list[Any] | None] = mapped_column(JSON)
    # JSON array, per input null (the batch's pinned `model_versions`) or {model: version, or
    # null where the model scored none of its rows} where they differ; NULL when no input's do.
    versions: Mapped[list[Any] | None] = mapped_column(JSON)


class DeadLetter(Base):
    """A message a worker or aggregator refused as malformed (see `pipeline.dead_letters`)."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        # pipeline_rejected_messages_total reads (queue, reason) from this index alone.
        Index("dead_letters_queue_reason", "queue", "reason"),
        CheckConstraint(
            f"reason IN ({', '.join(repr(reason.value) for reason in RejectionReason)})",
            name="dead_letters_reason_known",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # The queue it came from (its routing key: the queue's name on every route the pipeline declares).
    queue: Mapped[str] = mapped_column(Text)
    # Its Celery task id (or correlation id), when it has one.
    message_id: Mapped[str | None] = mapped_column(Text)
    task: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    # What is wrong with it, in one line.
    detail: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(Text)
    # Its body as text, cut to `pipeline.ledger.dead_letters.BODY_CHARS` characters.
    body: Mapped[str] = mapped_column(Text)
    # The worker or aggregator that refused it.
    hostname: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))


class WorkerHeartbeat(Base):
    """A worker or aggregator process and the queues it consumes, as of its last beat."""

    __tablename__ = "worker_heartbeats"

    # The Celery node name, e.g. models-4242@host.
    worker: Mapped[str] = mapped_column(Text, primary_key=True)
    queues: Mapped[list[str]] = mapped_column(ARRAY(Text))
    started_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
    beat_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))


class Label(Base):
    """An input's ground truth, stored after its batch finished; `replaced_at` is set when a
    different label replaced it (the current one has none)."""

    __tablename__ = "labels"
    __table_args__ = (
        Index("labels_current", "batch_id", "item", unique=True, postgresql_where=text("replaced_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"))
    item: Mapped[int] = mapped_column(Integer)
    # The label as JSON, validated against the pipeline's `label_type`.
    label: Mapped[Any] = mapped_column(JSONB)
    received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
    replaced_at: Mapped[datetime | None] = mapped_column(Timestamp)


class MonitorContribution(Base):
    """What one finished batch adds to its model version's windows (see `pipeline.monitor`)."""

    __tablename__ = "monitor_contributions"
    __table_args__ = (
        UniqueConstraint("batch_id", "model", "model_version"),
        Index("monitor_contributions_window", "pipeline", "finished_at"),
        Index(
            "monitor_contributions_version",
            "pipeline",
            "model",
            "model_version",
            text("finished_at DESC"),
            text("id DESC"),
        ),
        Index("monitor_contributions_unfolded", "pipeline", "finished_at", postgresql_where=text("NOT folded")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"))
    pipeline: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    # The SHA-256 of the model's artifact (its manifest's `sha256`).
    model_version: Mapped[str] = mapped_column(Text)
    finished_at: Mapped[datetime] = mapped_column(Timestamp)
    # The batch's inputs, and the rows this model version scored in it.
    items: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    # Drift bin counts against the version's reference profile, int64 little-endian; None without one.
    bin_counts: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The batch's label-free KPIs (`Kpis.summary`).
    kpis: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # `Pipeline.label_counts` over the batch's labelled inputs; None before any label.
    label_counts: Mapped[dict[str, int] | None] = mapped_column(JSONB)
    # The batch's end-to-end latency.
    latency_s: Mapped[float | None] = mapped_column(Float)
    # The CBPE sums of its rows (`pipeline.estimation`); None for a model without them.
    estimate_sums: Mapped[dict[str, float] | None] = mapped_column(JSONB)
    # Whether it is in its hour's rollup (`fold_contributions`, after the aggregate's commit).
    folded: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class MonitorRollup(Base):
    """The contributions of one pipeline, model, model version and hour, summed: what a
    window reads for each hour it covers whole (kept by the statements that write them)."""

    __tablename__ = "monitor_rollups"
    __table_args__ = (Index("monitor_rollups_window", "pipeline", "bucket_start"),)

    pipeline: Mapped[str] = mapped_column(Text, primary_key=True)
    model: Mapped[str] = mapped_column(Text, primary_key=True)
    model_version: Mapped[str] = mapped_column(Text, primary_key=True)
    # The UTC hour (`monitor_bucket(finished_at)`).
    bucket_start: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)
    batches: Mapped[int] = mapped_column(BigInteger)
    items: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(BigInteger)
    first_finished: Mapped[datetime] = mapped_column(Timestamp)
    last_finished: Mapped[datetime] = mapped_column(Timestamp)
    bin_counts: Mapped[list[int] | None] = mapped_column(ARRAY(BigInteger))
    # Per numeric KPI: the sum of its value times the batch's inputs, and of those inputs.
    kpi_sums: Mapped[dict[str, float]] = mapped_column(JSONB)
    kpi_items: Mapped[dict[str, int]] = mapped_column(JSONB)
    label_counts: Mapped[dict[str, int] | None] = mapped_column(JSONB)
    # Batches per latency bucket (`monitor_latency_bucket`), keyed by the bucket as text.
    latency_histogram: Mapped[dict[str, int]] = mapped_column(JSONB)
    estimate_sums: Mapped[dict[str, float] | None] = mapped_column(JSONB)


class Alert(Base):
    """One episode of a monitored condition: open while it holds, `cleared_at` once it stopped."""

    __tablename__ = "alerts"
    __table_args__ = (
        CheckConstraint("kind IN ('drift','estimated_performance','realised_kpi','latency')", name="alerts_kind_known"),
        Index(
            "alerts_open",
            "kind",
            "pipeline",
            "model",
            "model_version",
            "window",
            unique=True,
            postgresql_where=text("cleared_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    pipeline: Mapped[str] = mapped_column(Text)
    # A realised-KPI or latency alert is on the pipeline's batches: its first model and version.
    model: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(Text)
    # The window spec it was judged on, e.g. `1h`.
    window: Mapped[str] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
    evidence: Mapped[dict[str, Any]] = mapped_column(JSONB)
    cleared_at: Mapped[datetime | None] = mapped_column(Timestamp)


class MonitorEvaluation(Base):
    """When a pipeline's windows were last judged for alerts."""

    __tablename__ = "monitor_evaluations"

    pipeline: Mapped[str] = mapped_column(Text, primary_key=True)
    evaluated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
    # The judged windows' headline figures, read by the Prometheus endpoint.
    figures: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


def _known(column: str, values: type[enum.StrEnum], name: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(value.value) for value in values)})", name=name)


class ModelVersion(Base):
    """A model version: one artifact (by SHA-256) of one model, with its manifest and metrics.
    The artifact is in `artifact` up to `Settings.registry_inline_max_bytes`, else in the
    content-addressed store directory at `artifact_path` (relative to it)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint("version ~ '^[0-9a-f]{64}$'", name="model_versions_version_sha256"),
        _known("source", VersionSource, "model_versions_source_known"),
        CheckConstraint("(artifact IS NULL) <> (artifact_path IS NULL)", name="model_versions_artifact_in_one_place"),
    )

    model: Mapped[str] = mapped_column(Text, primary_key=True)
    # The artifact's SHA-256, 64 lowercase hex digits.
    version: Mapped[str] = mapped_column(Text, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    # `pipeline.artifacts.Manifest` as JSON (its drift reference, config, trusted types).
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONB)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    artifact: Mapped[bytes | None] = mapped_column(LargeBinary)
    artifact_path: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))


class ModelAlias(Base):
    """Which version a model's `champion` (or `challenger`) is."""

    __tablename__ = "model_aliases"
    __table_args__ = (
        _known("alias", Alias, "model_aliases_alias_known"),
        ForeignKeyConstraint(["model", "version"], ["model_versions.model", "model_versions.version"]),
    )

    model: Mapped[str] = mapped_column(Text, primary_key=True)
    alias: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[str] = mapped_column(Text)
    set_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
    set_by: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)


class ModelEventRow(Base):
    """One registry change, append-only (a trigger refuses UPDATE and DELETE)."""

    __tablename__ = "model_events"
    __table_args__ = (
        _known("event", ModelEvent, "model_events_event_known"),
        Index("model_events_model_at", "model", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    model: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(Text)
    version: Mapped[str] = mapped_column(Text)
    # The alias an `alias_set` or `rollback` moved; NULL for a registration.
    alias: Mapped[str | None] = mapped_column(Text)
    # The version the alias named before (NULL: none).
    previous_version: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))


class Rollout(Base):
    """A roll-out of a model's version: its mode, state, who started and ended it, and the
    latest gate (`pipeline.gate.GateResult` as JSON). At most one `active` per model."""

    __tablename__ = "rollouts"
    __table_args__ = (
        _known("mode", RolloutMode, "rollouts_mode_known"),
        _known("state", RolloutState, "rollouts_state_known"),
        CheckConstraint(
            "(mode = 'canary') = (percent IS NOT NULL) AND (percent IS NULL OR (percent > 0 AND percent < 100))",
            name="rollouts_percent_of_canary",
        ),
        CheckConstraint("(state = 'active') = (ended_at IS NULL)", name="rollouts_ended_when_not_active"),
        ForeignKeyConstraint(["model", "version"], ["model_versions.model", "model_versions.version"]),
        Index("rollouts_one_active_per_model", "model", unique=True, postgresql_where=text("state = 'active'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    model: Mapped[str] = mapped_column(Text)
    version: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(Text)
    # A canary's share of inputs in percent; None for a shadow roll-out.
    percent: Mapped[float | None] = mapped_column(Float)
    state: Mapped[str] = mapped_column(Text, server_default=RolloutState.active.value)
    started_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
    started_by: Mapped[str] = mapped_column(Text)
    ended_at: Mapped[datetime | None] = mapped_column(Timestamp)
    ended_by: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class RolloutBatch(Base):
    """A batch whose split pinned a roll-out's version: where the gate reads its evidence."""

    __tablename__ = "rollout_batches"
    __table_args__ = (Index("rollout_batches_batch", "batch_id"),)

    rollout_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("rollouts.id"), primary_key=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    added_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("clock_timestamp()"))
