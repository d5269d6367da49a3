"""`make bench`: one run, every figure of issue 5 side by side, measured on the same
machine and the same data, printed as a table and written to `bench/results.json`.

    python -m bench.run [--pipeline screening|digits] [--rows N] [--latency-samples K]

Services: PIPELINE_DATABASE_URL / PIPELINE_BROKER_URL when set, else embedded ones
started in a temporary folder; the run uses a database and a broker prefix of its own
and removes them afterwards. Phases, in order: train the models; the limit (one process,
one predict call per model); the pipeline's N-row batch (a worker with 2 processes and
the aggregator), with peak RSS sampled; `batch.status()` on it; `pipeline results --out`;
one-input latency; the naive and chunked Celery chord peers (their own 2 processes); once
every process has stopped, how fast the CLI answers (`bench/cli.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
import skops.io
from sqlalchemy import Engine, text

from bench import peers
from bench.cli import measure_cli
from bench.memory import PeakRss, machine_busy_s, trees_cpu_s
from bench.monitor import measure_monitor
from bench.processes import Processes
from bench.table import print_table
from bench.workload import DEFAULT_ROWS, make_workload
from pipeline import ledger, model_registry, registry
from pipeline.artifacts import load_verified
from pipeline.client import Client
from pipeline.definition import Pipeline
from pipeline.errors import UnknownPipelineError
from pipeline.model_registry import adopt_models_dir
from pipeline.scratch import scratch_services
from pipeline.states import Alias
from pipeline.training import train_models

RESULTS = Path(__file__).resolve().parent / "results.json"
WORKER_PROCESSES = 2
STATUS_CALLS = 50
# Rows of the untimed predict call before the limit is timed.
WARM_UP_ROWS = 50
LATENCY_WARM_UP = 5
RUN_TIMEOUT_S = 3 * 3600
THROUGHPUT, LATENCY, MIXED, FAIR, MONITOR, SHADOW = SCENARIOS = (
    "throughput",
    "latency",
    "mixed",
    "fair",
    "monitor",
    "shadow",
)
# Small batches whose aggregation time the monitor scenario's window update is held to.
SMALL_BATCHES, SMALL_BATCH_ITEMS = 20, 100
# Between the submissions of the fair scenario's two bulk batches.
FAIR_GAP_S = 1.0
# Threads answering the paced stream's one-input batches: enough that an arrival waits for
# none at rates up to ~100/s with answers under 100 ms.
OPEN_LOOP_THREADS = 16
_started = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _started:7.1f} s] {message}", file=sys.stderr, flush=True)


def default_pipeline() -> str:
    """`screening` when it is registered, else `digits`."""
    try:
        registry.get_pipeline("screening")
    except UnknownPipelineError:
        return "digits"
    return "screening"


def measure_limit(pipeline: Pipeline, models_dir: Path, Xs: dict[str, np.ndarray]) -> dict[str, float]:
    """Seconds of one vectorised predict call per model over all its rows, in this process."""
    seconds = {}
    for spec in pipeline.models:
        X = Xs[spec.name]
        estimator, _ = load_verified(models_dir, spec.name)
        spec.predict(estimator, X[:WARM_UP_ROWS])
        start = time.perf_counter()
        spec.predict(estimator, X)
        seconds[spec.name] = time.perf_counter() - start
    return seconds


def client_command(
    mode: str,
    pipeline: str,
    args: argparse.Namespace,
    items: int | None = None,
    rows: int | None = None,
    warm_up: int | None = None,
) -> list[str]:
    """A `bench.client` run of `rows` (default `--rows`), after a warm-up batch of `warm_up`
    rows (default `--warm-up`)."""
    argv = [sys.executable, "-m", "bench.client", mode, "--pipeline", pipeline, "--rows", str(rows or args.rows)]
    argv += ["--warm-up", str(args.warm_up if warm_up is None else warm_up)]
    return argv + (["--items", str(items)] if items is not None else [])


def service_pids(client: Client) -> dict[str, int]:
    """The PostgreSQL server's and (on Redis) the broker's process, when they run on this
    machine: their trees' CPU time is measured beside the pipeline's processes."""
    with client.engine.connect() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    pids = {}
    if psutil.pid_exists(backend):
        pids["postgres"] = psutil.Process(backend).ppid()
    if client.settings.broker_url.startswith("redis"):
        import redis

        server = int(redis.Redis.from_url(client.settings.broker_url).info("server")["process_id"])
        if psutil.pid_exists(server):
            pids["redis"] = server
    return pids


def measure_status(client: Client, batch_id: str) -> float:
    """Median ms of `batch.status()` on a finished batch."""
    batch = client.batch(batch_id)
    times = []
    for _ in range(STATUS_CALLS):
        start = time.perf_counter()
        batch.status()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


class Latency(NamedTuple):
    """One-input batches' ms from submit to the result readable, and their ids."""

    ms: list[float]
    batch_ids: list[str]


