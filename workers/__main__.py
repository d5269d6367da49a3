"""`python -m workers --models A,B`: a Celery worker consuming `model.A`, `model.B`
(all models when `--models` is omitted). `pipeline worker` execs this."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from pipeline import broker, registry, runtime
from pipeline.artifacts import load_verified
from pipeline.errors import ArtifactError, SettingsError, UnknownPipelineError
from pipeline.heartbeat import beat_while_consuming
from pipeline.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipeline worker")
    parser.add_argument("--models", help="comma-separated model names (default: every registered model)")
    parser.add_argument("--concurrency", type=int, help="worker processes (default PIPELINE_WORKER_CONCURRENCY)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        registry.check_chunk_sizes(settings.chunk_sizes)
        names = (
            [n.strip() for n in args.models.split(",") if n.strip()] if args.models else sorted(registry.all_models())
        )
        for name in names:
            registry.get_model(name)
            # Fail at start-up, not on every sub-task, when an artifact is missing or tampered with.
            load_verified(settings.resolved_models_dir, name)
    except (SettingsError, UnknownPipelineError, ArtifactError) as error:
        sys.exit(f"pipeline worker: {error}")

    import workers.tasks  # noqa: F401  (registers the predict task)
    from workers.models import serve

    serve(names)
    queues = [broker.model_queue(name) for name in names]
    node = f"models-{os.getpid()}@{socket.gethostname()}"
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


if __name__ == "__main__":
    main()
