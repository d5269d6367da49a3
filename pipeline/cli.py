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
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from pipeline.states import BatchState, RolloutMode

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.client import BatchStatus, Client
    from pipeline.errors import InvalidInputError
    from pipeline.inputs import JsonLinesFile
    from pipeline.rollouts import RolloutStatus
    from pipeline.settings import Settings
    from pipeline.stack import Stack

# The errors a user can cause, each shown as one line (prefix + its first line): module,
# class, prefix. They are looked up in sys.modules when an error reaches the CLI: the
# commands import lazily, and an error of a module never imported cannot have been raised.
# `PipelineError` is the root of every error the library raises on purpose.
USER_ERRORS = (
    ("pipeline.errors", "PipelineError", ""),
    ("builtins", "TimeoutError", ""),
    ("sqlalchemy.exc", "OperationalError", "database error: "),
    ("psycopg", "OperationalError", "database error: "),
    ("kombu.exceptions", "OperationalError", "broker error: "),
)
# Bad inputs `submit` lists line by line; the rest are counted.
SHOWN_PROBLEMS = 20
# Rows of `results --out` (inputs of `submit`) between two progress bar updates.
PROGRESS_STEP = 1000
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")


@cache
def _console() -> Console:
    from rich.console import Console

    return Console()


def _loaded(module: str, name: str) -> type[BaseException] | None:
    """The exception class `module.name` when that module has been imported, else None."""
    kind: type[BaseException] | None = getattr(sys.modules.get(module), name, None)
    return kind


def _user_error_line(error: Exception) -> str | None:
    """The one line shown for an error a user can cause; None for any other error (a bug,
    which keeps its traceback)."""
    from pipeline.redaction import error_line, redact

    if "pydantic" in sys.modules:  # a ValidationError can only come from a loaded pydantic
        from pydantic import ValidationError

        from pipeline.errors import validation_line

        if isinstance(error, ValidationError):
            return redact(validation_line(error))
    for module, name, prefix in USER_ERRORS:
        kind = _loaded(module, name)
        if kind is not None and isinstance(error, kind):
            return prefix + error_line(error)
    return None


def _usage_line(error: click.UsageError) -> str:
    """A bad command line as one line, with where to read the command's usage."""
    if error.ctx is None:
        return error.format_message()
    return f"{error.format_message().rstrip('.')} (see `{error.ctx.command_path} --help`)"


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Re-raise a bad command line and an error a user can cause as a one-line ClickException
    (exit code 1); anything else, a bug, keeps its traceback."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a bare `pipeline` or `pipeline models`: click shows the help
    except click.UsageError as error:
        raise click.ClickException(_usage_line(error)) from None
    except click.ClickException:
        raise
    except Exception as error:
        line = _user_error_line(error)
        if line is None:
            raise
        raise click.ClickException(line) from None


class _Group(click.Group):
    """Shows bad command lines and the library's expected errors as one line, exit code 1.

    Exit code 2 is not used for a bad command line (click's default), because
    `submit --wait` exits 2 for a batch that finished otherwise than succeeded.
    """

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


def _client(publishes: bool = False) -> Client:
    """A client on a reachable, migrated ledger (and a reachable broker when the command publishes)."""
    from pipeline import health
    from pipeline.client import Client

    client = Client()
    health.check_ledger(client.engine)
    if publishes:
        health.check_broker(client.app)
    return client


@click.group(cls=_Group)
def main() -> None:
    """Async fan-out / aggregate inference pipeline."""


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


@main.group()
def models() -> None:
    """Model artifacts."""


def _model_rows() -> list[dict[str, Any]]:
    """One row per registered model: its queue and chunk size, and its trained artifact (None when untrained)."""
    from pipeline import registry
    from pipeline.artifacts import read_manifest
    from pipeline.errors import ArtifactError
    from pipeline.settings import get_settings

    models_dir = get_settings().resolved_models_dir
    rows = []
    for pipeline in registry.all_pipelines():
        for spec in pipeline.models:
            try:
                manifest = read_manifest(models_dir, spec.name)
            except ArtifactError:
                manifest = None
            rows.append(
                {
                    "pipeline": pipeline.name,
                    "model": spec.name,
                    "queue": f"model.{spec.name}",
                    "chunk_size": spec.chunk_size,
                    "version": None if manifest is None else manifest.version,
                    "trained_at": None if manifest is None else manifest.trained_at,
                    "metrics": None if manifest is None else manifest.metrics,
                }
            )
    return rows


