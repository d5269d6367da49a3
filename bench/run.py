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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.cli import measure_cli
from bench.memory import PeakRss
from bench.processes import Processes
from bench.table import print_table
from bench.workload import DEFAULT_ROWS, Workload, make_workload
from pipeline import ledger, registry
from pipeline.artifacts import load_verified
from pipeline.client import Client
from pipeline.definition import Pipeline
from pipeline.errors import UnknownPipelineError
from pipeline.inputs import encode_inputs
from pipeline.model_registry import adopt_models_dir
from pipeline.scratch import scratch_services
from pipeline.settings import get_settings
from pipeline.training import train_models

RESULTS = Path(__file__).resolve().parent / "results.json"
WORKER_PROCESSES = 2
STATUS_CALLS = 50
LATENCY_WARM_UP = 5
CHECKED_ITEMS = 50
RUN_TIMEOUT_S = 3 * 3600
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


def check_workload(pipeline: Pipeline, workload: Workload) -> None:
    """The rows the limit predicts are the rows the pipeline's own split gives, checked on the first inputs."""
    head = workload.head(min(workload.items, CHECKED_ITEMS))
    (page,) = encode_inputs(pipeline, head.inputs, CHECKED_ITEMS, get_settings().max_item_bytes)
    parts = pipeline.split_page(page)
    for spec in pipeline.models:
        if not np.array_equal(np.asarray(parts[spec.name].X, dtype="<f4"), head.X):
            raise RuntimeError(f"bench workload rows differ from {pipeline.name}'s split for model {spec.name}")


def measure_limit(pipeline: Pipeline, models_dir: Path, X: np.ndarray) -> dict[str, float]:
    """Seconds of one vectorised predict call per model over all rows, in this process."""
    seconds = {}
    for spec in pipeline.models:
        estimator, _ = load_verified(models_dir, spec.name)
        spec.predict(estimator, X[:CHECKED_ITEMS])
        start = time.perf_counter()
        spec.predict(estimator, X)
        seconds[spec.name] = time.perf_counter() - start
    return seconds


def client_command(mode: str, pipeline: str, args: argparse.Namespace, items: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "bench.client", mode, "--pipeline", pipeline, "--rows", str(args.rows)]
    argv += ["--warm-up", str(args.warm_up)]
    return argv + (["--items", str(items)] if items is not None else [])


