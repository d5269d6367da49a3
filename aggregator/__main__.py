"""`python -m aggregator`: a Celery worker consuming the `split` and `aggregate`
queues, with the sweeper (and, on `PIPELINE_METRICS_PORT`, the Prometheus endpoint)
running in its main process. `pipeline aggregator` execs this."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from celery import signals

from aggregator import exporter
from aggregator.sweeper import Sweeper
from pipeline import broker, ledger, registry, runtime
from pipeline.errors import SettingsError
from pipeline.heartbeat import beat_while_consuming
from pipeline.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipeline aggregator")
    parser.add_argument("--concurrency", type=int, help="processes (default PIPELINE_AGGREGATOR_CONCURRENCY)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        # The aggregator splits batches: refuse chunk sizes of unknown models before any split.
        registry.check_chunk_sizes(settings.chunk_sizes)
    except SettingsError as error:
        sys.exit(f"pipeline aggregator: {error}")

    import aggregator.tasks  # noqa: F401  (registers split and aggregate)

    app = runtime.celery_app()
    node = f"aggregator-{os.getpid()}@{socket.gethostname()}"
    beat_while_consuming(node, [broker.SPLIT_QUEUE, broker.AGGREGATE_QUEUE], settings)
    sweepers: list[Sweeper] = []

    # Started once the pool has forked, with an engine of its own, so no child inherits its connections.
    @signals.worker_ready.connect(weak=False)
    def start_sweeper(**_: Any) -> None:
        sweeper = Sweeper(ledger.make_engine(runtime.service_urls().database_url), app, settings)
        sweeper.start()
        sweepers.append(sweeper)

    @signals.worker_shutdown.connect(weak=False)
    def stop_sweeper(**_: Any) -> None:
        for sweeper in sweepers:
            sweeper.stop()

    metrics_servers: list[exporter.MetricsServer] = []

    # Like the sweeper: once, in the main process, after the pool has forked.
    @signals.worker_ready.connect(weak=False)
    def start_metrics(**_: Any) -> None:
        if settings.metrics_port:
            server = exporter.serve(
                settings.metrics_address, settings.metrics_port, runtime.service_urls().database_url, app
            )
            if server is not None:
                metrics_servers.append(server)

    @signals.worker_shutdown.connect(weak=False)
    def stop_metrics(**_: Any) -> None:
        for server in metrics_servers:
            server.stop()

    app.worker_main(
        [
            "worker",
            "--queues", f"{broker.SPLIT_QUEUE},{broker.AGGREGATE_QUEUE}",
            "--concurrency", str(args.concurrency or settings.aggregator_concurrency),
            "--hostname", node,
            "--loglevel", args.loglevel,
            "--without-mingle",
            "--without-gossip",
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main()