@models.command("list")
@JSON_OPTION
def models_list(as_json: bool) -> None:
    """List registered models and their trained artifacts."""
    from rich.table import Table

    rows = _model_rows()
    if as_json:
        click.echo(json.dumps(rows, default=lambda value: value.isoformat()))
        return
    table = Table("pipeline", "model", "queue", "chunk", "version", "trained", "metrics")
    for row in rows:
        trained = (
            ("not trained", "")
            if row["trained_at"] is None
            else (f"{row['trained_at']:%Y-%m-%d %H:%M}", json.dumps(row["metrics"]))
        )
        table.add_row(
            row["pipeline"], row["model"], row["queue"], str(row["chunk_size"]), row["version"] or "-", *trained
        )
    _console().print(table)


def _actor() -> str:
    """Who runs this command, as the registry records it: user@host."""
    import getpass
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()}"


AS_CHALLENGER = click.option(
    "--as",
    "as_alias",
    type=click.Choice(["challenger"]),
    help="Also point the model's challenger alias at the new version (a first version becomes champion).",
)


def _print_registered(model: str, version: str, champion: str | None, metrics: dict[str, Any]) -> None:
    role = " (champion)" if version == champion else ""
    _console().print(f"{model} {version[:12]}{role} {json.dumps(metrics)}")


@models.command("train")
@click.option("--only", help="Comma-separated model names (default: all).")
@AS_CHALLENGER
def models_train(only: str | None, as_alias: str | None) -> None:
    """Train models, write their artifacts to PIPELINE_MODELS_DIR and register each as a
    version (a model's first version becomes its champion)."""
    from pipeline import model_registry
    from pipeline.states import Alias

    client = _client()
    names = [n.strip() for n in only.split(",")] if only else None
    alias = None if as_alias is None else Alias(as_alias)
    trained = model_registry.train(client.engine, client.settings, names, created_by=_actor(), as_alias=alias)
    for manifest, version in trained:
        champion = model_registry.champion(client.engine, manifest.name)
        _print_registered(manifest.name, version, champion, manifest.metrics)


@models.command("register")
@click.argument("model")
@click.argument("file", type=click.Path(path_type=Path))
@AS_CHALLENGER
def models_register(model: str, file: Path, as_alias: str | None) -> None:
    """Check FILE.skops (trusted types only, predicts on the reference rows, output
    guardrails) and register it as a version of MODEL."""
    from pipeline import model_registry
    from pipeline.states import Alias

    try:
        data = file.read_bytes()
    except OSError as error:
        raise click.ClickException(f"cannot read {file}: {error.strerror}") from None
    client = _client()
    alias = None if as_alias is None else Alias(as_alias)
    version = model_registry.register(client.engine, client.settings, model, data, created_by=_actor(), as_alias=alias)
    _print_registered(model, version, model_registry.champion(client.engine, model), {})


@models.command("versions")
@click.argument("model")
@JSON_OPTION
def models_versions(model: str, as_json: bool) -> None:
    """List MODEL's versions, oldest first, with their aliases and metrics."""
    from dataclasses import asdict

    from rich.table import Table

    from pipeline import model_registry

    records = model_registry.versions(_client().engine, model)
    if as_json:
        rows = [{k: v for k, v in asdict(record).items() if k != "manifest"} for record in records]
        click.echo(json.dumps(rows, default=lambda value: value.isoformat()))
        return
    table = Table("version", "aliases", "source", "created", "by", "size", "stored", "metrics")
    for record in records:
        table.add_row(
            record.version[:12],
            ", ".join(record.aliases),
            record.source,
            f"{record.created_at:%Y-%m-%d %H:%M}",
            record.created_by,
            f"{record.size_bytes / 1e6:.1f} MB",
            "database" if record.stored_inline else "store",
            json.dumps(record.metrics),
        )
    _console().print(table)


@models.command("rollback")
@click.argument("model")
@click.option("--to", "to", help="The version to serve (default: the previous champion); a unique prefix will do.")
@click.option("--approved-by", required=True, help="Who approved the change (recorded).")
@click.option("--reason", help="Why (recorded).")
def models_rollback(model: str, to: str | None, approved_by: str, reason: str | None) -> None:
    """Make the previous (or named) version MODEL's champion for new batches, at once."""
    from pipeline import model_registry

    version = model_registry.rollback(_client().engine, model, approved_by=approved_by, to=to, reason=reason)
    _console().print(f"{model}: champion is now {version[:12]}")


@main.group()
def rollout() -> None:
    """Try a challenger model version on live batches: shadow or canary, gate, promote."""


