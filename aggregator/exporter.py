"""Prometheus metrics that Flower cannot show: queue depth, batches and sub-tasks
by state, per-model latency and failures. `pipeline aggregator` serves them on
`PIPELINE_METRICS_PORT`; the names are documented in docs/monitoring.md.

Every value is read from the broker and the ledger when Prometheus scrapes
(a custom collector): nothing is counted in this process, so a restart loses
nothing and every aggregator exports the same figures. Each scrape costs a few
set-based queries whose work is bounded by the batches table, the unfinished
sub-tasks and the sub-tasks of the last `LATENCY_WINDOW_S`, never by the whole
subtasks table.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import amqp.exceptions
import kombu.exceptions
import redis
from celery import Celery
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import Engine, Float, Row, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import SQLAlchemyError

from pipeline import broker, ledger, registry
from pipeline.ledger import dead_letters
from pipeline.schema import BatchState, RejectionReason, SubtaskRole, SubtaskState

log = logging.getLogger(__name__)

# Latency histograms and finished counts cover the sub-tasks that finished this long ago or less.
LATENCY_WINDOW_S = 600
# Upper bounds (seconds) of the latency buckets: queue waits run to an hour on a large batch.
BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, math.inf,
)  # fmt: skip
# A scrape that PostgreSQL cannot answer in time reports the ledger as down rather than hanging.
STATEMENT_TIMEOUT_MS = 5000

BROKER_ERRORS = (kombu.exceptions.OperationalError, redis.RedisError, amqp.exceptions.AMQPError, OSError)
FINISHED_SUBTASK_STATES = (SubtaskState.succeeded, SubtaskState.failed, SubtaskState.cancelled)
RECENT_OUTCOME_STATES = (SubtaskState.succeeded, SubtaskState.failed)

# One row per batch state: one pass over `batches` (a row per batch, not per sub-task). The batch
# counters give the finished sub-tasks by state.
BATCHES_BY_STATE = text(
    """
    SELECT state, count(*) AS batches, sum(succeeded) AS succeeded, sum(failed) AS failed,
           sum(cancelled) AS cancelled
    FROM batches
    GROUP BY state
    """
)

# The predicate is written as the partial index `subtasks_unfinished_lease` states it, so only
# the unfinished sub-tasks are read. `error` is set on a sub-task whose last attempt failed.
UNFINISHED_SUBTASKS = text(
    """
    SELECT model, role, state, count(*) AS subtasks, count(*) FILTER (WHERE error IS NOT NULL) AS retrying
    FROM subtasks
    WHERE state IN ('pending', 'dispatched', 'running')
    GROUP BY model, role, state
    """
)

# Sub-tasks that finished in the window, found through their batches (still open, or finished
# in the window) and the (batch_id, model, seq) index: no scan of the whole subtasks table.
# Grouped by each duration's bucket: the index of the first bound it does not exceed
# (width_bucket counts the bounds <= the value; a value equal to a bound belongs to that bound's bucket).
RECENT_SUBTASKS = text(
    """
    WITH recent AS (
        SELECT s.model, s.role, s.state,
               extract(epoch FROM s.started_at - s.queued_at)::float8 AS wait_s,
               extract(epoch FROM s.finished_at - s.started_at)::float8 AS compute_s
        FROM batches b
        JOIN subtasks s ON s.batch_id = b.id
        WHERE (b.finished_at IS NULL OR b.finished_at > now() - make_interval(secs => :window_s))
          AND s.state IN ('succeeded', 'failed')
          AND s.started_at IS NOT NULL
          AND s.finished_at > now() - make_interval(secs => :window_s)
    )
    SELECT model, role, state,
           width_bucket(wait_s, :bounds) - (wait_s = ANY(:bounds))::int AS wait_bucket,
           width_bucket(compute_s, :bounds) - (compute_s = ANY(:bounds))::int AS compute_bucket,
           count(*) AS subtasks, sum(wait_s) AS wait_s, sum(compute_s) AS compute_s
    FROM recent
    GROUP BY model, role, state, wait_bucket, compute_bucket
    """
).bindparams(bindparam("bounds", type_=ARRAY(Float)))


def queue_depths(app: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue, not yet delivered to a worker (0 for a queue the broker
    does not hold). Redis: LLEN of the queue's list through kombu's client, which adds the key
    prefix; other brokers (RabbitMQ): a passive queue_declare's message count."""
    with app.connection_for_read() as connection:
        if connection.transport.driver_type == "redis":
            # Not queue_declare: its existence check (EXISTS) ignores the key prefix.
            with connection.channel() as channel:
                # kombu's stubs type the channel as StdChannel; the Redis transport's Channel has `client`.
                return {queue: int(channel.client.llen(queue)) for queue in queues}  # type: ignore[attr-defined]
        depths = {}
        for queue in queues:
            # A passive declare of a missing queue closes its channel: one channel per queue.
            with connection.channel() as channel:
                try:
                    # kombu's stubs type the channel as StdChannel; amqp's Channel has `queue_declare`.
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count  # type: ignore[attr-defined]
                except (amqp.exceptions.NotFound, kombu.exceptions.ChannelError):
                    depths[queue] = 0
        return depths


