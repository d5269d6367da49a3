"""The `pipeline` command: a thin layer over the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from pipeline import ledger, registry
from pipeline.client import BatchNotFoundError, Client, InvalidInputError
from pipeline.settings import get_settings

console = Console()
KNOWN_ERRORS = (BatchNotFoundError, InvalidInputError, ValidationError, registry.UnknownPipelineError, TimeoutError)


class _Group(click.Group):
    """Turns the library's expected errors into a one-line message and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KNOWN_ERRORS as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=_Group)
def main() -> None:
    """Async fan-out / aggregate inference pipeline."""


@main.command()
def migrate() -> None:
    """Apply the ledger's database migrations."""
    from pipeline import runtime

    ledger.migrate(runtime.service_urls().database_url)
    console.print("ledger schema is up to date")


@main.group()
def models() -> None:
    """Model artifacts."""


@models.command("list")
def models_list() -> None:
    """List registered models and their trained artifacts."""
    from pipeline.artifacts import ArtifactError, read_manifest

    models_dir = get_settings().resolved_models_dir
    table = Table("pipeline", "model", "queue", "chunk", "version", "trained", "metrics")
    for pipeline in registry.all_pipelines():
        for spec in pipeline.models:
            try:
                manifest = read_manifest(models_dir, spec.name)
                trained = (manifest.version, f"{manifest.trained_at:%Y-%m-%d %H:%M}", json.dumps(manifest.metrics))
            except ArtifactError:
                trained = ("-", "not trained", "")
            table.add_row(pipeline.name, spec.name, f"model.{spec.name}", str(spec.chunk_size), *trained)
    console.print(table)


@models.command("train")
@click.option("--only", help="Comma-separated model names (default: all).")
def models_train(only: str | None) -> None:
    """Train models from their datasets and write artifacts with SHA-256 manifests."""
    from pipeline.training import train_models

    names = [n.strip() for n in only.split(",")] if only else None
    for manifest in train_models(get_settings().resolved_models_dir, names):
        console.print(f"{manifest.name} {manifest.version} {json.dumps(manifest.metrics)}")


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


def _read_jsonl(path: Path) -> list[Any]:
    items = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise click.ClickException(f"{path}:{number}: not JSON: {error}") from None
    return items


@main.command()
@click.argument("pipeline_name", metavar="PIPELINE")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", "wait_", is_flag=True, help="Wait for the batch to finish, with a progress bar.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option("--idempotency-key", help="Submitting the same key again returns the same batch.")
@click.option(
    "--failure-policy", type=click.Choice(["best_effort", "fail_fast"]), default="best_effort", show_default=True
)
@click.option("--max-failed-fraction", type=float, help="Abort a best-effort batch past this share of failures.")
@click.option("--deadline", type=float, help="Finish the batch with what it has after this many seconds.")
def submit(
    pipeline_name: str,
    file: Path,
    wait_: bool,
    timeout: float | None,
    idempotency_key: str | None,
    failure_policy: str,
    max_failed_fraction: float | None,
    deadline: float | None,
) -> None:
    """Submit FILE.jsonl (one input per line) to PIPELINE; print the batch id."""
    client = Client()
    batch = client.submit(
        pipeline_name,
        _read_jsonl(file),
        idempotency_key=idempotency_key,
        failure_policy=failure_policy,
        max_failed_fraction=max_failed_fraction,
        deadline_s=deadline,
    )
    click.echo(batch.id)
    if wait_:
        status = batch.wait(timeout=timeout, progress=True)
        _print_status(status)
        if status.state.value != "succeeded":
            sys.exit(2)


def _print_status(status: Any) -> None:
    from pipeline.report import print_status

    print_status(console, status)


@main.command()
@click.argument("batch_id", required=False)
@click.option("--state", help="Only batches in this state.")
@click.option("--limit", default=20, show_default=True)
def status(batch_id: str | None, state: str | None, limit: int) -> None:
    """Show one batch (with its latency and KPIs when finished), or the newest batches."""
    client = Client()
    if batch_id:
        _print_status(client.batch(batch_id).status())
        return
    table = Table("id", "pipeline", "state", "items", "progress", "succeeded", "failed", "created_at", "elapsed_s")
    for row in client.batches(state=state, limit=limit):
        table.add_row(
            str(row.id),
            row.pipeline,
            row.state.value,
            str(row.items),
            f"{row.progress:.0%}",
            str(row.succeeded),
            str(row.failed),
            f"{row.created_at:%Y-%m-%d %H:%M:%S}",
            f"{row.elapsed_s:.2f}" if row.elapsed_s is not None else "-",
        )
    console.print(table)


@main.command()
@click.argument("batch_id")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a self-contained HTML report with plots here.",
)
def report(batch_id: str, html_path: Path | None) -> None:
    """Print a finished batch's KPIs, latency and drift; optionally write them as HTML."""
    from pipeline.report import latency_histograms, print_report, write_html

    client = Client()
    status = client.batch(batch_id).status()
    if not status.metrics:
        raise click.ClickException(f"batch {status.id} is {status.state.value}: its metrics come when it finishes")
    print_report(console, status)
    if html_path is not None:
        write_html(html_path, status, latency_histograms(client.engine, status.id))
        console.print(f"report written to {html_path}")


@main.command()
@click.argument("batch_id")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write JSON lines here (default stdout).")
def results(batch_id: str, out: Path | None) -> None:
    """Write a batch's per-input results as JSON lines, in input order."""
    batch = Client().batch(batch_id)
    stream = out.open("w") if out else sys.stdout
    try:
        for result in batch.results():
            stream.write(result.model_dump_json() + "\n")
    finally:
        if out:
            stream.close()


@main.command()
@click.argument("batch_id")
def cancel(batch_id: str) -> None:
    """Cancel a pending or running batch."""
    status = Client().batch(batch_id).cancel()
    click.echo(f"{status.id} {status.state.value}")


@main.command()
def up() -> None:
    """Start services (embedded when no URL is set), workers, aggregator and Flower; Ctrl-C stops them."""
    from pipeline.stack import Stack

    settings = get_settings()
    with Stack(settings, flower=True) as stack:
        console.print(f"database: {stack.urls.database_url}\nbroker:   {stack.urls.broker_url}")
        console.print(
            f"Flower:   http://127.0.0.1:{settings.flower_port} (user {settings.flower_user},"
            f" password {stack.flower_password})"
        )
        console.print("running; Ctrl-C stops everything")
        try:
            stack.wait()
        except KeyboardInterrupt:
            console.print("stopping")


@main.command()
@click.option("--strips", default=500, show_default=True, help="Digit strips to read.")
@click.option("--records", type=int, help="Patient records to screen (default: the held-out split, once each).")
def demo(strips: int, records: int | None) -> None:
    """Run the digits and screening pipelines end to end on the embedded default (or your URLs), then stop."""
    from pipeline.demo import run_demo

    run_demo(get_settings(), strips, records, console)


@main.command()
def down() -> None:
    """Stop the embedded PostgreSQL and Redis under PIPELINE_DATA_DIR."""
    from pipeline.embedded import stop_services

    stop_services(get_settings().data_dir)
    console.print("embedded services stopped")