def _print_rollout(status: RolloutStatus) -> None:
    percent = f" {status.percent:g} %" if status.percent is not None else ""
    _console().print(
        f"{status.model}: {status.mode.value}{percent} roll-out {status.id} of {status.version[:12]} is"
        f" {status.state.value} (started by {status.started_by}, {status.batches} batches);"
        f" gate: {status.verdict}" + (f"; {status.reason}" if status.reason else "")
    )
    if status.gate_error is not None:
        error = status.gate_error
        _console().print(
            f"  the gate could not be recomputed {error.after} ({error.at:%Y-%m-%d %H:%M:%S}): {error.error}",
            markup=False,
        )
    if status.gate is not None:
        for check in status.gate.checks:
            _console().print(f"  {check.name}: {check.verdict} ({check.why})", markup=False)


@rollout.command("start")
@click.argument("model")
@click.option("--version", "version", required=True, help="The version to try (a unique prefix will do).")
@click.option("--mode", type=click.Choice([m.value for m in RolloutMode]), required=True)
@click.option("--percent", type=float, help="A canary's share of inputs served by the version (0 < P < 100).")
def rollout_start(model: str, version: str, mode: str, percent: float | None) -> None:
    """Start a roll-out of VERSION of MODEL: new batches follow it from their split on."""
    from pipeline import rollouts

    _print_rollout(
        rollouts.start(
            _client().engine, model, version=version, mode=RolloutMode(mode), percent=percent, started_by=_actor()
        )
    )


@rollout.command("status")
@click.argument("model")
@JSON_OPTION
def rollout_status(model: str, as_json: bool) -> None:
    """MODEL's active roll-out (else its last one), with its gate recomputed."""
    from pipeline import rollouts

    status = rollouts.status(_client().engine, model)
    if as_json:
        click.echo(status.model_dump_json())
        return
    _print_rollout(status)


@rollout.command("promote")
@click.argument("model")
@click.option("--approved-by", required=True, help="Who approved the promotion (recorded).")
@click.option("--reason", help="Why (recorded); required with --force.")
@click.option("--force", is_flag=True, help="Promote without a passing gate (recorded as forced).")
def rollout_promote(model: str, approved_by: str, reason: str | None, force: bool) -> None:
    """Make the roll-out's version MODEL's champion: refused unless the gate is `pass`."""
    from pipeline import rollouts

    _print_rollout(rollouts.promote(_client().engine, model, approved_by=approved_by, reason=reason, force=force))


@rollout.command("abort")
@click.argument("model")
@click.option("--reason", help="Why (recorded).")
def rollout_abort(model: str, reason: str | None) -> None:
    """End MODEL's roll-out; the champion is unchanged."""
    from pipeline import rollouts

    _print_rollout(rollouts.abort(_client().engine, model, actor=_actor(), reason=reason))


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
@click.option("--window", "window_spec", default="1h", show_default=True, help="<n>m, <n>h, <n>d or <n>rows.")
@JSON_OPTION
def monitor(pipeline_name: str | None, window_spec: str, as_json: bool) -> None:
    """Per model version over a window: pooled drift (PSI, band, significant), KPIs, realised
    KPIs where labelled, p95 latency; then the open alerts."""
    from datetime import UTC, datetime

    from pipeline.monitor import judge_window
    from pipeline.windows import parse_window

    window = parse_window(window_spec)
    client = _client()
    now = datetime.now(UTC)
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
        try:
            write_html(html_path, status, histograms)
        except OSError as error:
            raise click.ClickException(f"cannot write {html_path}: {error.strerror}") from None
    if as_json:
        click.echo(status.model_dump_json())
        return
    print_report(_console(), status)
    if html_path is not None:
        _console().print(f"report written to {html_path}")


def _open_for_writing(path: Path) -> TextIO:
    try:
        return path.open("w", encoding="utf-8")
    except OSError as error:
        raise click.ClickException(f"cannot write {path}: {error.strerror}") from None


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

    To stdout, one `{"item", "output", "error"}` line per input. With --out FILE.jsonl,
    `{"item", "output"}` for each input with a result goes to FILE.jsonl and
    `{"item", "error"}` for each input without one to FILE.errors.jsonl (both written,
    possibly empty), then the counts are printed.
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
                succeeded_file.write(json.dumps({"item": result.item, "output": result.output}) + "\n")
            else:
                failed_file.write(json.dumps({"item": result.item, "error": result.error}) + "\n")
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
    per line. All or nothing; the batch's realised KPIs are recomputed (no model runs)."""
    import uuid

    from pipeline import ledger
    from pipeline.inputs import JsonLinesFile
    from pipeline.labels import labels_from_lines

    client = _client()
    handle = client.batch(batch_id)
    with JsonLinesFile(file, client.settings.max_item_bytes) as lines:
        parsed = list(lines)
        numbered = [(lines.line_of(index), line) for index, line in enumerate(parsed)]
    stored = ledger.store_labels(client.engine, uuid.UUID(handle.id), labels_from_lines(handle.id, numbered))
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
