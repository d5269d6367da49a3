"""The benchmark's figures as one table, next to the targets of issue 5."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

# key, what it is, how to show it, target (text), whether the value meets it
Row = tuple[str, str, Callable[[Any], str], str, Callable[[float], bool] | None]


def _s(value: float) -> str:
    return f"{value:.2f} s"


def _rate(value: float) -> str:
    return f"{value:,.0f} rows/s"


def _per_s(value: float) -> str:
    return f"{value:.1f} /s"


def _x(value: float) -> str:
    return f"{value:.2f} ×"


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def _ms_pair(values: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values) + " ms"


def _pct(value: float) -> str:
    return f"{value * 100:.1f} %"


def _mb(value: float) -> str:
    return f"{value:.0f} MB"


def _mbs(values: list[float]) -> str:
    return " / ".join(f"{value:.0f}" for value in values) + " MB"


ROWS: tuple[Row, ...] = (
    ("limit_s", "limit: one process, one predict call per model", _s, "", None),
    ("pipeline_s", "pipeline: submit → all results readable", _s, "", None),
    ("ratio_vs_limit", "pipeline ÷ limit (wall time)", _x, "≤ 1.0 ×", lambda v: v <= 1.0),
    ("limit_rows_per_s", "limit", _rate, "", None),
    ("pipeline_rows_per_s", "pipeline, 2 worker processes", _rate, "", None),
    ("chunked_rows_per_s", "chunked peer: chord, same chunks, no ledger", _rate, "", None),
    ("naive_rows_per_s", "naive peer: chord, one task per input", _rate, "", None),
    ("pipeline_vs_chunked", "pipeline ÷ chunked peer (rows/s)", _x, "≥ 2 ×", lambda v: v >= 2),
    ("pipeline_vs_naive", "pipeline ÷ naive peer (rows/s)", _x, "≥ 20 ×", lambda v: v >= 20),
    ("latency_p50_ms", "one-input batch, submit → result read", _ms, "", None),
    ("latency_p50_vs_floor", "one-input p50 ÷ no-op task p50 (floor)", _x, "≤ 3 ×", lambda v: v <= 3),
    ("latency_p50_vs_lean", "one-input p50 ÷ lean batch p50 (one ledger row)", _x, "", None),
    ("latency_p95_ms", "", _ms, "", None),
    ("latency_p99_ms", "", _ms, "", None),
    ("latency_phase_to_first_claim_ms", "p50 phases: submission → first sub-task claimed", _ms, "", None),
    ("latency_phase_subtasks_ms", "→ last sub-task finished (claims, predicts)", _ms, "", None),
    ("latency_phase_predict_cpu_ms", "   of which the models' predict calls (CPU)", _ms, "", None),
    ("latency_phase_aggregate_ms", "→ batch finished (the aggregate)", _ms, "", None),
    ("latency_phase_client_ms", "client: validation, wake-up, result read", _ms, "", None),
    ("overhead_ms_per_subtask", "(pipeline − limit) ÷ sub-tasks", _ms, "", None),
    ("status_ms", "batch.status() on the finished batch, median", _ms, "≤ 5 ms", lambda v: v <= 5),
    ("rss_client_mb", "peak RSS: client", _mb, "≤ 500 MB at any N", lambda v: v <= 500),
    ("rss_worker_mb", "worker: largest process", _mb, "≤ 500 MB", lambda v: v <= 500),
    ("rss_worker_processes_mb", "worker: main / each pool child", _mbs, "", None),
    ("rss_aggregator_mb", "aggregator: largest process", _mb, "≤ 500 MB", lambda v: v <= 500),
    ("rss_aggregator_processes_mb", "aggregator: main / each pool child", _mbs, "", None),
    ("rss_results_out_mb", "pipeline results --out, all rows", _mb, "constant in N", None),
    ("cpu_s_worker", "CPU during the N-row batch (limit_s: the models' own): worker", _s, "", None),
    ("cpu_s_aggregator", "aggregator: split, following assembly, sweeper", _s, "", None),
    ("cpu_s_client", "client: validation, storing", _s, "", None),
    ("cpu_s_postgres", "PostgreSQL: every backend (the machine's server)", _s, "", None),
    ("cpu_s_redis", "Redis", _s, "", None),
    ("cores_busy_submit", "the machine's cores busy: while the client stores the batch", _pct, "", None),
    ("cores_busy_after_submit", "from then to the batch's end", _pct, "", None),
)
# The latency floor, sampled between the idle one-input batches of throughput and mixed.
FLOOR_ROWS: tuple[Row, ...] = (
    ("floor_p50_ms", "floor: no-op task → ledger write → client woken", _ms, "", None),
    ("floor_p99_ms", "", _ms, "", None),
    ("lean_p50_ms", "lean batch: one row stored, claimed, answered, finished", _ms, "", None),
    ("lean_vs_floor", "lean batch p50 ÷ floor p50", _x, "", None),
    ("one_input_cpu_ms_client", "CPU per batch, one-input / lean: client", _ms_pair, "", None),
    ("one_input_cpu_ms_worker", "the pipeline's worker (main, pool)", _ms_pair, "", None),
    ("one_input_cpu_ms_aggregator", "the aggregator", _ms_pair, "", None),
    ("one_input_cpu_ms_peers", "the peers' worker (the lean task's)", _ms_pair, "", None),
    ("one_input_cpu_ms_postgres", "PostgreSQL: every backend", _ms_pair, "", None),
    ("one_input_cpu_ms_redis", "Redis", _ms_pair, "", None),
)

# `--scenario mixed`: one-input batches on the idle cluster, then while a bulk batch runs.
MIXED_ROWS: tuple[Row, ...] = (
    ("idle_latency_p50_ms", "one-input batch, idle cluster", _ms, "", None),
    ("idle_latency_p50_vs_floor", "idle one-input p50 ÷ floor p50", _x, "≤ 3 ×", lambda v: v <= 3),
    ("idle_latency_p99_ms", "", _ms, "", None),
    ("mixed_latency_p50_ms", "one-input batch while a bulk batch runs", _ms, "", None),
    ("mixed_latency_p99_ms", "", _ms, "", None),
    ("mixed_latency_max_ms", "", _ms, "", None),
    ("mixed_p99_vs_idle_p99", "mixed p99 ÷ idle p99", _x, "≤ 3 ×", lambda v: v <= 3),
    ("mixed_phase_to_first_claim_ms", "phases while bulk runs, p50: → first claim", _ms, "", None),
    ("mixed_phase_subtasks_ms", "→ last sub-task finished", _ms, "", None),
    ("mixed_phase_aggregate_ms", "→ batch finished (the aggregate)", _ms, "", None),
    ("mixed_phase_client_ms", "client: validation, wake-up, result read", _ms, "", None),
    ("mixed_phase_to_first_claim_tail_ms", "the slowest 1 %, mean: → first claim", _ms, "", None),
    ("mixed_phase_subtasks_tail_ms", "→ last sub-task finished", _ms, "", None),
    ("mixed_phase_aggregate_tail_ms", "→ batch finished (the aggregate)", _ms, "", None),
    ("mixed_phase_client_tail_ms", "client: validation, wake-up, result read", _ms, "", None),
    ("mixed_bulk_alone_s", "bulk batch alone", _s, "", None),
    ("mixed_bulk_with_stream_s", "bulk batch with the one-input stream", _s, "", None),
    ("bulk_slowdown", "bulk with stream ÷ alone", _x, "≤ 1.1 ×", lambda v: v <= 1.1),
    ("mixed_stream_per_s", "one-input batches answered per second beside it", _per_s, "", None),
    ("bulk_ms_per_stream_batch", "bulk time added per one-input batch", _ms, "", None),
    ("mixed_cpu_busy_alone", "cores busy: bulk alone", _pct, "", None),
    ("mixed_cpu_busy_with_stream", "cores busy: bulk with the stream", _pct, "", None),
    ("bulk_slowdown_cpu_bound", "CPU used with stream ÷ alone (slowdown if CPU-bound)", _x, "", None),
    ("mixed_paced_rate_per_s", "paced stream: one-input batches arriving per second", _per_s, "", None),
    ("mixed_paced_latency_p50_ms", "one-input batch, paced, while a bulk batch runs", _ms, "", None),
    ("mixed_paced_latency_p99_ms", "", _ms, "", None),
    ("mixed_paced_latency_max_ms", "", _ms, "", None),
    ("mixed_paced_p99_vs_idle_p99", "paced p99 ÷ idle p99", _x, "≤ 3 ×", lambda v: v <= 3),
    ("mixed_paced_bulk_with_stream_s", "bulk batch with the paced stream", _s, "", None),
    ("mixed_paced_bulk_slowdown", "bulk with paced stream ÷ alone", _x, "≤ 1.1 ×", lambda v: v <= 1.1),
)

# `--scenario fair`: two bulk batches submitted about a second apart.
FAIR_ROWS: tuple[Row, ...] = (
    ("fair_2_submitted_after_1_s", "second batch stored after the first", _s, "", None),
    ("fair_1_first_result_s", "first batch: stored → first sub-task done", _s, "", None),
    ("fair_1_finish_s", "first batch: stored → finished", _s, "", None),
    ("fair_2_first_result_s", "second batch: stored → first sub-task done", _s, "≤ 2 s", lambda v: v <= 2),
    ("fair_2_finish_s", "second batch: stored → finished", _s, "", None),
)

# `--scenario shadow` (issue 13): the same measurements without, then with, a shadow roll-out
# of the pipeline's first model (a challenger of the champion's cost).
SHADOW_ROWS: tuple[Row, ...] = (
    ("shadow_off_idle_p50_ms", "one-input batch, idle, no roll-out", _ms, "", None),
    ("shadow_on_idle_p50_ms", "one-input batch, idle, shadow roll-out active", _ms, "", None),
    ("shadow_cost_idle_p50", "shadow on ÷ off: idle one-input p50", _x, "", None),
    ("shadow_cost_idle_p99", "shadow on ÷ off: idle one-input p99", _x, "", None),
    ("shadow_off_during_bulk_p99_ms", "one-input p99 during a bulk batch, no roll-out", _ms, "", None),
    ("shadow_on_during_bulk_p99_ms", "one-input p99 during a bulk batch, shadow active", _ms, "", None),
    ("shadow_cost_during_bulk_p50", "shadow on ÷ off: one-input p50 during bulk", _x, "", None),
    ("shadow_cost_during_bulk_p99", "shadow on ÷ off: one-input p99 during bulk", _x, "", None),
    ("shadow_cost_bulk_s", "shadow on ÷ off: the bulk batch's time", _x, "", None),
    ("shadow_drained_after_bulk_s", "the bulk batch's shadow work done, after the batch", _s, "", None),
)

# `--scenario monitor` (bench/monitor.py, issue 14): medians.
MONITOR_ROWS: tuple[Row, ...] = (
    ("small_batch_aggregation_ms", "small batch's aggregation (100 inputs): last sub-task → finished", _ms, "", None),
    ("small_batch_assembly_ms", "its assembly: last sub-task → results (metrics' aggregation_s)", _ms, "", None),
    ("monitor_finish_ms", "the statement that finishes a batch, without contributions", _ms, "", None),
    ("monitor_insert_ms", "what a batch's contributions add to that statement", _ms, "", None),
    ("monitor_fold_per_batch_ms", "its share of the fold into the rollups (after commit)", _ms, "", None),
    ("monitor_update_ms", "window update per finished batch (insert + fold share)", _ms, "", None),
    ("monitor_update_vs_aggregation", "window update ÷ small batch's aggregation", _pct, "< 5 %", lambda v: v < 0.05),
    ("monitor_update_vs_assembly", "window update ÷ small batch's assembly", _pct, "", None),
    ("monitor_update_inline_ms", "the same, folded in the aggregate (before 0014)", _ms, "", None),
    ("monitor_update_inline_vs_aggregation", "that ÷ small batch's aggregation", _pct, "", None),
    ("monitor_24h_ms", "pipeline monitor, 24h window of a day's batches", _ms, "≤ 200 ms", lambda v: v <= 200),
    ("monitor_1h_ms", "pipeline monitor, 1h window", _ms, "", None),
    ("monitor_10000rows_ms", "pipeline monitor, 10000rows window", _ms, "", None),
    ("monitor_alert_evaluation_ms", "one alert evaluation (1h and 24h)", _ms, "< 1 s", lambda v: v < 1000),
)

# bench/cli.py's figures (issue 11): medians over its runs.
CLI_ROWS: tuple[Row, ...] = (
    ("python_startup_s", "python -c pass: the floor of any command", _s, "", None),
    ("cli_help_s", "pipeline --help", _s, "≤ 0.3 s", lambda v: v <= 0.3),
    ("cli_help_vs_python", "pipeline --help ÷ python -c pass", _x, "", None),
    ("cli_help_cpu_s", "pipeline --help, CPU (user + system)", _s, "", None),
    ("cli_status_s", "pipeline status --limit 1", _s, "≤ 0.6 s", lambda v: v <= 0.6),
    ("cli_status_vs_python", "pipeline status ÷ python -c pass", _x, "", None),
    ("cli_status_cpu_s", "pipeline status --limit 1, CPU (user + system)", _s, "", None),
    ("status_libraries_s", "importing what status must use (click, psycopg, pydantic, rich)", _s, "", None),
    ("cli_status_vs_libraries", "pipeline status ÷ importing its libraries", _x, "", None),
)


def print_table(figures: dict[str, Any]) -> None:
    """Every figure of the run's scenarios, in one table."""
    parts = [f"{figures['pipeline']} ({', '.join(figures['scenarios'])})"]
    if "rows" in figures:
        parts.append(
            f"{figures['rows']:,} rows, {figures['items']:,} inputs, {figures['subtasks']:,} sub-tasks; naive peer"
            f" on {figures['naive_items']:,} inputs; latency over {figures['latency_samples']} batches"
        )
    if "mixed_bulk_rows" in figures:
        parts.append(
            f"mixed: bulk of {figures['mixed_bulk_rows']:,} rows, {figures['mixed_latency_samples']} one-input"
            " batches during it"
        )
    if "shadow_model" in figures:
        parts.append(f"shadow: roll-out of {figures['shadow_model']}")
    if "fair_bulk_rows" in figures:
        parts.append(f"fair: 2 bulk batches of {figures['fair_bulk_rows']:,} rows")
    if "floor_samples" in figures:
        parts.append(f"floor over {figures['floor_samples']} tasks, one before each idle one-input batch")
    load = figures["load_average_1m"]
    parts.append(f"{figures['cpus']} CPUs, load {load:.2f} at start, {figures['services']} services")
    if "monitor_batches" in figures:
        parts.append(f"monitor: a day of {figures['monitor_batches']:,} batches")
    all_rows = ROWS + FLOOR_ROWS + MIXED_ROWS + FAIR_ROWS + SHADOW_ROWS + MONITOR_ROWS + CLI_ROWS
    # A figure the run could not measure (None) is left out of the table, kept in results.json.
    rows = [row for row in all_rows if figures.get(row[0]) is not None]
    _print("; ".join(parts), tuple(rows), figures)


def print_cli_table(figures: dict[str, Any]) -> None:
    _print("pipeline CLI: time to answer", CLI_ROWS, figures)


def _print(title: str, rows: tuple[Row, ...], figures: dict[str, Any]) -> None:
    table = Table("figure", "what", "value", "target", "", title=title, title_justify="left")
    for key, what, show, target, meets in rows:
        mark = "" if meets is None else ("yes" if meets(figures[key]) else "NO")
        table.add_row(key, what, show(figures[key]), target, mark)
    Console(width=150).print(table)
