"""`pipeline submit`: a JSONL file read, validated and stored a page at a time."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.cli.base import (
    PROGRESS_STEP,
    SHOWN_PROBLEMS,
    _client,
    main,
)
from pipeline.cli.batches import _print_status

if TYPE_CHECKING:
    from pipeline.errors import InvalidInputError
    from pipeline.inputs import JsonLinesFile


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
