"""`pipeline status`, `report`, `results`, `labels`, `cancel`: one batch, or the newest."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click

from pipeline.cli.base import (
    JSON_OPTION,
    PROGRESS_STEP,
    _client,
    _console,
    _ledger_connection,
    _writing,
    main,
)
from pipeline.cli.monitoring import _alert_dicts, _print_open_alerts
from pipeline.states import BatchState

if TYPE_CHECKING:
    from pipeline.status import BatchStatus


def _print_status(status: BatchStatus) -> None:
    from pipeline.report import print_status

    print_status(_console(), status)


@main.command()
@click.argument("batch_id", required=False)
@click.option("--state", type=click.Choice([state.value for state in BatchState]), help="Only batches in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest batches shown.")
@JSON_OPTION
def status(batch_id: str | None, state: str | None, limit: int, as_json: bool) -> None:
    """Show one batch (with its latency and KPIs when finished), or the newest batches.

    --json prints one batch's status with its result and metrics, or a list of the
    newest batches' `batch_status` rows.
    """
    if batch_id:
        client = _client()
        handle = client.batch(batch_id)
        one = handle.status()
        if as_json:
            click.echo(one.model_dump_json())
        else:
            _print_status(one)
            for queue in handle.unserved_queues(one):
                _console().print(f"[yellow]no worker is serving {queue}")
        return
    # The list reads the ledger alone: on a psycopg connection, without the client (SQLAlchemy,
    # pydantic-settings), so it answers in a fraction of the time.
    from pipeline.ledger import listing
    from pipeline.status import newest_batches

    with _ledger_connection() as conn:
        rows = newest_batches(conn, state, limit)
        if as_json:
            click.echo(json.dumps([row.model_dump(mode="json", exclude={"result", "metrics"}) for row in rows]))
            return
        alerts = _alert_dicts(listing.open_alerts(conn, None))
    from pipeline.report import batches_table

    _console().print(batches_table(rows))
    _print_open_alerts(alerts)


@main.command()
@click.argument("batch_id")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a self-contained HTML report with plots here.",
)
@JSON_OPTION
def report(batch_id: str, html_path: Path | None, as_json: bool) -> None:
    """Print a finished batch's KPIs, latency and drift; optionally write them as HTML.

    --json prints the batch's status with its metrics.
    """
    from pipeline.html_report import latency_histograms, write_html
    from pipeline.report import print_report, print_status

    client = _client()
    status = client.batch(batch_id).status()
    if not status.metrics:
        if not status.finished:
            raise click.ClickException(f"batch {status.id} is {status.state.value}: its metrics come when it finishes")
        # Finished before any input was scored (e.g. its split failed): the status is all there is.
        if as_json:
            click.echo(status.model_dump_json())
        else:
            print_status(_console(), status)
        raise click.ClickException(
            f"batch {status.id} {status.state.value} before any input was scored: it has no KPIs, latency or drift"
        )
    if html_path is not None:
        histograms = latency_histograms(client.engine, status.id)
        with _writing(html_path):
            write_html(html_path, status, histograms)
    if as_json:
        click.echo(status.model_dump_json())
        return
    print_report(_console(), status)
    if html_path is not None:
        _console().print(f"report written to {html_path}")


def _open_for_writing(path: Path) -> TextIO:
    with _writing(path):
        return path.open("w", encoding="utf-8")


# The fields of `results --out`'s lines: FILE.jsonl's, FILE.errors.jsonl's.
SUCCEEDED_FIELDS = {"item", "output", "model_versions"}
FAILED_FIELDS = {"item", "error", "model_versions"}


def errors_path(out: Path) -> Path:
    """Where `results --out FILE.jsonl` writes the failed inputs: FILE.errors.jsonl."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")


@main.command()
@click.argument("batch_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results here and the failed inputs to FILE.errors.jsonl, with a progress bar.",
)
def results(batch_id: str, out: Path | None) -> None:
    """Stream a finished batch's per-input results as JSON lines, in input order.

    To stdout, one `{"item", "output", "error", "model_versions"}` line per input. With
    --out FILE.jsonl, `{"item", "output", "model_versions"}` for each input with a result
    goes to FILE.jsonl and `{"item", "error", "model_versions"}` for each input without one
    to FILE.errors.jsonl (both written, possibly empty), then the counts are printed.
    `model_versions`: per model, the version that scored the input's rows.
    """
    batch = _client().batch(batch_id)
    status = batch.status()
    if not status.finished:
        raise click.ClickException(f"batch {batch.id} is {status.state.value}: its results come when it finishes")
    if out is None:
        # A reader that stops early (`| head`) ends the command quietly: click handles EPIPE.
        for result in batch.results():
            sys.stdout.write(result.model_dump_json() + "\n")
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    failed_out = errors_path(out)
    written = failed = 0
    progress = Progress(
        TextColumn("results"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_console()
    )
    with _open_for_writing(out) as succeeded_file, _open_for_writing(failed_out) as failed_file, progress:
        task = progress.add_task("results", total=status.items)
        for result in batch.results():
            if result.error is None:
                succeeded_file.write(result.model_dump_json(include=SUCCEEDED_FIELDS) + "\n")
            else:
                failed_file.write(result.model_dump_json(include=FAILED_FIELDS) + "\n")
                failed += 1
            written += 1
            if written % PROGRESS_STEP == 0:
                progress.update(task, completed=written)
        progress.update(task, completed=written)
    _console().print(f"{written - failed} results written to {out}, {failed} failed inputs to {failed_out}")


@main.command()
@click.argument("batch_id")
@click.argument("file", type=click.Path(path_type=Path))
@JSON_OPTION
def labels(batch_id: str, file: Path, as_json: bool) -> None:
    """Store ground truth for a finished batch: FILE.jsonl holds one {"item": INDEX, "label": LABEL}
    per line. All or nothing; the batch's realised KPIs are recomputed (no model runs), and the
    gate of each active roll-out the batch follows."""
    import uuid

    from pipeline import ledger
    from pipeline.inputs import JsonLinesFile
    from pipeline.labels import labels_from_lines
    from pipeline.rollouts import evaluate_batch

    client = _client()
    handle = client.batch(batch_id)
    with JsonLinesFile(file, client.settings.max_item_bytes) as lines:
        parsed = list(lines)
        numbered = [(lines.line_of(index), line) for index, line in enumerate(parsed)]
    stored = ledger.store_labels(client.engine, uuid.UUID(handle.id), labels_from_lines(handle.id, numbered))
    evaluate_batch(client.engine, uuid.UUID(handle.id), "after labels for batch")
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(stored)))
        return
    realised = stored.realised
    kpis = ", ".join(f"{name} {'-' if value is None else f'{value:.4g}'}" for name, value in realised["kpis"].items())
    click.echo(
        f"{stored.added} labels added, {stored.changed} changed, {stored.unchanged} unchanged;"
        f" {realised['labelled_items']} inputs labelled ({realised['labelled_share']:.1%}): {kpis}"
    )


@main.command()
@click.argument("batch_id")
def cancel(batch_id: str) -> None:
    """Cancel a pending or running batch."""
    status = _client(publishes=True).batch(batch_id).cancel()
    click.echo(f"{status.id} {status.state.value}")
