"""`pipeline migrate`, `worker`, `aggregator`, `up`, `demo`, `down`: the processes and services."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from pipeline.cli.base import (
    _actor,
    _console,
    main,
)

if TYPE_CHECKING:
    from pipeline.settings import Settings
    from pipeline.stack import Stack


@main.command()
def migrate() -> None:
    """Apply the ledger's database migrations."""
    from pipeline import ledger, model_registry, runtime
    from pipeline.settings import get_settings

    ledger.migrate(runtime.service_urls().database_url)
    _console().print("ledger schema is up to date")
    # An upgrade from before the registry: the models dir's artifacts become first versions.
    for name in model_registry.adopt_models_dir(runtime.engine(), get_settings(), created_by=_actor()):
        _console().print(f"{name}: registered from the models folder as its champion")


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--models", help="Comma-separated model names (default: all).")
@click.option("--concurrency", type=int, help="Worker processes.")
def worker(models: str | None, concurrency: int | None) -> None:
    """Run a model worker (Celery worker on queues model.<name>)."""
    argv = [sys.executable, "-m", "workers"]
    argv += ["--models", models] if models else []
    argv += ["--concurrency", str(concurrency)] if concurrency else []
    os.execv(sys.executable, argv)


@main.command()
@click.option("--concurrency", type=int, help="Aggregator processes.")
def aggregator(concurrency: int | None) -> None:
    """Run the aggregator (Celery worker on the split and aggregate queues)."""
    argv = [sys.executable, "-m", "aggregator"]
    argv += ["--concurrency", str(concurrency)] if concurrency else []
    os.execv(sys.executable, argv)


def _print_endpoints(settings: Settings, stack: Stack) -> None:
    """Where `up`'s services are, passwords masked; where Flower's password is."""
    from pipeline.redaction import redact

    urls = stack.service_urls
    click.echo(f"database: {redact(urls.database_url)}")
    click.echo(f"broker:   {redact(urls.broker_url)}")
    stored = stack.flower_password_file
    password = "from PIPELINE_FLOWER_PASSWORD" if stored is None else f"in {stored}"
    click.echo(f"Flower:   http://127.0.0.1:{settings.flower_port} (user {settings.flower_user}, password {password})")


@main.command()
@click.pass_context
def up(ctx: click.Context) -> None:
    """Start services (embedded when no URL is set), workers, aggregator and Flower; Ctrl-C
    (or SIGTERM, SIGHUP) stops them all, and so does any of them exiting."""
    from pipeline.settings import get_settings
    from pipeline.stack import Stack, StopSignal, stop_signals

    settings = get_settings()
    with stop_signals():
        try:
            with Stack(settings, flower=True) as stack:
                _print_endpoints(settings, stack)
                click.echo("running; Ctrl-C stops everything")
                try:
                    exited = stack.wait()
                except StopSignal as stop:
                    click.echo(f"{stop.signal.name}: stopping")
                    return
                # Before the others are stopped, which can take a while (workers finish their sub-task).
                click.echo(f"Error: {exited}: stopping everything", err=True)
                ctx.exit(1)
        except StopSignal as stop:
            click.echo(f"{stop.signal.name} while starting: stopped")


@main.command()
@click.option("--strips", default=500, show_default=True, help="Digit strips to read.")
@click.option("--records", type=int, help="Patient records to screen (default: the held-out split, once each).")
@click.option(
    "--rollout", is_flag=True, help="Then run a retrained screening forest in a shadow roll-out and show the verdict."
)
def demo(strips: int, records: int | None, rollout: bool) -> None:
    """Run the digits and screening pipelines end to end on the embedded default (or your URLs), then stop."""
    from pipeline.demo import run_demo
    from pipeline.settings import get_settings
    from pipeline.stack import StopSignal, stop_signals

    try:
        with stop_signals():
            run_demo(get_settings(), strips, records, _console(), rollout=rollout)
    except StopSignal as stop:
        raise click.ClickException(f"{stop.signal.name}: the demo stopped before its end") from None


@main.command()
def down() -> None:
    """Stop the embedded PostgreSQL and Redis under PIPELINE_DATA_DIR."""
    from pipeline.embedded import stop_services
    from pipeline.settings import get_settings

    stop_services(get_settings().data_dir)
    _console().print("embedded services stopped")