@dataclass
class Latency:
    """One model's latency histogram: observations per bucket of `BUCKETS_S`, and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS_S))
    sum_s: float = 0.0

    def add(self, bucket: int, count: int, sum_s: float) -> None:
        self.counts[bucket] += count
        self.sum_s += sum_s

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, observations <= le) per bucket, as Prometheus wants them."""
        cumulative = itertools.accumulate(self.counts)
        # prometheus_client leaves floatToGoString unannotated.
        return [(floatToGoString(le), count) for le, count in zip(BUCKETS_S, cumulative)]  # type: ignore[no-untyped-call]


class PipelineCollector(Collector):
    """Reads the broker and the ledger on every scrape; see the module docstring."""

    def __init__(self, engine: Engine, app: Celery, models: Iterable[str]) -> None:
        self.engine = engine
        self.app = app
        self.models = sorted(models)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "pipeline_metrics_source_up", "1 when this scrape could read the source, else 0.", labels=["source"]
        )
        try:
            yield self._queue_family()
            up.add_metric(["broker"], 1)
        except BROKER_ERRORS as error:
            log.warning("metrics: broker unreadable: %s", error)
            up.add_metric(["broker"], 0)
        try:
            yield from self._ledger_families()
            up.add_metric(["ledger"], 1)
        except SQLAlchemyError as error:
            log.warning("metrics: ledger unreadable: %s", error)
            up.add_metric(["ledger"], 0)
        yield up

    @property
    def queues(self) -> list[str]:
        """Every queue of the pipeline: one per registered model, then `split` and `aggregate`."""
        return [broker.model_queue(model) for model in self.models] + [broker.SPLIT_QUEUE, broker.AGGREGATE_QUEUE]

    def _queue_family(self) -> Metric:
        family = GaugeMetricFamily(
            "pipeline_queue_messages", "Messages waiting in the queue, not yet taken by a worker.", labels=["queue"]
        )
        for queue, depth in queue_depths(self.app, self.queues).items():
            family.add_metric([queue], depth)
        return family

    def _ledger_families(self) -> list[Metric]:
        # One read-only snapshot for every query, so the figures agree with each other.
        options = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
        with self.engine.connect().execution_options(**options) as conn, conn.begin():
            conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": str(STATEMENT_TIMEOUT_MS)})
            batches = conn.execute(BATCHES_BY_STATE).all()
            unfinished = conn.execute(UNFINISHED_SUBTASKS).all()
            recent = conn.execute(RECENT_SUBTASKS, {"window_s": LATENCY_WINDOW_S, "bounds": BUCKETS_S[:-1]}).all()
            rejected = dead_letters.rejected_counts(conn)
            evaluations = ledger.evaluation_figures(conn)
            alerts = ledger.open_alerts(conn, None)
        # Shadow sub-tasks (a roll-out's challenger) are neither the batches' work nor the
        # models' serving latency: counted apart (`_shadow_families`), as the batch counters do.
        serving = [row for row in unfinished if row.role == SubtaskRole.serve]
        return [
            *_state_families(batches, serving),
            *self._unfinished_families(serving),
            *self._recent_families([row for row in recent if row.role == SubtaskRole.serve]),
            *_shadow_families(unfinished, recent),
            self._rejected_family(rejected),
            *_window_families(evaluations, alerts),
        ]

    def _rejected_family(self, rejected: dict[tuple[str, str], int]) -> Metric:
        """pipeline_rejected_messages_total: every queue and reason present (0 when none), so a
        first rejection is an increase; a queue outside the pipeline's (a routing key someone
        made up) is reported as the dead letter names it."""
        counts = {(queue, reason.value): 0 for queue in self.queues for reason in RejectionReason}
        counts.update(rejected)
        family = CounterMetricFamily(
            "pipeline_rejected_messages",
            "Malformed messages refused by a worker or aggregator (rows of dead_letters), by queue and reason.",
            labels=["queue", "reason"],
        )
        for (queue, reason), count in sorted(counts.items()):
            family.add_metric([queue, reason], count)
        return family

    def _unfinished_families(self, rows: Sequence[Row[Any]]) -> list[Metric]:
        counts = {(model, state): 0 for model in self.models for state in ledger.UNFINISHED_SUBTASK_STATES}
        retrying = dict.fromkeys(self.models, 0)
        for row in rows:
            counts[(row.model, SubtaskState(row.state))] = row.subtasks
            retrying[row.model] = retrying.get(row.model, 0) + row.retrying
        unfinished_family = GaugeMetricFamily(
            "pipeline_model_unfinished_subtasks",
            "Sub-tasks of the model not finished yet, by state (pending, dispatched, running).",
            labels=["model", "state"],
        )
        for (model, state), count in sorted(counts.items()):
            unfinished_family.add_metric([model, state], count)
        retrying_family = GaugeMetricFamily(
            "pipeline_model_retrying_subtasks",
            "Unfinished sub-tasks of the model whose last attempt failed (waiting for, or in, a retry).",
            labels=["model"],
        )
        for model, count in sorted(retrying.items()):
            retrying_family.add_metric([model], count)
        return [unfinished_family, retrying_family]

    def _recent_families(self, rows: Sequence[Row[Any]]) -> list[Metric]:
        finished = {(model, state): 0 for model in self.models for state in RECENT_OUTCOME_STATES}
        wait = {model: Latency() for model in self.models}
        compute = {model: Latency() for model in self.models}
        for row in rows:
            key = (row.model, SubtaskState(row.state))
            finished[key] = finished.get(key, 0) + row.subtasks
            wait.setdefault(row.model, Latency()).add(row.wait_bucket, row.subtasks, row.wait_s)
            compute.setdefault(row.model, Latency()).add(row.compute_bucket, row.subtasks, row.compute_s)

        finished_family = GaugeMetricFamily(
            "pipeline_model_finished_subtasks",
            f"Sub-tasks of the model that finished in the last {LATENCY_WINDOW_S} s, by outcome (succeeded, failed).",
            labels=["model", "state"],
        )
        for (model, state), count in sorted(finished.items()):
            finished_family.add_metric([model, state], count)
        families: list[Metric] = [finished_family]
        for name, what, latencies in (
            ("pipeline_model_queue_wait_seconds", "queue wait (queued to started)", wait),
            ("pipeline_model_compute_seconds", "compute time (started to finished)", compute),
        ):
            family = GaugeHistogramMetricFamily(
                name,
                f"The {what} of the model's sub-tasks that finished in the last {LATENCY_WINDOW_S} s.",
                labels=["model"],
            )
            for model, latency in sorted(latencies.items()):
                family.add_metric([model], latency.cumulative(), latency.sum_s)
            families.append(family)
        return families


