"""How fast the CLI answers (issue 11): `pipeline --help` (target 0.3 s) and
`pipeline status --limit 1` (target 0.6 s), beside `python -c pass` (the interpreter's
own start-up, the floor of any command) and the import of the libraries `status` cannot
do without (the floor of `status`).

    python -m bench.cli [--runs N]

Each command runs once untimed (the file cache warms up), then N times; the figures are
the median wall time and the median CPU time (user + system), which other load on the
machine inflates less than wall time. `status` reads a ledger of its own (a scratch
database on PIPELINE_DATABASE_URL's server, or embedded); `make bench` measures it on
the benchmark's ledger after its batches.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.table import print_cli_table
from pipeline.scratch import scratch_services

PIPELINE = str(Path(sys.executable).with_name("pipeline"))
RUNS = 7
COMMANDS = {
    "python_startup": [sys.executable, "-c", "pass"],
    "cli_help": [PIPELINE, "--help"],
    "cli_status": [PIPELINE, "status", "--limit", "1"],
    # The floor of `status` on this machine: the libraries it cannot do without. It reads the
    # ledger on a psycopg connection into pydantic models and prints a rich table from a click
    # command (no SQLAlchemy, no pydantic-settings: `tests/test_cli.py` checks).
    "status_libraries": [sys.executable, "-c", "import click, psycopg, pydantic, rich.console, rich.table"],
}


def _cpu_s_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_command(argv: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    """(median wall s, median CPU s) of `argv` run `runs` times after one untimed run.

    Raises:
        subprocess.CalledProcessError: the command failed.
    """
    subprocess.run(argv, env=env, check=True, capture_output=True)
    walls, cpus = [], []
    for _ in range(runs):
        cpu_before = _cpu_s_of_children()
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        walls.append(time.perf_counter() - started)
        cpus.append(_cpu_s_of_children() - cpu_before)
    return statistics.median(walls), statistics.median(cpus)


def measure_cli(env: dict[str, str], runs: int = RUNS) -> dict[str, float]:
    """`<name>_s` and `<name>_cpu_s` for each command, and each CLI command's ratio to the
    interpreter's start-up (`<name>_vs_python`, wall time)."""
    figures: dict[str, float] = {}
    for name, argv in COMMANDS.items():
        figures[f"{name}_s"], figures[f"{name}_cpu_s"] = time_command(argv, env, runs)
    for name in ("cli_help", "cli_status"):
        figures[f"{name}_vs_python"] = figures[f"{name}_s"] / figures["python_startup_s"]
    figures["cli_status_vs_libraries"] = figures["cli_status_s"] / figures["status_libraries_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as folder, scratch_services("bench", Path(folder)) as run:
        figures = measure_cli(run.env(Path(folder) / "models"), args.runs)
    print_cli_table(figures)


if __name__ == "__main__":
    main()
