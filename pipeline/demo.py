"""`pipeline demo`: start everything, read held-out digit strips and screen held-out
patient records, show what happened, stop."""

from __future__ import annotations

import uuid

from rich.console import Console
from rich.table import Table

from pipeline import ledger
from pipeline.client import BatchHandle, BatchStatus, Client
from pipeline.pipelines.digits import held_out_strips
from pipeline.pipelines.screening import held_out_records
from pipeline.redaction import redact
from pipeline.report import drift_summary, fmt, kpi_table, latency_table, status_table
from pipeline.settings import Settings
from pipeline.stack import Stack

SHOWN_RESULTS = 10


def _digits_results(batch: BatchHandle, inputs: list[dict[str, object]]) -> Table:
    table = Table(title=f"digits: first {SHOWN_RESULTS} results")
    for column in ("item", "label", "read", "confidence", "needs_review", "error"):
        table.add_column(column)
    for result in batch.results():
        if result.item >= SHOWN_RESULTS:
            break
        output = result.output or {}
        table.add_row(
            str(result.item),
            str(inputs[result.item]["label"]),
            output.get("text", "-"),
            fmt(output.get("confidence")),
            fmt(output.get("needs_review")),
            fmt(result.error),
        )
    return table


# Screening's labels, as in load_breast_cancer.
LABEL_NAMES: dict[object, str] = {0: "malignant", 1: "benign"}


def _screening_results(batch: BatchHandle, inputs: list[dict[str, object]]) -> Table:
    table = Table(title=f"screening: first {SHOWN_RESULTS} results")
    for column in ("item", "label", "decision", "malignant p", "votes", "needs_review", "error"):
        table.add_column(column)
    for result in batch.results():
        if result.item >= SHOWN_RESULTS:
            break
        output = result.output or {}
        votes = " ".join(f"{p:.2f}" for p in (output.get("votes") or {}).values())
        label = LABEL_NAMES.get(inputs[result.item]["label"], "-")
        table.add_row(
            str(result.item),
            label,
            output.get("decision", "-"),
            fmt(output.get("malignant_probability")),
            votes,
            fmt(output.get("needs_review")),
            fmt(result.error),
        )
    return table


def _summary(console: Console, status: BatchStatus) -> None:
    console.print(status_table(status))
    console.print(latency_table(status))
    console.print(f"{status.pipeline} drift: {drift_summary(status)}")


def run_demo(settings: Settings, strips: int, records: int | None, console: Console) -> list[BatchStatus]:
    """Run a digits batch of `strips` held-out strips and a screening batch of held-out
    records (`records` drawn with replacement, or each once), side by side; return
    their final statuses."""
    with Stack(settings, flower=False, log_dir=settings.data_dir / "logs") as stack:
        urls = stack.service_urls
        console.print(f"services: {redact(urls.database_url.split('?')[0])} and {redact(urls.broker_url)}")
        client = Client(stack.resolved_settings)
        try:
            digit_inputs = held_out_strips(strips, max_digits=8)
            record_inputs = held_out_records(records)
            digits = client.submit("digits", digit_inputs)
            console.print(f"submitted batch {digits.id}: {len(digit_inputs)} strips of 1..8 handwritten digits")
            screening = client.submit("screening", record_inputs)
            console.print(f"submitted batch {screening.id}: {len(record_inputs)} held-out patient records")
            digits_status = digits.wait(timeout=600, progress=True)
            screening_status = screening.wait(timeout=600, progress=True)

            console.print(_digits_results(digits, digit_inputs))
            _summary(console, digits_status)
            console.print(_screening_results(screening, record_inputs))
            _summary(console, screening_status)

            tiles = sum(m["rows"] for m in (digits_status.metrics or {}).get("models", {}).values()) // 2
            # The client splits a batch this small at once: count from the first sub-task a
            # worker started, so the workers' start-up is not in the rate.
            first_started = ledger.first_subtask_started(client.engine, uuid.UUID(digits.id))
            if first_started and digits_status.finished_at:
                run_s = (digits_status.finished_at - first_started).total_seconds()
                console.print(
                    f"digits throughput: {len(digit_inputs)} strips / {tiles} tiles in {run_s:.2f} s from the first"
                    f" sub-task started to result ({tiles / run_s:,.0f} tiles/s); {digits_status.elapsed_s:.2f} s"
                    " from submit, worker start-up included"
                )
            console.rule("KPI summary")
            for status in (digits_status, screening_status):
                console.print(kpi_table(status))
            return [digits_status, screening_status]
        finally:
            client.close()