def measure_latency(
    client: Client,
    pipeline: str,
    samples: int,
    warm_up: int = LATENCY_WARM_UP,
    floor: list[float] | None = None,
    lean: list[float] | None = None,
) -> Latency:
    """One-input batches run one after another, after `warm_up` untimed ones. With `floor`,
    each is preceded by a no-op round trip (`peers.floor_round_trip`) whose ms are appended
    to it: the floor is then measured on the same machine, in the same seconds, as the
    latency it is compared with (this machine's speed drifts by 1.5x within minutes). With
    `lean`, likewise by a lean one-input batch of the same input (`peers.lean_round_trip`)."""
    definition = registry.get_pipeline(pipeline)
    one, item = one_input(definition)
    round_trips: list[tuple[list[float], Callable[[Client], float]]] = [
        (peer_ms, round_trip)
        for peer_ms, round_trip in (
            (floor, peers.floor_round_trip),
            (lean, partial(peers.lean_round_trip, pipeline=definition, item=item)),
        )
        if peer_ms is not None
    ]
    measured = Latency([], [])
    for sample in range(warm_up + samples):
        for peer_ms, round_trip in round_trips:
            ms = round_trip(client)
            if sample >= warm_up:
                peer_ms.append(ms)
        start = time.perf_counter()
        batch_id = answered(client, pipeline, one)
        elapsed = time.perf_counter() - start
        if sample >= warm_up:
            measured.ms.append(elapsed * 1000)
            measured.batch_ids.append(batch_id)
    return measured


def answered(client: Client, pipeline: str, one: Any) -> str:
    """Submit the one-input batch `one`, wait for it and read its result; return its id.

    Raises:
        RuntimeError: it has no result.
    """
    batch = client.submit(pipeline, one)
    batch.wait(timeout=60)
    results = list(batch.results())
    if len(results) != 1 or results[0].output is None:
        raise RuntimeError(f"one-input batch {batch.id} has no result: {results}")
    return batch.id


def open_loop_stream(
    client: Client, pipeline: str, rate_per_s: float, running: Callable[[], bool]
) -> list[tuple[float, float, str]]:
    """One-input batches arriving at random times (a Poisson process of `rate_per_s`) while
    `running()`, each answered on a thread of its own. A batch's time counts from its arrival,
    so a stall delays every batch that arrives during it, as it would a service's users; a
    closed loop sends none meanwhile and counts the stall once (coordinated omission). Returns
    (arrival epoch, ms, batch id) of each."""
    one, _ = one_input(registry.get_pipeline(pipeline))
    arrivals = np.random.default_rng(0)

    def timed(arrival: float) -> tuple[float, float, str]:
        batch_id = answered(client, pipeline, one)
        ms = (time.perf_counter() - arrival) * 1000
        return time.time() - ms / 1000, ms, batch_id

    with ThreadPoolExecutor(max_workers=OPEN_LOOP_THREADS) as pool:
        futures = []
        arrival = time.perf_counter()
        while running():
            arrival += float(arrivals.exponential(1 / rate_per_s))
            time.sleep(max(0.0, arrival - time.perf_counter()))
            futures.append(pool.submit(timed, arrival))
        return [future.result() for future in futures]


# Where a one-input batch's time goes, from the ledger's clocks (one server, one clock):
# stored (`created_at`, stamped by the one statement that stores a small batch) → a worker
# claims its first sub-task (the statement's commit, the publish and the delivery) → its last
# sub-task is finished (claims, predicts, completions; `predict_cpu`: the models' own CPU
# time in it, summed over the sub-tasks) → the batch is finished (the
# aggregate, in the worker that finished the last sub-task); the rest of the client's
# measured time is its own (validation, the champions' read and the split before storing,
# the wake-up, reading the result).
LATENCY_PHASES = text(
    "SELECT CAST(b.id AS text) AS id, extract(epoch FROM min(s.started_at) - b.created_at) * 1000 AS to_first_claim,"
    " extract(epoch FROM max(s.finished_at) - min(s.started_at)) * 1000 AS subtasks,"
    " extract(epoch FROM b.finished_at - max(s.finished_at)) * 1000 AS aggregate,"
    " extract(epoch FROM b.finished_at - b.created_at) * 1000 AS ledger,"
    " sum(s.predict_cpu_s) * 1000 AS predict_cpu"
    " FROM batches b JOIN subtasks s ON s.batch_id = b.id AND s.role = 'serve'"
    " WHERE b.id = ANY(CAST(:ids AS uuid[])) GROUP BY b.id"
)


LATENCY_PHASE_NAMES = ("to_first_claim", "subtasks", "predict_cpu", "aggregate")