WINDOW_LABELS = ["pipeline", "model", "version", "window"]


def _window_families(evaluations: Sequence[Row[Any]], alerts: Sequence[Row[Any]]) -> list[Metric]:
    """The windows as last judged for alerts (`monitor_evaluations.figures`, at most
    `pipeline.monitor.TOP_FEATURES` features per model version) and the open alerts."""
    psi = GaugeMetricFamily(
        "pipeline_window_feature_psi", "PSI of a window's top features.", labels=[*WINDOW_LABELS, "feature"]
    )
    drifted = GaugeMetricFamily(
        "pipeline_window_drifted", "1 when the window's drift verdict is drifted.", labels=WINDOW_LABELS
    )
    realised = GaugeMetricFamily(
        "pipeline_window_realised_kpi",
        "A KPI realised on the window's labelled inputs.",
        labels=[*WINDOW_LABELS, "kpi"],
    )
    estimated = GaugeMetricFamily(
        "pipeline_window_estimated_kpi",
        "A KPI estimated without labels (CBPE) over the window: its value and 95 % band.",
        labels=[*WINDOW_LABELS, "kpi", "bound"],
    )
    latency = GaugeMetricFamily(
        "pipeline_window_latency_p95_seconds", "p95 of the window's batches' end-to-end latency.", labels=WINDOW_LABELS
    )
    for evaluation in evaluations:
        for window, versions in evaluation.figures.items():
            for version in versions:
                scope = [evaluation.pipeline, version["model"], version["model_version"][:12], window]
                for feature, value in version["feature_psi"].items():
                    psi.add_metric([*scope, feature], value)
                if version["drifted"] is not None:
                    drifted.add_metric(scope, float(version["drifted"]))
                for kpi, value in version["realised_kpis"].items():
                    if value is not None:
                        realised.add_metric([*scope, kpi], value)
                # Figures judged before CBPE was monitored have no estimates.
                for kpi, band in version.get("estimated_kpis", {}).items():
                    for bound in ("value", "low", "high"):
                        estimated.add_metric([*scope, kpi, bound], band[bound])
                if version["latency_p95_s"] is not None:
                    latency.add_metric(scope, version["latency_p95_s"])
    open_family = GaugeMetricFamily("pipeline_alert_open", "1 for each open alert.", labels=["kind", *WINDOW_LABELS])
    for alert in alerts:
        open_family.add_metric([alert.kind, alert.pipeline, alert.model, alert.model_version[:12], alert.window], 1.0)
    return [psi, drifted, realised, estimated, latency, open_family]


