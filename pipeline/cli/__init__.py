"""The `pipeline` command: a thin layer over the library.

Reading commands print rich tables, or JSON with `--json`. An error a user can make
(unknown batch or pipeline, services unreachable or not migrated, a bad input
file, a bad option) prints one line on stderr and exits 1, without a traceback.

Each command imports what it needs when it runs: loading this module costs click
alone, so `pipeline --help` answers at once and `pipeline status` loads neither
Celery, nor Alembic, nor the models' libraries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from pipeline.states import BatchState

if TYPE_CHECKING:
    from pipeline.client import BatchStatus, Client
    from pipeline.errors import InvalidInputError
    from pipeline.inputs import JsonLinesFile
    from pipeline.settings import Settings
    from pipeline.stack import Stack


from pipeline.cli.base import (
    JSON_OPTION,
    PROGRESS_STEP,
    SHOWN_PROBLEMS,
    _actor,
    _client,
    _console,
    _writing,
    main,
)
from pipeline.cli.models import models, rollout

# `pipeline models` and `pipeline rollout` are defined in pipeline/cli/models.py.
main.add_command(models)
main.add_command(rollout)


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


def _input_problems(lines: JsonLinesFile, error: InvalidInputError) -> str:
    """`FILE:LINE: reason` for each bad input the error names."""
    path = lines.path
    shown = [
        f"{path}:{lines.line_of(index)}: {reason}" if index < lines.count else f"{path}: {reason}"
        for index, reason in error.problems[:SHOWN_PROBLEMS]
    ]
    if len(error.problems) > SHOWN_PROBLEMS:
        shown.append(f"... and {len(error.problems) - SHOWN_PROBLEMS} more invalid inputs")
    return "\n".join(shown)


@contextmanager
def _reading_progress(lines: JsonLinesFile) -> Iterator[Iterator[Any]]:
    """The file's inputs, with a bar on stderr (when it is a terminal) of how much of the file
    is read and validated, gone once the batch is stored."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn(f"reading {lines.path}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[inputs]} inputs"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task("read", total=lines.size, inputs=0)

    def items() -> Iterator[Any]:
        for item in lines:
            if lines.count % PROGRESS_STEP == 0:
                progress.update(task, completed=lines.bytes_read, inputs=lines.count)
            yield item

    with progress:
        yield items()


@main.command()
@click.argument("pipeline_name", metavar="PIPELINE")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--wait", "wait_", is_flag=True, help="Wait for the batch to finish, with a progress bar.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option("--idempotency-key", help="Submitting the same key again returns the same batch.")
@click.option(
    "--failure-policy", type=click.Choice(["best_effort", "fail_fast"]), default="best_effort", show_default=True
)
@click.option(
    "--max-failed-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    help="Abort a best-effort batch past this share of failures.",
)
@click.option(
    "--deadline", type=click.FloatRange(0, min_open=True), help="Finish the batch with what it has after this many s."
)
@click.option("--json", "as_json", is_flag=True, help='Print {"id": ...}, or with --wait the final status, as JSON.')
def submit(
    pipeline_name: str,
    file: Path,
    wait_: bool,
    timeout: float | None,
    idempotency_key: str | None,
    failure_policy: str,
    max_failed_fraction: float | None,
    deadline: float | None,
    as_json: bool,
) -> None:
    """Submit FILE.jsonl (one input per line) to PIPELINE; print the batch id.

    The file is read a line and validated a page at a time, with a progress bar on a
    terminal; a bad line is named by FILE:LINE and nothing is stored.

    With --wait, exit 0 when the batch succeeded and 2 when it finished otherwise.
    """
    from pipeline import registry
    from pipeline.errors import InvalidInputError
    from pipeline.inputs import JsonLinesFile
    from pipeline.schema import BatchState
    from pipeline.settings import get_settings

    registry.get_pipeline(pipeline_name)
    with JsonLinesFile(file, get_settings().max_item_bytes) as lines:
        client = _client(publishes=True)
        try:
            with _reading_progress(lines) as items:
                batch = client.submit(
                    pipeline_name,
                    items,
                    idempotency_key=idempotency_key,
                    failure_policy=failure_policy,
                    max_failed_fraction=max_failed_fraction,
                    deadline_s=deadline,
                )
        except InvalidInputError as error:
            raise click.ClickException(_input_problems(lines, error)) from None
    if not as_json:
        click.echo(batch.id)
    elif not wait_:
        click.echo(json.dumps({"id": batch.id}))
    if wait_:
        # With --json, stdout holds only the JSON: no progress bar.
        status = batch.wait(timeout=timeout, progress=not as_json)
        if as_json:
            click.echo(status.model_dump_json())
        else:
            _print_status(status)
        if status.state != BatchState.succeeded:
            sys.exit(2)


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
    client = _client()
    if batch_id:
        handle = client.batch(batch_id)
        one = handle.status()
        if as_json:
            click.echo(one.model_dump_json())
        else:
            _print_status(one)
            for queue in handle.unserved_queues(one):
                _console().print(f"[yellow]no worker is serving {queue}")
        return
    rows = client.batches(state=state, limit=limit)
    if as_json:
        click.echo(json.dumps([row.model_dump(mode="json", exclude={"result", "metrics"}) for row in rows]))
        return
    from pipeline.report import batches_table

    _console().print(batches_table(rows))
    _print_open_alerts(client, None)


