"""`pipeline demo`: start everything, read held-out digit strips, show what happened, stop."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipeline.client import BatchStatus, Client
from pipeline.pipelines.digits import held_out_strips
from pipeline.settings import Settings
from pipeline.stack import Stack

SHOWN_RESULTS = 10


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def status_table(status: BatchStatus) -> Table:
    """The batch's `batch_status` row as a two-column table."""
    table = Table(title="batch_status", show_header=False)
    for field in (
        "id",
        "pipeline",
        "state",
        "items",
        "total",
        "succeeded",
        "failed",
        "cancelled",
        "progress",
        "created_at",
        "started_at",
        "finished_at",
        "wait_s",
        "aggregation_s",
        "elapsed_s",
        "error",
    ):
        table.add_row(field, _fmt(getattr(status, field)))
    return table


def kpi_table(status: BatchStatus) -> Table:
    table = Table(title=f"{status.pipeline} KPIs", show_header=False)
    for name, value in ((status.metrics or {}).get("kpis") or {}).items():
        table.add_row(name, _fmt(value))
    return table


def run_demo(settings: Settings, strips: int, console: Console) -> BatchStatus:
    """Run the digits demo on `strips` held-out strips; return the final batch status."""
    with Stack(settings, flower=False, log_dir=settings.data_dir / "logs") as stack:
        console.print(f"services: {stack.urls.database_url.split('?')[0]} and {stack.urls.broker_url}")
        client = Client(stack.resolved_settings)
        try:
            inputs = held_out_strips(strips, max_digits=8)
            batch = client.submit("digits", inputs)
            console.print(f"submitted batch {batch.id}: {len(inputs)} strips of 1..8 handwritten digits")
            status = batch.wait(timeout=600, progress=True)

            table = Table(title=f"first {SHOWN_RESULTS} results")
            for column in ("item", "label", "read", "confidence", "needs_review", "error"):
                table.add_column(column)
            for result in batch.results():
                if result.item >= SHOWN_RESULTS:
                    break
                output = result.output or {}
                table.add_row(
                    str(result.item),
                    inputs[result.item]["label"],
                    output.get("text", "-"),
                    _fmt(output.get("confidence")),
                    _fmt(output.get("needs_review")),
                    _fmt(result.error),
                )
            console.print(table)
            console.print(status_table(status))
            console.print(kpi_table(status))
            tiles = sum(m["rows"] for m in (status.metrics or {}).get("models", {}).values()) // 2
            if status.elapsed_s and status.started_at and status.finished_at:
                run_s = (status.finished_at - status.started_at).total_seconds()
                console.print(
                    f"throughput: {len(inputs)} strips / {tiles} tiles in {run_s:.2f} s from split to result"
                    f" ({tiles / run_s:,.0f} tiles/s); {status.elapsed_s:.2f} s from submit, worker start-up included"
                )
            return status
        finally:
            client.close()