def _shadow_families(unfinished: Sequence[Row[Any]], recent: Sequence[Row[Any]]) -> list[Metric]:
    """The shadow sub-tasks of active roll-outs per model: unfinished by state (the shadow
    backlog), and finished in the last `LATENCY_WINDOW_S` by outcome; only the models that have any."""
    backlog = GaugeMetricFamily(
        "pipeline_model_shadow_unfinished_subtasks",
        "Shadow sub-tasks (a roll-out's challenger, never counted in a batch) not finished yet, by state.",
        labels=["model", "state"],
    )
    finished = GaugeMetricFamily(
        "pipeline_model_shadow_finished_subtasks",
        f"Shadow sub-tasks that finished in the last {LATENCY_WINDOW_S} s, by outcome (succeeded, failed).",
        labels=["model", "state"],
    )
    for family, rows in ((backlog, unfinished), (finished, recent)):
        counts: dict[tuple[str, str], int] = {}
        for row in rows:
            if row.role == SubtaskRole.shadow:
                counts[(row.model, row.state)] = counts.get((row.model, row.state), 0) + row.subtasks
        for (model, state), count in sorted(counts.items()):
            family.add_metric([model, state], count)
    return [backlog, finished]


def _state_families(batches: Sequence[Row[Any]], unfinished: Sequence[Row[Any]]) -> list[Metric]:
    """pipeline_batches and pipeline_subtasks, every state present (0 when none)."""
    batch_counts = dict.fromkeys(BatchState, 0)
    subtask_counts = dict.fromkeys(SubtaskState, 0)
    for row in batches:
        batch_counts[BatchState(row.state)] = row.batches
        for finished in FINISHED_SUBTASK_STATES:
            subtask_counts[finished] += getattr(row, finished)
    for row in unfinished:
        subtask_counts[SubtaskState(row.state)] += row.subtasks
    batch_family = GaugeMetricFamily("pipeline_batches", "Batches in the ledger, by state.", labels=["state"])
    for batch_state, count in batch_counts.items():
        batch_family.add_metric([batch_state], count)
    subtask_family = GaugeMetricFamily("pipeline_subtasks", "Sub-tasks in the ledger, by state.", labels=["state"])
    for state, count in subtask_counts.items():
        subtask_family.add_metric([state], count)
    return [batch_family, subtask_family]


@dataclass
class MetricsServer:
    """The HTTP server of `/metrics`, in a thread of the aggregator's main process."""

    server: WSGIServer
    thread: threading.Thread
    engine: Engine

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
        self.engine.dispose()


def serve(address: str, port: int, database_url: str, app: Celery) -> MetricsServer | None:
    """Serve the pipeline's metrics on http://`address`:`port`/metrics; None (logged) when the port
    cannot be bound, so the aggregator keeps working without them."""
    engine = ledger.make_engine(database_url)
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(PipelineCollector(engine, app, list(registry.all_models())))
    try:
        server, thread = start_http_server(port, address, registry=metrics)
    except OSError as error:
        log.error("metrics endpoint not started on %s:%d: %s", address, port, error)
        engine.dispose()
        return None
    log.info("metrics endpoint on http://%s:%d/metrics", address, port)
    return MetricsServer(server, thread, engine)
