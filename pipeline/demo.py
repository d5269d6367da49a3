"""`pipeline demo`: start everything, read held-out digit strips and screen held-out
patient records, show what happened, stop. With `--rollout`, then also try a retrained
screening forest in a shadow roll-out and show the gate's verdict."""

from __future__ import annotations

import time
import uuid

from rich.console import Console
from rich.table import Table

from pipeline import ledger
from pipeline.batch_handle import BatchHandle
from pipeline.client import Client
from pipeline.pipelines.digits import held_out_strips
from pipeline.pipelines.screening import FOREST, held_out_records, refit_forest
from pipeline.redaction import redact
from pipeline.report import drift_summary, fmt, kpi_table, latency_table, status_table
from pipeline.settings import Settings
from pipeline.stack import Stack
from pipeline.status import BatchStatus

SHOWN_RESULTS = 10
# The shadow roll-out: batches of this many held-out records, at most so many of them.
ROLLOUT_BATCH = 1_000
ROLLOUT_BATCHES = 3
# How long to wait for a batch's shadow sub-tasks (taken after all regular work) to finish.
VERDICT_WAIT_S = 120
# The forest's chunk size for the roll-out's batches: 20 sub-tasks per batch, so the gate's
# latency check has its 10 timings per version from the first batch.
ROLLOUT_FOREST_CHUNK = 50


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


def _shadow_rollout(client: Client, settings: Settings, console: Console) -> str:
    """Retrain the screening forest with another seed, register it as challenger, run it in
    shadow on batches of held-out records until the gate decides (or `ROLLOUT_BATCHES`
    batches), print the verdict and its reasons, end the roll-out; return the verdict."""
    import skops.io

    from pipeline import model_registry
    from pipeline.gate import INSUFFICIENT
    from pipeline.ledger import rollouts as rollout_rows
    from pipeline.states import Alias, RolloutState

    engine = client.engine
    champion = model_registry.champion(engine, FOREST)
    forest, _ = model_registry.load_version(engine, settings, FOREST, champion)
    challenger = model_registry.register(
        engine,
        settings,
        FOREST,
        skops.io.dumps(refit_forest(forest, seed=1)),
        created_by="demo",
        as_alias=Alias.challenger,
    )
    console.rule(f"shadow roll-out: {FOREST} {challenger[:12]} (retrained, seed 1) beside champion {champion[:12]}")
    client.rollouts.start(FOREST, version=challenger, mode="shadow", started_by="demo")
    # The client splits a batch this small itself, with its own chunk sizes.
    chunk_sizes = {**settings.chunk_sizes, FOREST: ROLLOUT_FOREST_CHUNK}
    submitter = Client(settings.model_copy(update={"chunk_sizes": chunk_sizes}))
    try:
        status = client.rollouts.status(FOREST)
        for seed in range(ROLLOUT_BATCHES):
            batch = submitter.submit("screening", held_out_records(ROLLOUT_BATCH, seed=seed))
            batch.wait(timeout=600, progress=True)
            # The shadow sub-tasks run after regular work: the gate sees them a little later.
            deadline = time.monotonic() + VERDICT_WAIT_S
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    if not rollout_rows.unfinished_shadow_subtasks(conn, uuid.UUID(batch.id)):
                        break
                time.sleep(0.5)
            status = client.rollouts.status(FOREST)
            console.print(f"after batch {seed + 1} of {ROLLOUT_BATCH} records: gate {status.verdict}")
            if status.verdict != INSUFFICIENT:
                break
        for reason in status.gate.reasons if status.gate is not None else []:
            console.print(f"  {reason}")
        console.print(
            f"to make it serve: pipeline rollout promote {FOREST} --approved-by NAME (needs `pipeline up`);"
            " the demo ends the roll-out, the champion is unchanged"
        )
        return status.verdict
    finally:
        submitter.close()
        # The gate may have aborted it already (a guardrail hit, too many failures).
        if client.rollouts.status(FOREST).state == RolloutState.active:
            client.rollouts.abort(FOREST, actor="demo", reason="the demo ended")


def run_demo(
    settings: Settings, strips: int, records: int | None, console: Console, rollout: bool = False
) -> list[BatchStatus]:
    """Run a digits batch of `strips` held-out strips and a screening batch of held-out
    records (`records` drawn with replacement, or each once), side by side, then with
    `rollout` a shadow roll-out of a retrained screening forest; return the two batches'
    final statuses."""
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
            if rollout:
                _shadow_rollout(client, stack.resolved_settings, console)
            return [digits_status, screening_status]
        finally:
            client.close()