def _open_alerts(client: Client, pipeline: str | None) -> list[dict[str, Any]]:
    from pipeline import ledger

    with client.engine.connect() as conn:
        return [{**row._asdict(), "opened_at": row.opened_at.isoformat()} for row in ledger.open_alerts(conn, pipeline)]


def _print_open_alerts(client: Client, pipeline: str | None) -> None:
    """One line per open alert (none: nothing printed)."""
    for alert in _open_alerts(client, pipeline):
        _console().print(
            f"[red]alert[/red] {alert['kind']} {alert['pipeline']} {alert['model']}@{alert['model_version'][:12]}"
            f" window {alert['window']} since {alert['opened_at'][:19]}: {json.dumps(alert['evidence'])}",
            markup=True,
            highlight=False,
        )


@main.command()
@click.argument("pipeline_name", metavar="[PIPELINE]", required=False)
@click.option(
    "--window", "window_spec", help="<n>m, <n>h, <n>d or <n>rows  [default: 1h; with --html, the series' span: 24h]"
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML page of the time series of windows of --every over --window.",
)
@click.option("--every", "every_spec", help="With --html: each window's width  [default: 1h].")
@JSON_OPTION
def monitor(
    pipeline_name: str | None, window_spec: str | None, html_path: Path | None, every_spec: str | None, as_json: bool
) -> None:
    """Per model version over a window: pooled drift (PSI, band, significant), KPIs, realised
    KPIs where labelled, p95 latency; then the open alerts.

    With --html FILE, also write the time series: one point per --every window of the last
    --window, each judged as `pipeline monitor --window EVERY` would judge it then.
    """
    from datetime import UTC, datetime

    from pipeline.monitor import judge_series, judge_window
    from pipeline.windows import parse_window

    now = datetime.now(UTC)
    if html_path is not None:
        from pipeline.monitor_report import render_monitor_html, series_windows

        span, every = series_windows(window_spec or "24h", every_spec or "1h")
        assert span.span is not None and every.span is not None
        client = _client()
        with client.engine.connect() as conn:
            series = judge_series(conn, pipeline_name, span.span, every.span, now)
        alerts = _open_alerts(client, pipeline_name)
        page = render_monitor_html(pipeline_name, span.spec, every.spec, now, series, alerts)
        with _writing(html_path):
            html_path.write_text(page, encoding="utf-8")
        _console().print(f"{len(series)} windows of {every.spec} written to {html_path}")
        return
    if every_spec is not None:
        raise click.ClickException("--every goes with --html (the time series' windows)")
    window = parse_window(window_spec or "1h")
    client = _client()
    with client.engine.connect() as conn:
        versions = judge_window(conn, pipeline_name, window, now)
    if as_json:
        alerts = _open_alerts(client, pipeline_name)
        click.echo(json.dumps({"window": window.spec, "at": now.isoformat(), "versions": versions, "alerts": alerts}))
        return
    from pipeline.report import monitor_table

    _console().print(monitor_table(window.spec, versions))
    _print_open_alerts(client, pipeline_name)


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