def latency_phases(
    client: Client, latency: Latency, prefix: str = "latency_phase", tail: bool = False
) -> dict[str, float]:
    """Median ms of each phase of the one-input batches of `latency` (`LATENCY_PHASES`), and of
    the client's own share (its measured time minus the ledger's, per batch), as
    `<prefix>_<phase>_ms`; with `tail`, also the mean of each phase over the slowest 1 % of
    the batches (at least one), as `<prefix>_<phase>_tail_ms`: where the p99 goes."""
    with client.engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(LATENCY_PHASES, {"ids": latency.batch_ids})}
    measured = [(ms, rows[id_]) for ms, id_ in zip(latency.ms, latency.batch_ids)]
    phases = {name: [float(getattr(row, name)) for _, row in measured] for name in LATENCY_PHASE_NAMES}
    phases["client"] = [ms - float(row.ledger) for ms, row in measured]
    figures = {f"{prefix}_{name}_ms": statistics.median(values) for name, values in phases.items()}
    if tail:
        slowest = np.argsort(latency.ms)[-max(1, len(measured) // 100) :]
        figures |= {
            f"{prefix}_{name}_tail_ms": float(np.mean(np.asarray(values)[slowest])) for name, values in phases.items()
        }
    return figures


def run_client(processes: Processes, name: str, command: list[str]) -> dict[str, Any]:
    """Run a `bench.client` process to its end; return the JSON it printed."""
    return json.loads(processes.finish(name, processes.launch(name, command), RUN_TIMEOUT_S))


def measure_results_out(processes: Processes, folder: Path, batch_id: str, items: int) -> tuple[float, float]:
    """(seconds, peak RSS MB) of `pipeline results ID --out FILE` writing every result."""
    out_file = folder / "results.jsonl"
    command = [str(Path(sys.executable).with_name("pipeline")), "results", batch_id, "--out", str(out_file)]
    started = time.perf_counter()
    launched = processes.launch("results-out", command)
    with PeakRss({"results_out": launched.pid}) as rss:
        processes.finish("results-out", launched, RUN_TIMEOUT_S)
    seconds = time.perf_counter() - started
    with out_file.open() as lines:
        written = sum(1 for _ in lines)
    if written != items:
        raise RuntimeError(f"pipeline results --out wrote {written} lines for {items} inputs")
    return seconds, rss.peak_mb("results_out")


def bulk_phases(client: Client, batch_id: str) -> dict[str, float]:
    """Seconds from a batch's submission (its ledger row) to its first finished sub-task and to its end."""
    with client.engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT extract(epoch FROM min(s.finished_at) - b.created_at) AS first_result_s,"
                " extract(epoch FROM b.finished_at - b.created_at) AS finish_s,"
                " extract(epoch FROM b.created_at) AS created_epoch,"
                " extract(epoch FROM b.finished_at) AS finished_epoch"
                " FROM batches b JOIN subtasks s ON s.batch_id = b.id WHERE b.id = :b GROUP BY b.id"
            ),
            {"b": batch_id},
        ).one()
    return {key: float(value) for key, value in row._mapping.items()}


def stream_during_bulk(
    processes: Processes, client: Client, pipeline: str, bulk: list[str], name: str, rate_per_s: float | None = None
) -> tuple[Latency, dict[str, Any]]:
    """Run the bulk client `bulk` as process `name` while this process's own client submits
    one-input batches: one after another, or with `rate_per_s` at that rate whether or not
    the last was answered (`open_loop_stream`). Returns the ms and ids of those submitted and
    answered while the bulk batch was in the ledger, and the bulk client's figures.

    Raises:
        RuntimeError: no one-input batch ran while the bulk batch did.
    """
    launched = processes.launch(name, bulk)
    stream: list[tuple[float, float, str]] = []
    if rate_per_s is not None:
        stream = open_loop_stream(client, pipeline, rate_per_s, lambda: launched.poll() is None)
    else:
        while launched.poll() is None:
            started = time.time()
            one = measure_latency(client, pipeline, 1, warm_up=0)
            stream.append((started, one.ms[0], one.batch_ids[0]))
    figures = json.loads(processes.finish(name, launched, RUN_TIMEOUT_S))
    window = bulk_phases(client, figures["batch_id"])
    during = Latency([], [])
    for started, ms, batch_id in stream:
        if started >= window["created_epoch"] and started + ms / 1000 <= window["finished_epoch"]:
            during.ms.append(ms)
            during.batch_ids.append(batch_id)
    if not during.ms:
        raise RuntimeError("no one-input batch ran while the bulk batch did: raise --bulk-rows")
    return during, figures


