"""One client run, in a process of its own so its memory is measured alone:
`python -m bench.client {pipeline,naive,chunked} --pipeline P --rows N [--items K] [--warm-up W]`.

It builds the workload (untimed), runs a small warm-up batch the same way (so every
worker process has loaded its models), then the timed batch: the clock starts before
the inputs are handed over and stops once every per-input result is readable. Prints
one JSON line with what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlalchemy import text

from bench import peers
from bench.workload import make_workload
from pipeline import registry
from pipeline.client import Client
from pipeline.settings import get_settings

WAIT_TIMEOUT_S = 3600
WARM_UP_SEED = 1


def ledger_phases(client: Client, batch_id: str) -> dict[str, float]:
    """Seconds from submission to each milestone of a finished batch, from the ledger's timestamps."""
    with client.engine.connect() as conn:
        row = (
            conn.execute(
                text(
                    "SELECT extract(epoch FROM b.started_at - b.created_at) AS split_done_s,"
                    " extract(epoch FROM min(s.started_at) - b.created_at) AS first_subtask_started_s,"
                    " extract(epoch FROM max(s.finished_at) - b.created_at) AS last_subtask_finished_s,"
                    " extract(epoch FROM b.aggregating_at - b.created_at) AS aggregating_s,"
                    " extract(epoch FROM b.finished_at - b.created_at) AS finished_s"
                    " FROM batches b JOIN subtasks s ON s.batch_id = b.id WHERE b.id = :b GROUP BY b.id"
                ),
                {"b": batch_id},
            )
            .mappings()
            .one()
        )
    return {key: round(float(value), 3) for key, value in row.items()}


def run_pipeline(client: Client, pipeline: str, inputs: Any) -> dict[str, Any]:
    start = time.perf_counter()
    batch = client.submit(pipeline, inputs)
    submitted = time.perf_counter()
    status = batch.wait(timeout=WAIT_TIMEOUT_S)
    seconds = time.perf_counter() - start
    if status.state.value != "succeeded":
        raise RuntimeError(f"batch {batch.id} ended {status.state.value}: {status.error}")
    return {
        "batch_id": batch.id,
        "seconds": seconds,
        "submit_s": submitted - start,
        "subtasks": status.total,
        # From the ledger: submitted → split done, and aggregating → finished.
        "ledger_wait_s": status.wait_s,
        "ledger_aggregation_s": status.aggregation_s,
        "phases_s": ledger_phases(client, batch.id),
    }


def run_peer(mode: str, pipeline: str, inputs: Any) -> dict[str, Any]:
    definition = registry.get_pipeline(pipeline)
    start = time.perf_counter()
    if mode == "naive":
        answered, tasks = peers.run_naive(definition, inputs), len(inputs)
    else:
        answered, tasks = peers.run_chunked(definition, inputs, get_settings().chunk_sizes)
    return {"seconds": time.perf_counter() - start, "answered": answered, "tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client")
    parser.add_argument("mode", choices=["pipeline", "naive", "chunked"])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--rows", type=int, required=True, help="model rows of the workload")
    parser.add_argument("--items", type=int, help="submit only the first ITEMS inputs")
    parser.add_argument("--warm-up", type=int, default=0, help="model rows of the warm-up batch (0: none)")
    args = parser.parse_args()

    definition = registry.get_pipeline(args.pipeline)
    workload = make_workload(definition, args.rows)
    if args.items is not None:
        workload = workload.head(args.items)
    warm_up = make_workload(definition, args.warm_up, WARM_UP_SEED) if args.warm_up else None
    if args.mode == "pipeline":
        client = Client()
        if warm_up is not None:
            run_pipeline(client, args.pipeline, warm_up.inputs)
        measured = run_pipeline(client, args.pipeline, workload.inputs)
        client.close()
    else:
        peers.configure(get_settings())
        if warm_up is not None:
            run_peer(args.mode, args.pipeline, warm_up.inputs)
        measured = run_peer(args.mode, args.pipeline, workload.inputs)
    print(json.dumps({"items": workload.items, "rows": workload.rows, **measured}), flush=True)


if __name__ == "__main__":
    main()
