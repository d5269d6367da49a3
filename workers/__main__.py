"""`python -m workers --models A,B`: a Celery worker consuming `model.A`, `model.B`
(all models when `--models` is omitted). `pipeline worker` execs this."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence

from pipeline import broker, model_registry, registry, runtime
from pipeline.errors import PipelineError
from pipeline.heartbeat import beat_while_consuming
from pipeline.settings import Settings, get_settings

# How much lower the pool's CPU priority is than its interactive lane's (`os.nice`: weight
# 110 against 1024 when both want a core).
POOL_NICE = 10


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipeline worker")
    parser.add_argument("--models", help="comma-separated model names (default: every registered model)")
    parser.add_argument("--concurrency", type=int, help="worker processes (default PIPELINE_WORKER_CONCURRENCY)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    import workers.tasks  # noqa: F401  (registers the predict task)
    from workers.inference import with_ledger_retry
    from workers.models import loaded_version, serve

    try:
        settings = get_settings()
        registry.check_chunk_sizes(settings.chunk_sizes)
        names = (
            [n.strip() for n in args.models.split(",") if n.strip()] if args.models else sorted(registry.all_models())
        )
        for name in names:
            registry.get_model(name)
        engine = runtime.engine()

        def load_champions() -> None:
            # A deployment from before the registry: its models dir's artifacts become first versions.
            model_registry.adopt_models_dir(engine, settings, created_by=f"worker@{socket.gethostname()}")
            for name in names:
                # Fail at start-up, not on every sub-task, when a champion is missing or tampered
                # with; the pool inherits what is loaded here.
                loaded_version(engine, settings, name, model_registry.champion(engine, name))

        # A worker started while PostgreSQL restarts waits for it, as a sub-task's writes do
        # (both steps are idempotent).
        with_ledger_retry(settings, load_champions)
    except (PipelineError, OSError) as error:
        sys.exit(f"pipeline worker: {error}")
    # Forked pool processes must not share the parent's database connections.
    engine.dispose()

    serve(names)
    node = f"models-{os.getpid()}@{socket.gethostname()}"
    if settings.interactive_lane:
        start_lane(settings, f"{node}/lane", names)
        # The pool's processes (forked by Celery from this one) yield the cores to the lane,
        # which sleeps until interactive work comes: without this, its turn got a fair third of
        # 2 cores beside two bulk predicts, and took twice its idle time.
        os.nice(POOL_NICE)
    queues = [broker.model_queue(name) for name in names]
    beat_while_consuming(node, queues, settings)

    app = runtime.celery_app()
    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(args.concurrency or settings.worker_concurrency),
            "--hostname",
            node,
            "--loglevel",
            args.loglevel,
            "--without-mingle",
            "--without-gossip",
        ]
    )


def start_lane(settings: Settings, name: str, models: Sequence[str]) -> None:
    """Fork the worker's interactive lane (`workers.lane.lane_process`), which records its
    claims as worker `name`: it inherits the loaded models and ends once this process is gone."""
    from workers.lane import lane_process

    parent = os.getpid()
    if os.fork() == 0:
        try:
            logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/lane] %(message)s")
            lane_process(settings, name, models, parent)
        finally:
            os._exit(0)


if __name__ == "__main__":
    main()