def measure_mixed(
    processes: Processes, client: Client, pipeline: str, args: argparse.Namespace, floor: list[float]
) -> dict[str, Any]:
    """One-input latency idle (interleaved with `floor` samples), the bulk batch alone, then
    the bulk batch again with a stream of one-input batches (this process's own client)
    submitted one after another while it runs (closed-loop: as fast as they are answered),
    and again with one-input batches arriving at `--stream-rate` a second (paced)."""
    bulk = client_command("pipeline", pipeline, args, rows=args.bulk_rows, warm_up=0)
    log(f"mixed: {args.latency_samples} one-input batches on the idle cluster, each after a no-op round trip")
    idle = measure_latency(client, pipeline, args.latency_samples, floor=floor).ms
    log(f"mixed: bulk batch of {args.bulk_rows} rows alone")
    # Cores busy over each phase's wall time: the bulk client's start-up is in both.
    busy_before, started = machine_busy_s(), time.perf_counter()
    alone = run_client(processes, "client-bulk-alone", bulk)
    busy_alone, wall_alone = machine_busy_s() - busy_before, time.perf_counter() - started
    log("mixed: the bulk batch again, with one-input batches while it runs")
    busy_before, started = machine_busy_s(), time.perf_counter()
    stream, mixed = stream_during_bulk(processes, client, pipeline, bulk, "client-bulk-mixed")
    busy_mixed, wall_mixed = machine_busy_s() - busy_before, time.perf_counter() - started
    during = stream.ms
    log(
        f"mixed: {len(during)} one-input batches during the bulk batch; bulk {alone['seconds']:.2f} s alone,"
        f" {mixed['seconds']:.2f} s with them"
    )
    figures = {
        "idle_latency_p50_ms": float(np.percentile(idle, 50)),
        "idle_latency_p99_ms": float(np.percentile(idle, 99)),
        "mixed_latency_p50_ms": float(np.percentile(during, 50)),
        "mixed_latency_p99_ms": float(np.percentile(during, 99)),
        "mixed_latency_max_ms": max(during),
        "mixed_latency_samples": len(during),
        "mixed_bulk_rows": mixed["rows"],
        "mixed_bulk_items": mixed["items"],
        "mixed_bulk_alone_s": alone["seconds"],
        "mixed_bulk_with_stream_s": mixed["seconds"],
        "bulk_slowdown": mixed["seconds"] / alone["seconds"],
        # The stream is closed-loop (the next batch once the last is answered): the faster it
        # is served, the more of it runs beside the bulk batch. Its cost per batch compares runs.
        "mixed_stream_per_s": len(during) / mixed["seconds"],
        "bulk_ms_per_stream_batch": (mixed["seconds"] - alone["seconds"]) * 1000 / len(during),
        **latency_phases(client, stream, prefix="mixed_phase", tail=True),
        # The machine's cores busy (share of all) alone and with the stream, and the slowdown
        # if the bulk batch could only use the CPU the stream left (busy with ÷ busy alone).
        "mixed_cpu_busy_alone": busy_alone / (os.cpu_count() or 1) / wall_alone,
        "mixed_cpu_busy_with_stream": busy_mixed / (os.cpu_count() or 1) / wall_mixed,
        "bulk_slowdown_cpu_bound": busy_mixed / busy_alone,
    }
    figures["mixed_p99_vs_idle_p99"] = figures["mixed_latency_p99_ms"] / figures["idle_latency_p99_ms"]
    log(f"mixed: the bulk batch again, with one-input batches arriving at {args.stream_rate:g}/s while it runs")
    at_rate, paced = stream_during_bulk(
        processes, client, pipeline, bulk, "client-bulk-paced", rate_per_s=args.stream_rate
    )
    figures |= {
        "mixed_paced_rate_per_s": args.stream_rate,
        "mixed_paced_latency_samples": len(at_rate.ms),
        "mixed_paced_latency_p50_ms": float(np.percentile(at_rate.ms, 50)),
        "mixed_paced_latency_p99_ms": float(np.percentile(at_rate.ms, 99)),
        "mixed_paced_latency_max_ms": max(at_rate.ms),
        "mixed_paced_p99_vs_idle_p99": float(np.percentile(at_rate.ms, 99)) / figures["idle_latency_p99_ms"],
        "mixed_paced_bulk_with_stream_s": paced["seconds"],
        "mixed_paced_bulk_slowdown": paced["seconds"] / alone["seconds"],
        **latency_phases(client, at_rate, prefix="mixed_paced_phase", tail=True),
    }
    return figures


def equal_cost_challenger(client: Client, models_dir: Path, model: str) -> str:
    """Register `model`'s champion artifact re-serialized (the same estimator, other bytes) as
    its challenger: a version whose predict costs what the champion's does. Returns it."""
    data = (models_dir / f"{model}.skops").read_bytes()
    estimator = skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))
    again = skops.io.dumps(estimator, compression=zipfile.ZIP_DEFLATED)
    return model_registry.register(
        client.engine, client.settings, model, again, created_by="bench", as_alias=Alias.challenger
    )


