"""`python -m aggregator`: a Celery worker consuming the `split` and `aggregate`
queues. `pipeline aggregator` execs this."""

from __future__ import annotations

import argparse
import os

from pipeline import broker, runtime
from pipeline.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipeline aggregator")
    parser.add_argument("--concurrency", type=int, help="processes (default PIPELINE_AGGREGATOR_CONCURRENCY)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)

    import aggregator.tasks  # noqa: F401  (registers split and aggregate)

    app = runtime.celery_app()
    app.worker_main(
        [
            "worker",
            "--queues",
            f"{broker.SPLIT_QUEUE},{broker.AGGREGATE_QUEUE}",
            "--concurrency",
            str(args.concurrency or get_settings().aggregator_concurrency),
            "--hostname",
            f"aggregator-{os.getpid()}@%h",
            "--loglevel",
            args.loglevel,
            "--without-mingle",
            "--without-gossip",
        ]
    )


if __name__ == "__main__":
    main()