def measure_status(client: Client, batch_id: str) -> float:
    """Median ms of `batch.status()` on a finished batch."""
    batch = client.batch(batch_id)
    times = []
    for _ in range(STATUS_CALLS):
        start = time.perf_counter()
        batch.status()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure_latency(client: Client, pipeline: str, samples: int) -> list[float]:
    """ms from submit to the result readable, for one-input batches run one after another."""
    one = make_workload(pipeline, 1).inputs
    times = []
    for sample in range(LATENCY_WARM_UP + samples):
        start = time.perf_counter()
        batch = client.submit(pipeline, one)
        batch.wait(timeout=60)
        results = list(batch.results())
        elapsed = time.perf_counter() - start
        if len(results) != 1 or results[0].output is None:
            raise RuntimeError(f"one-input batch {batch.id} has no result: {results}")
        if sample >= LATENCY_WARM_UP:
            times.append(elapsed * 1000)
    return times


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


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Every phase, in order; return the figures."""
    pipeline = registry.get_pipeline(args.pipeline)
    figures: dict[str, Any] = {"pipeline": pipeline.name, "started_at": datetime.now(UTC).isoformat()}
    models_dir = folder / "models"
    with scratch_services("bench", folder / "embedded") as services:
        figures["services"] = services.origin
        log(f"training {', '.join(spec.name for spec in pipeline.models)}")
        train_models(models_dir, [spec.name for spec in pipeline.models])
        # The trained artifacts become the champions before any batch is split (the split pins them).
        engine = ledger.make_engine(services.database_url)
        adopt_models_dir(engine, services.settings(models_dir), created_by="bench")
        engine.dispose()

        workload = make_workload(pipeline.name, args.rows)
        check_workload(pipeline, workload)
        log(f"limit: {workload.rows} rows, one predict call per model")
        limit = measure_limit(pipeline, models_dir, workload.X)
        naive_items = min(workload.items, args.naive_items)
        del workload

        processes = Processes(folder / "logs", services.env(models_dir))
        try:
            models = ",".join(spec.name for spec in pipeline.models)
            worker = processes.start("worker", "workers", "--models", models, "--concurrency", str(WORKER_PROCESSES))
            aggregator = processes.start("aggregator", "aggregator")
            processes.start("peers", "bench.peers", str(WORKER_PROCESSES))

            log(f"pipeline: {args.rows} rows")
            launched = processes.launch("client-pipeline", client_command("pipeline", pipeline.name, args))
            roots = {"client": launched.pid, "worker": worker.pid, "aggregator": aggregator.pid}
            with PeakRss(roots) as rss:
                measured = json.loads(processes.finish("client-pipeline", launched, RUN_TIMEOUT_S))
            log(
                f"pipeline took {measured['seconds']:.2f} s, submit {measured['submit_s']:.2f} s;"
                " from the ledger, s after submission:"
                f" {json.dumps(measured['phases_s'])}"
            )

            client = Client(services.settings(models_dir))
            log("batch.status() on the finished batch")
            status_ms = measure_status(client, measured["batch_id"])
            log("pipeline results --out")
            results_out_s, rss_results_out_mb = measure_results_out(
                processes, folder, measured["batch_id"], measured["items"]
            )
            log(f"latency: {args.latency_samples} one-input batches")
            latency = measure_latency(client, pipeline.name, args.latency_samples)
            client.close()

            log(f"naive peer: {naive_items} inputs")
            naive = run_client(processes, "client-naive", client_command("naive", pipeline.name, args, naive_items))
            log(f"chunked peer: {args.rows} rows")
            chunked = run_client(processes, "client-chunked", client_command("chunked", pipeline.name, args))
        finally:
            processes.stop_all()
        log("CLI: pipeline --help, pipeline status --limit 1")
        cli = measure_cli(services.env(models_dir))

    limit_s = sum(limit.values())
    rows = measured["rows"]
    pipeline_rows_per_s = rows / measured["seconds"]
    naive_rows_per_s = naive["rows"] / naive["seconds"]
    chunked_rows_per_s = chunked["rows"] / chunked["seconds"]
    figures.update(
        {
            "rows": rows,
            "limit_s": limit_s,
            "pipeline_s": measured["seconds"],
            "ratio_vs_limit": measured["seconds"] / limit_s,
            "pipeline_rows_per_s": pipeline_rows_per_s,
            "naive_rows_per_s": naive_rows_per_s,
            "chunked_rows_per_s": chunked_rows_per_s,
            "latency_p50_ms": float(np.percentile(latency, 50)),
            "latency_p95_ms": float(np.percentile(latency, 95)),
            "latency_p99_ms": float(np.percentile(latency, 99)),
            "overhead_ms_per_subtask": (measured["seconds"] - limit_s) / measured["subtasks"] * 1000,
            "status_ms": status_ms,
            "rss_client_mb": rss.peak_mb("client"),
            "rss_worker_mb": rss.peak_mb("worker"),
            "rss_aggregator_mb": rss.peak_mb("aggregator"),
            "rss_results_out_mb": rss_results_out_mb,
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
            "latency_samples": len(latency),
            "results_out_s": results_out_s,
            "rss_worker_processes_mb": rss.peaks_mb("worker"),
            "rss_worker_total_mb": rss.tree_mb("worker"),
            "rss_aggregator_processes_mb": rss.peaks_mb("aggregator"),
            "rss_aggregator_total_mb": rss.tree_mb("aggregator"),
            "worker_processes": WORKER_PROCESSES,
            "cpus": os.cpu_count(),
            **cli,
        }
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", help="default: screening when registered, else digits")
    parser.add_argument("--rows", type=int, help="model rows (default: 1,000,000 screening, 200,000 digits)")
    parser.add_argument("--naive-items", type=int, default=20_000, help="inputs of the naive peer's batch, at most")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--warm-up", type=int, default=4000, help="rows of the untimed warm-up batch of each client")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.pipeline = args.pipeline or default_pipeline()
    args.rows = args.rows or DEFAULT_ROWS.get(args.pipeline, DEFAULT_ROWS["digits"])

    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        figures = run(args, folder)
    except BaseException:
        log(f"failed; logs kept in {folder / 'logs'}")
        raise
    shutil.rmtree(folder, ignore_errors=True)
    args.out.write_text(json.dumps(_rounded(figures), indent=2) + "\n")
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