def shadow_drained_s(client: Client, batch_id: str) -> float:
    """Seconds from `batch_id`'s end to its last shadow sub-task's end, once all have ended."""
    query = text(
        "SELECT count(*) FILTER (WHERE s.finished_at IS NULL) AS running,"
        " extract(epoch FROM max(s.finished_at) - b.finished_at) AS drained_s"
        " FROM batches b JOIN subtasks s ON s.batch_id = b.id AND s.role = 'shadow' WHERE b.id = :b GROUP BY b.id"
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        with client.engine.connect() as conn:
            row = conn.execute(query, {"b": batch_id}).one()
        if row.running == 0:
            return float(row.drained_s)
        time.sleep(0.2)
    raise RuntimeError(f"the shadow sub-tasks of batch {batch_id} did not finish")


def measure_shadow(
    processes: Processes, client: Client, pipeline: Pipeline, models_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """What an active shadow roll-out costs live traffic, in one run: one-input latency idle
    and during a bulk batch, and the bulk batch's time, without and then with a shadow
    roll-out of the pipeline's first model. Its challenger is the champion's own estimator
    re-serialized (`equal_cost_challenger`), so the difference is the shadow work and the
    gate, not a slower model. The roll-out is aborted at the end."""
    model = pipeline.models[0].name
    bulk = client_command("pipeline", pipeline.name, args, rows=args.bulk_rows, warm_up=0)
    figures: dict[str, Any] = {"shadow_model": model}
    for phase in ("off", "on"):
        if phase == "on":
            version = equal_cost_challenger(client, models_dir, model)
            client.rollouts.start(model, version=version, mode="shadow", started_by="bench")
        log(f"shadow {phase}: {args.latency_samples} one-input batches on the idle cluster, then with a bulk batch")
        idle = measure_latency(client, pipeline.name, args.latency_samples).ms
        during, bulk_figures = stream_during_bulk(processes, client, pipeline.name, bulk, f"client-shadow-{phase}")
        figures.update(
            {
                f"shadow_{phase}_idle_p50_ms": float(np.percentile(idle, 50)),
                f"shadow_{phase}_idle_p99_ms": float(np.percentile(idle, 99)),
                f"shadow_{phase}_during_bulk_p50_ms": float(np.percentile(during, 50)),
                f"shadow_{phase}_during_bulk_p99_ms": float(np.percentile(during, 99)),
                f"shadow_{phase}_bulk_s": bulk_figures["seconds"],
            }
        )
    figures["shadow_drained_after_bulk_s"] = shadow_drained_s(client, bulk_figures["batch_id"])
    client.rollouts.abort(model, actor="bench", reason="bench: the shadow scenario is done")
    for figure in ("idle_p50_ms", "idle_p99_ms", "during_bulk_p50_ms", "during_bulk_p99_ms", "bulk_s"):
        on, off = figures[f"shadow_on_{figure}"], figures[f"shadow_off_{figure}"]
        figures[f"shadow_cost_{figure.removesuffix('_ms')}"] = on / off
    return figures


def measure_fair(processes: Processes, client: Client, pipeline: str, args: argparse.Namespace) -> dict[str, Any]:
    """Two bulk batches of `--bulk-rows`, from two client processes started `FAIR_GAP_S` apart:
    each one's time from its submission (its ledger row) to its first finished sub-task and to its end."""
    bulk = client_command("pipeline", pipeline, args, rows=args.bulk_rows, warm_up=0)
    log(f"fair: two bulk batches of {args.bulk_rows} rows, {FAIR_GAP_S:.0f} s apart")
    first = processes.launch("client-fair-1", bulk)
    time.sleep(FAIR_GAP_S)
    second = processes.launch("client-fair-2", bulk)
    measured = [
        json.loads(processes.finish(f"client-fair-{n}", p, RUN_TIMEOUT_S)) for n, p in ((1, first), (2, second))
    ]
    figures: dict[str, Any] = {"fair_bulk_rows": measured[0]["rows"]}
    for n, run_of in enumerate(measured, 1):
        phases = bulk_phases(client, run_of["batch_id"])
        figures[f"fair_{n}_submit_s"] = run_of["submit_s"]
        figures[f"fair_{n}_first_result_s"] = phases["first_result_s"]
        figures[f"fair_{n}_finish_s"] = phases["finish_s"]
    first_created = bulk_phases(client, measured[0]["batch_id"])["created_epoch"]
    second_created = bulk_phases(client, measured[1]["batch_id"])["created_epoch"]
    figures["fair_2_submitted_after_1_s"] = second_created - first_created
    return figures


def floor_figures(floor: list[float]) -> dict[str, Any]:
    """The no-op round trips' percentiles (`bench.peers.floor_round_trip`)."""
    return {
        "floor_p50_ms": float(np.percentile(floor, 50)),
        "floor_p99_ms": float(np.percentile(floor, 99)),
        "floor_samples": len(floor),
    }


def measure_monitoring(
    client: Client, engine: Engine, pipeline: Pipeline, models_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The window update per finished batch against a small batch's aggregation time (the
    median of `SMALL_BATCHES` batches of `SMALL_BATCH_ITEMS` inputs), and `pipeline monitor`
    over a day of `--monitor-batches` batches (`bench.monitor`).

    A batch's aggregation runs from its last sub-task counted to the statement that finishes
    it (`aggregating_at` → `finished_at`): result pages, then the metrics (latency, drift,
    versions, CBPE), whose figures the contributions are made of. Its metrics'
    `aggregation_s` stops before the metrics (they cannot time themselves): the assembly,
    shown beside it."""
    log(f"monitor: {SMALL_BATCHES} batches of {SMALL_BATCH_ITEMS} inputs, then a day of {args.monitor_batches} batches")
    inputs = make_workload(pipeline, SMALL_BATCH_ITEMS * len(pipeline.models)).inputs[:SMALL_BATCH_ITEMS]
    aggregation, assembly = [], []
    for _ in range(SMALL_BATCHES):
        batch = client.submit(pipeline.name, inputs)
        batch.wait(timeout=120)
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT extract(epoch FROM b.finished_at - b.aggregating_at)::float8 AS aggregation_s,"
                    " m.aggregation_s AS assembly_s FROM batches b JOIN batch_metrics m USING (id) WHERE b.id = :id"
                ),
                {"id": batch.id},
            ).one()
        aggregation.append(row.aggregation_s * 1000)
        assembly.append(row.assembly_s * 1000)
    figures = measure_monitor(engine, pipeline, models_dir, args.monitor_batches, repeat=5)
    figures["small_batch_aggregation_ms"] = statistics.median(aggregation)
    figures["small_batch_assembly_ms"] = statistics.median(assembly)
    aggregation_ms = figures["small_batch_aggregation_ms"]
    figures["monitor_update_vs_aggregation"] = figures["monitor_update_ms"] / aggregation_ms
    figures["monitor_update_vs_assembly"] = figures["monitor_update_ms"] / figures["small_batch_assembly_ms"]
    figures["monitor_update_inline_vs_aggregation"] = figures["monitor_update_inline_ms"] / aggregation_ms
    return figures


def measure_one_input(
    client: Client, pipeline: str, samples: int, floor: list[float], roots: dict[str, int]
) -> dict[str, Any]:
    """One-input latency on the idle cluster, each batch after a no-op round trip appended to
    `floor` and a lean one-input batch: its percentiles, the median of each phase
    (`latency_phases`) and the lean batches' p50. Then `samples` of each again, one kind after
    the other, for the CPU ms this client and each process tree of `roots` and the servers
    used per batch (`one_input_cpu_ms_<role>`: [pipeline, lean], `batches_cpu_ms`)."""
    log(f"latency: {samples} one-input batches, each after a no-op round trip (the floor) and a lean batch")
    lean: list[float] = []
    one_input = measure_latency(client, pipeline, samples, floor=floor, lean=lean)
    p50 = float(np.percentile(one_input.ms, 50))
    lean_p50 = float(np.percentile(lean, 50))
    log(f"latency: CPU per batch, {samples} one-input batches, then {samples} lean ones")
    roots = {**roots, **service_pids(client)}
    pipeline_cpu = batches_cpu_ms(roots, lambda: measure_latency(client, pipeline, samples, warm_up=0), samples)
    lean_cpu = batches_cpu_ms(roots, lambda: measure_lean(client, pipeline, samples), samples)
    return {
        "latency_p50_ms": p50,
        "latency_p95_ms": float(np.percentile(one_input.ms, 95)),
        "latency_p99_ms": float(np.percentile(one_input.ms, 99)),
        **latency_phases(client, one_input),
        "latency_samples": len(one_input.ms),
        "lean_p50_ms": lean_p50,
        "latency_p50_vs_lean": p50 / lean_p50,
        **{f"one_input_cpu_ms_{role}": [pipeline_cpu[role], lean_cpu[role]] for role in pipeline_cpu},
    }


def one_input(pipeline: Pipeline) -> tuple[Any, dict[str, Any]]:
    """The workload's first input, as `submit` takes it and as a lean batch's JSON item."""
    inputs = make_workload(pipeline, 1).inputs
    (item,) = peers.naive_items(pipeline, inputs)
    return inputs, item


def measure_lean(client: Client, pipeline: str, samples: int) -> None:
    """`samples` lean one-input batches (`peers.lean_round_trip`) one after another."""
    definition = registry.get_pipeline(pipeline)
    _, item = one_input(definition)
    for _ in range(samples):
        peers.lean_round_trip(client, definition, item)


def batches_cpu_ms(roots: dict[str, int], run: Callable[[], object], batches: int) -> dict[str, float]:
    """CPU ms per batch this process (`client`, every thread, not its children) and each
    process tree of `roots` used while `run()` ran `batches` batches."""
    before, client_before = trees_cpu_s(roots), time.process_time()
    run()
    after, client_after = trees_cpu_s(roots), time.process_time()
    return {
        "client": (client_after - client_before) * 1000 / batches,
        **{role: (after[role] - before[role]) * 1000 / batches for role in roots},
    }


def measure_throughput(
    processes: Processes,
    client: Client,
    pipeline: Pipeline,
    args: argparse.Namespace,
    folder: Path,
    limit: dict[str, float],
    naive_items: int,
    roots: dict[str, int],
    one_input_roots: dict[str, int],
    floor: list[float],
) -> dict[str, Any]:
    """The N-row batch with peak RSS and CPU of `roots`' process trees, `batch.status()`,
    `results --out`, one-input latency (interleaved with `floor` samples; CPU per batch of
    `one_input_roots`' trees), and the chord peers."""
    log(f"pipeline: {args.rows} rows")
    launched = processes.launch("client-pipeline", client_command("pipeline", pipeline.name, args))
    with PeakRss({"client": launched.pid, **roots, **service_pids(client)}) as rss:
        measured = json.loads(processes.finish("client-pipeline", launched, RUN_TIMEOUT_S))
        # The batch's window, from its client's own clock: it printed its figures as it ended.
        ended = time.perf_counter()
        submitted = ended - measured["seconds"] + measured["submit_s"]
    log(
        f"pipeline took {measured['seconds']:.2f} s, submit {measured['submit_s']:.2f} s;"
        " from the ledger, s after submission:"
        f" {json.dumps(measured['phases_s'])}"
    )
    log("batch.status() on the finished batch")
    status_ms = measure_status(client, measured["batch_id"])
    log("pipeline results --out")
    results_out_s, rss_results_out_mb = measure_results_out(processes, folder, measured["batch_id"], measured["items"])
    one_input = measure_one_input(client, pipeline.name, args.latency_samples, floor, one_input_roots)
    log(f"naive peer: {naive_items} inputs")
    naive = run_client(processes, "client-naive", client_command("naive", pipeline.name, args, naive_items))
    log(f"chunked peer: {args.rows} rows")
    chunked = run_client(processes, "client-chunked", client_command("chunked", pipeline.name, args))

    limit_s = sum(limit.values())
    rows = measured["rows"]
    pipeline_rows_per_s = rows / measured["seconds"]
    naive_rows_per_s = naive["rows"] / naive["seconds"]
    chunked_rows_per_s = chunked["rows"] / chunked["seconds"]
    return {
        "rows": rows,
        "limit_s": limit_s,
        "pipeline_s": measured["seconds"],
        "ratio_vs_limit": measured["seconds"] / limit_s,
        "pipeline_rows_per_s": pipeline_rows_per_s,
        "naive_rows_per_s": naive_rows_per_s,
        "chunked_rows_per_s": chunked_rows_per_s,
        **one_input,
        "overhead_ms_per_subtask": (measured["seconds"] - limit_s) / measured["subtasks"] * 1000,
        "status_ms": status_ms,
        "rss_client_mb": rss.peak_mb("client"),
        "rss_worker_mb": rss.peak_mb("worker"),
        "rss_aggregator_mb": rss.peak_mb("aggregator"),
        "rss_results_out_mb": rss_results_out_mb,
        # Where the CPU went during the N-row batch, per process tree, beside the models' own
        # (the limit, one process): what the pipeline adds is the rest.
        **{f"cpu_s_{role}": rss.cpu_s(role) for role in rss.roots},
        # Below 100 %, the cores had idle time another stage could have used.
        "cores_busy_submit": rss.cores_busy(ended - measured["seconds"], submitted),
        "cores_busy_after_submit": rss.cores_busy(submitted, ended),
        # Extras.
        "items": measured["items"],
        "subtasks": measured["subtasks"],
        "limit_rows_per_s": rows / limit_s,
        **{f"limit_s_{model}": seconds for model, seconds in limit.items()},
        "pipeline_submit_s": measured["submit_s"],
        **{f"phase_{name}": seconds for name, seconds in measured["phases_s"].items()},
        "ledger_wait_s": measured["ledger_wait_s"],
        "ledger_aggregation_s": measured["ledger_aggregation_s"],
        "pipeline_vs_naive": pipeline_rows_per_s / naive_rows_per_s,
        "pipeline_vs_chunked": pipeline_rows_per_s / chunked_rows_per_s,
        "naive_items": naive["items"],
        "naive_rows": naive["rows"],
        "naive_s": naive["seconds"],
        "chunked_s": chunked["seconds"],
        "chunked_tasks": chunked["tasks"],
        "results_out_s": results_out_s,
        "rss_worker_processes_mb": rss.peaks_mb("worker"),
        "rss_worker_total_mb": rss.tree_mb("worker"),
        "rss_aggregator_processes_mb": rss.peaks_mb("aggregator"),
        "rss_aggregator_total_mb": rss.tree_mb("aggregator"),
    }


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Every phase of each scenario, in order; return the figures."""
    pipeline = registry.get_pipeline(args.pipeline)
    figures: dict[str, Any] = {
        "pipeline": pipeline.name,
        "scenarios": args.scenario,
        "started_at": datetime.now(UTC).isoformat(),
        "worker_processes": WORKER_PROCESSES,
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }
    models_dir = folder / "models"
    with scratch_services("bench", folder / "embedded") as services:
        figures["services"] = services.origin
        log(f"training {', '.join(spec.name for spec in pipeline.models)}")
        train_models(models_dir, [spec.name for spec in pipeline.models])
        # The trained artifacts become the champions before any batch is split (the split pins them).
        engine = ledger.make_engine(services.database_url)
        adopt_models_dir(engine, services.settings(models_dir), created_by="bench")
        engine.dispose()

        limit: dict[str, float] = {}
        naive_items = 0
        if THROUGHPUT in args.scenario:
            workload = make_workload(pipeline, args.rows)
            log(f"limit: {workload.rows} rows, one predict call per model")
            limit = measure_limit(pipeline, models_dir, workload.Xs)
            naive_items = min(workload.items, args.naive_items)
            del workload

        processes = Processes(folder / "logs", services.env(models_dir))
        client = Client(services.settings(models_dir))
        try:
            models = ",".join(spec.name for spec in pipeline.models)
            worker = processes.start("worker", "workers", "--models", models, "--concurrency", str(WORKER_PROCESSES))
            aggregator = processes.start("aggregator", "aggregator")
            peers_worker = processes.start("peers", "bench.peers", str(WORKER_PROCESSES))
            roots = {"worker": worker.pid, "aggregator": aggregator.pid}
            # Whose CPU a one-input batch and a lean one use (beside the client and the servers).
            one_input_roots = {**roots, "peers": peers_worker.pid}
            peers.configure(services.settings(models_dir))
            log("warm-up: every worker process loads its models")
            run_client(processes, "client-warm-up", client_command("pipeline", pipeline.name, args, rows=args.warm_up))
            # No-op round trips, one before each idle one-input batch of throughput and mixed.
            floor: list[float] = []
            peers.create_round_trip_tables(client)
            if THROUGHPUT in args.scenario:
                figures.update(
                    measure_throughput(
                        processes, client, pipeline, args, folder, limit, naive_items, roots, one_input_roots, floor
                    )
                )
            # Only the one-input part of `throughput`: an A/B of latency without the N-row batch.
            if LATENCY in args.scenario and THROUGHPUT not in args.scenario:
                figures.update(measure_one_input(client, pipeline.name, args.latency_samples, floor, one_input_roots))
            if MIXED in args.scenario:
                figures.update(measure_mixed(processes, client, pipeline.name, args, floor))
            if floor:
                figures.update(floor_figures(floor))
            if "latency_p50_ms" in figures:
                figures["latency_p50_vs_floor"] = figures["latency_p50_ms"] / figures["floor_p50_ms"]
                figures["lean_vs_floor"] = figures["lean_p50_ms"] / figures["floor_p50_ms"]
            if MIXED in args.scenario:
                figures["idle_latency_p50_vs_floor"] = figures["idle_latency_p50_ms"] / figures["floor_p50_ms"]
            if FAIR in args.scenario:
                figures.update(measure_fair(processes, client, pipeline.name, args))
            if SHADOW in args.scenario:
                figures.update(measure_shadow(processes, client, pipeline, models_dir, args))
            if MONITOR in args.scenario:
                engine = ledger.make_engine(services.database_url)
                try:
                    figures.update(measure_monitoring(client, engine, pipeline, models_dir, args))
                finally:
                    engine.dispose()
        finally:
            client.close()
            processes.stop_all()
        if THROUGHPUT in args.scenario:
            log("CLI: pipeline --help, pipeline status --limit 1")
            figures.update(measure_cli(services.env(models_dir)))
    return figures


def write_results(path: Path, figures: dict[str, Any]) -> None:
    """Merge the run's figures into `path` as flat keys `<pipeline>.<figure>`, replacing that
    pipeline's earlier figures of the same names (other pipelines' and scenarios' stay)."""
    prefix = f"{figures['pipeline']}."
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update({prefix + key: value for key, value in _rounded(figures).items()})
    path.write_text(json.dumps(dict(sorted(merged.items())), indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", help="default: screening when registered, else digits")
    parser.add_argument("--rows", type=int, help="model rows (default: 1,000,000 screening, 200,000 digits)")
    parser.add_argument("--naive-items", type=int, default=20_000, help="inputs of the naive peer's batch, at most")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--warm-up", type=int, default=4000, help="rows of the untimed warm-up batch")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="throughput (default), latency (throughput's one-input latency and its phases alone),"
        " mixed (one-input latency under a bulk batch), fair (two bulk batches),"
        " monitor (window update per batch, pipeline monitor over a day of batches), shadow (one-input latency"
        " and a bulk batch without and with a shadow roll-out); repeatable",
    )
    parser.add_argument(
        "--bulk-rows", type=int, default=1_000_000, help="model rows of each bulk batch of mixed, fair and shadow"
    )
    parser.add_argument(
        "--stream-rate",
        type=float,
        default=10.0,
        help="one-input batches per second arriving during mixed's paced bulk batch (default 10)",
    )
    parser.add_argument(
        "--monitor-batches", type=int, default=10_000, help="batches in the monitor scenario's day of contributions"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.pipeline = args.pipeline or default_pipeline()
    args.rows = args.rows or DEFAULT_ROWS.get(args.pipeline, DEFAULT_ROWS["digits"])
    args.scenario = args.scenario or [THROUGHPUT]

    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        figures = run(args, folder)
    except BaseException:
        log(f"failed; logs kept in {folder / 'logs'}")
        raise
    shutil.rmtree(folder, ignore_errors=True)
    write_results(args.out, figures)
    print_table(figures)
    log(f"wrote {args.out}")


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _rounded(v) for key, v in value.items()}
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
