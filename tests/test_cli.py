"""The `pipeline` command as users run it, a subprocess on real services: the errors
they can make each print one line (no password in it) and exit 1, `--json` output for
scripts, `results --out` splitting results from failed inputs, and the modules a command
loads (each imports what it needs when it runs)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from rich.console import Console
from sqlalchemy import Engine, insert, text
from sqlalchemy.engine import make_url

from pipeline import health, ledger, registry
from pipeline.cli import monitoring
from pipeline.client import Client
from pipeline.database import libpq_url, sqlalchemy_url
from pipeline.pipelines.digits import held_out_strips
from pipeline.pipelines.screening import held_out_records
from pipeline.report import batches_table
from pipeline.schema import Alert
from tests.helpers import RunServices, store_batch
from tests.pipelines import BAD_OUTPUT

PIPELINE_CLI = str(Path(sys.executable).parent / "pipeline")
ROOT = Path(__file__).resolve().parent.parent
MISSING_BATCH = str(uuid.UUID(int=0))
SECRET = "pw-5b7e19c3"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PIPELINE_CLI, *args], env=env, capture_output=True, text=True, timeout=180)


def _env(services: RunServices, models_dir: Path, **overrides: str) -> dict[str, str]:
    # PYTHONPATH: the test-only pipelines in PIPELINE_PIPELINES live in this repository's tests package.
    return services.env(models_dir, COLUMNS="250", PYTHONPATH=str(ROOT), **overrides)


def _assert_one_line_error(run: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    for part in expected:
        assert part in lines[0], lines[0]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _jsonl(path: Path, items: list[Any]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "records.jsonl", held_out_records(3))


# --- errors a user can make ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", MISSING_BATCH),
        ("results", MISSING_BATCH),
        ("report", MISSING_BATCH),
        ("cancel", MISSING_BATCH),
        ("submit", "screening", "{records}"),
    ],
)
def test_unreachable_database(
    args: tuple[str, ...], services: RunServices, models_dir: Path, records_file: Path
) -> None:
    port = _closed_port()
    env = _env(services, models_dir, PIPELINE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/pipeline")
    run = _cli(env, *(arg.format(records=records_file) for arg in args))
    _assert_one_line_error(run, "cannot reach PostgreSQL", f"127.0.0.1:{port}", "Connection refused")


def test_migrate_on_unreachable_database(services: RunServices, models_dir: Path) -> None:
    port = _closed_port()
    env = _env(services, models_dir, PIPELINE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/pipeline")
    _assert_one_line_error(_cli(env, "migrate"), "database error", f"port {port}", "Connection refused")


def test_unreachable_broker_stores_nothing(
    services: RunServices, models_dir: Path, records_file: Path, engine: Engine
) -> None:
    port = _closed_port()
    key = f"cli-{uuid.uuid4().hex}"
    env = _env(services, models_dir, PIPELINE_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    run = _cli(env, "submit", "screening", str(records_file), "--idempotency-key", key)
    _assert_one_line_error(run, "cannot reach the broker", f"127.0.0.1:{port}")
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM batches WHERE idempotency_key = :key"), {"key": key})
        assert stored.scalar_one() == 0


@contextmanager
def _database_of_its_own(services: RunServices) -> Iterator[str]:
    """A new empty database on the services' server (dropped at the end); its URL."""
    name = f"pipeline_cli_{uuid.uuid4().hex[:12]}"
    admin_url = libpq_url(make_url(services.database_url).set(database="postgres").render_as_string(False))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(services.database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_database_without_migrations(services: RunServices, models_dir: Path) -> None:
    """A fresh database: no schema, then an old migration, then `pipeline migrate` fixes both."""
    with _database_of_its_own(services) as url:
        name = make_url(url).database
        env = _env(services, models_dir, PIPELINE_DATABASE_URL=url)
        _assert_one_line_error(_cli(env, "status"), f"/{name} has no ledger schema", "run `pipeline migrate`")

        migrations = str(files("migrations"))
        first = ScriptDirectory(migrations).get_bases()[0]
        config = Config()
        config.set_main_option("script_location", migrations)
        config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
        command.upgrade(config, first)
        _assert_one_line_error(_cli(env, "status"), f"is at migration {first}", "run `pipeline migrate`")

        assert _cli(env, "migrate").returncode == 0
        run = _cli(env, "status", "--json")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == []


def test_migration_heads_read_without_alembic_are_alembics() -> None:
    """`pipeline status` checks the schema against heads read from the migration files, without Alembic."""
    script = ScriptDirectory(str(files("migrations")))
    known, heads = health.migration_revisions()
    assert heads == set(script.get_heads())
    assert known == {revision.revision for revision in script.walk_revisions()}


@pytest.mark.parametrize("command_name", ["status", "results", "report", "cancel"])
def test_unknown_batch(command_name: str, services: RunServices, models_dir: Path) -> None:
    env = _env(services, models_dir)
    _assert_one_line_error(_cli(env, command_name, MISSING_BATCH), f"no batch {MISSING_BATCH}")
    _assert_one_line_error(_cli(env, command_name, "not-a-uuid"), "'not-a-uuid' is not a batch id")


def test_unreachable_services_are_named_without_their_password(
    services: RunServices, models_dir: Path, records_file: Path
) -> None:
    port = _closed_port()
    env = _env(services, models_dir, PIPELINE_DATABASE_URL=f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/pipeline")
    run = _cli(env, "status")
    _assert_one_line_error(run, "cannot reach PostgreSQL", f"postgres:***@127.0.0.1:{port}/pipeline")
    assert SECRET not in run.stdout + run.stderr

    env = _env(services, models_dir, PIPELINE_BROKER_URL=f"redis://:{SECRET}@127.0.0.1:{port}/0")
    run = _cli(env, "submit", "screening", str(records_file))
    _assert_one_line_error(run, "cannot reach the broker", f"redis://:***@127.0.0.1:{port}")
    assert SECRET not in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (f"postgresql://u:{SECRET}@127.0.0.1:abc/db", "Port could not be cast to integer value as 'abc'"),
        (f"postgresql://u:{SECRET}@127.0.0.1:99999/db", "Port out of range 0-65535"),
        (f"postgresql://u:{SECRET}@[::1/db", "Invalid IPv6 URL"),
    ],
)
def test_malformed_database_url(url: str, why: str, services: RunServices, models_dir: Path) -> None:
    run = _cli(_env(services, models_dir, PIPELINE_DATABASE_URL=url), "status")
    _assert_one_line_error(run, "invalid Settings: database_url", "PIPELINE_DATABASE_URL is not a valid URL", why)
    assert SECRET not in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("status", "--limit", "-1"), "Invalid value for '--limit': -1 is not in the range x>=1"),
        (("status", "--limit", "0"), "Invalid value for '--limit': 0 is not in the range x>=1"),
        (("status", "--state", "done"), "Invalid value for '--state': 'done' is not one of 'pending', 'running'"),
        (("submit", "screening"), "Missing argument 'FILE'"),
        (("results",), "Missing argument 'BATCH_ID'"),
        (("models", "list", "--bogus"), "No such option '--bogus' (see `pipeline models list --help`)"),
        (("stats",), "No such command 'stats'"),
        (("--bogus",), "No such option '--bogus' (see `pipeline --help`)"),
    ],
)
def test_bad_command_line(args: tuple[str, ...], expected: str, services: RunServices, models_dir: Path) -> None:
    """Exit 1, as every other error: `submit --wait` exits 2 for a batch that did not succeed."""
    _assert_one_line_error(_cli(_env(services, models_dir), *args), expected, "--help`)")


def test_missing_or_unreadable_input_file(services: RunServices, models_dir: Path, tmp_path: Path) -> None:
    env = _env(services, models_dir)
    missing = tmp_path / "missing.jsonl"
    _assert_one_line_error(_cli(env, "submit", "screening", str(missing)), f"cannot read {missing}: No such file")
    _assert_one_line_error(_cli(env, "submit", "screening", str(tmp_path)), f"cannot read {tmp_path}: Is a directory")


def test_bad_setting(services: RunServices, models_dir: Path) -> None:
    run = _cli(_env(services, models_dir, PIPELINE_DATABASE_URL="mysql://db/pipeline"), "status")
    _assert_one_line_error(run, "invalid Settings: database_url", "must start with postgresql://")


def test_unknown_pipeline(services: RunServices, models_dir: Path, records_file: Path) -> None:
    run = _cli(_env(services, models_dir), "submit", "nope", str(records_file))
    _assert_one_line_error(run, "unknown pipeline 'nope'", "screening")


def test_idempotency_key_of_another_request(services: RunServices, models_dir: Path, tmp_path: Path) -> None:
    env = _env(services, models_dir)
    key = f"cli-{uuid.uuid4().hex}"
    records = held_out_records(3, seed=5)
    first = _cli(env, "submit", "screening", str(_jsonl(tmp_path / "a.jsonl", records)), "--idempotency-key", key)
    assert first.returncode == 0, first.stderr
    batch_id = first.stdout.strip()
    again = _cli(env, "submit", "screening", str(_jsonl(tmp_path / "b.jsonl", records)), "--idempotency-key", key)
    assert again.returncode == 0 and again.stdout.strip() == batch_id
    other = _jsonl(tmp_path / "c.jsonl", records[:2])
    run = _cli(env, "submit", "screening", str(other), "--idempotency-key", key)
    _assert_one_line_error(run, f"idempotency_key '{key}' already names batch {batch_id}", "other inputs or options")


def test_bad_input_files(services: RunServices, models_dir: Path, tmp_path: Path) -> None:
    env = _env(services, models_dir)
    record = held_out_records(1)[0]
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text(json.dumps(record) + "\n{not json\n")
    _assert_one_line_error(_cli(env, "submit", "screening", str(not_json)), f"{not_json}:2: not JSON")

    # Line 2 is blank, so the bad input (item 1) is on line 3.
    invalid = tmp_path / "invalid.jsonl"
    invalid.write_text(json.dumps(record) + "\n\n" + json.dumps({"features": {}, "label": 7}) + "\n")
    _assert_one_line_error(_cli(env, "submit", "screening", str(invalid)), f"{invalid}:3: ", "label")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _assert_one_line_error(_cli(env, "submit", "screening", str(empty)), f"{empty}: the batch has no inputs")

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"name": "Müller"}\n'.encode("latin-1"))
    _assert_one_line_error(_cli(env, "submit", "screening", str(latin1)), f"{latin1}: not UTF-8 text")


# --- output for people and scripts -----------------------------------------------------------


@pytest.fixture(scope="module")
def finished(services: RunServices, models_dir: Path, stack: object, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A succeeded screening batch of 600 records, submitted with `submit --wait --json`; its id."""
    inputs = _jsonl(tmp_path_factory.mktemp("cli") / "records.jsonl", held_out_records(600, seed=3))
    run = _cli(_env(services, models_dir), "submit", "screening", str(inputs), "--wait", "--json")
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["state"] == "succeeded" and status["items"] == 600
    assert status["metrics"]["kpis"]["recall_malignant"] is not None
    return status["id"]


def test_status_json_and_tables(finished: str, services: RunServices, models_dir: Path) -> None:
    env = _env(services, models_dir)
    newest = json.loads(_cli(env, "status", "--json", "--state", "succeeded", "--limit", "500").stdout)
    assert finished in {row["id"] for row in newest}
    assert all(row["state"] == "succeeded" and "metrics" not in row for row in newest)

    one = json.loads(_cli(env, "status", finished, "--json").stdout)
    assert one["id"] == finished and one["progress"] == 1.0 and "drift" in one["metrics"]

    table = _cli(env, "status", "--limit", "500").stdout
    assert finished in table and "succeeded" in table and "100%" in table

    report = json.loads(_cli(env, "report", finished, "--json").stdout)
    assert report["metrics"]["kpis"] == one["metrics"]["kpis"]


def test_status_list_is_the_clients_view(
    services: RunServices, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pipeline status` lists the newest batches without the client (no SQLAlchemy, no
    pydantic-settings): the rows, the table and the open alerts the client shows. On a ledger
    of its own that nothing else changes, its batches finished (their figures are final)."""
    with _database_of_its_own(services) as url:
        ledger.migrate(url)
        engine = ledger.make_engine(url)
        try:
            batch_ids = [store_batch(engine, held_out_strips(2 + n))[0] for n in range(3)]
            with engine.begin() as conn:
                for n, batch_id in enumerate(batch_ids):
                    ledger.fail_pending_batch(conn, batch_id, f"the split failed: test {n}")
                conn.execute(
                    insert(Alert).values(
                        kind="drift",
                        pipeline="digits",
                        model="digit-classifier",
                        model_version="a" * 64,
                        window="1h",
                        evidence={"psi": 0.4},
                    )
                )
        finally:
            engine.dispose()
        env = _env(services, models_dir, PIPELINE_DATABASE_URL=url)
        shown = io.StringIO()
        console = Console(file=shown, width=int(env["COLUMNS"]))
        monkeypatch.setattr(monitoring, "_console", lambda: console)
        with Client(services.settings(models_dir, database_url=url)) as client:
            for state, limit in ((None, 20), ("failed", 2)):
                expected = [
                    row.model_dump(mode="json", exclude={"result", "metrics"}) for row in client.batches(state, limit)
                ]
                args = ("--limit", str(limit), *(("--state", state) if state else ()))
                assert json.loads(_cli(env, "status", "--json", *args).stdout) == expected
            console.print(batches_table(client.batches(limit=20)))
            monitoring._print_open_alerts(monitoring._open_alerts(client, None))
        run = _cli(env, "status")
    assert [row["id"] for row in expected] == [str(batch_id) for batch_id in batch_ids[:0:-1]]
    assert "alert drift digits digit-classifier@aaaaaaaaaaaa window 1h" in shown.getvalue()
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout == shown.getvalue()


def test_report_on_a_batch_that_failed_before_scoring_says_so(
    engine: Engine, services: RunServices, models_dir: Path
) -> None:
    """A batch whose split failed has a status but no metrics: `report` shows the status and
    says why there is nothing more (not "its metrics come when it finishes")."""
    batch_id, _ = store_batch(engine, held_out_strips(2))
    with engine.begin() as conn:
        ledger.fail_pending_batch(conn, batch_id, "the split failed: test")
    run = _cli(_env(services, models_dir), "report", str(batch_id))
    assert run.returncode == 1 and "the split failed: test" in run.stdout
    assert run.stderr.strip() == (
        f"Error: batch {batch_id} failed before any input was scored: it has no KPIs, latency or drift"
    )


def test_submit_json_prints_the_id(services: RunServices, models_dir: Path, records_file: Path) -> None:
    run = _cli(_env(services, models_dir), "submit", "screening", str(records_file), "--json")
    assert run.returncode == 0, run.stderr
    assert set(json.loads(run.stdout)) == {"id"}
    uuid.UUID(json.loads(run.stdout)["id"])


def test_models_list_json(services: RunServices, models_dir: Path) -> None:
    rows = json.loads(_cli(_env(services, models_dir), "models", "list", "--json").stdout)
    assert {row["model"] for row in rows} == set(registry.all_models())
    assert all(row["version"] and row["trained_at"] and row["queue"] == f"model.{row['model']}" for row in rows)


def test_results_out_splits_failed_inputs(
    services: RunServices, models_dir: Path, stack: object, tmp_path: Path
) -> None:
    """Inputs whose model output breaks a guardrail have no result: they go to the error file."""
    env = _env(services, models_dir)
    bad = {3, 7, 8}
    points = [{"values": [BAD_OUTPUT if i in bad else 0.5, 1.0, 2.0, 3.0]} for i in range(12)]
    run = _cli(env, "submit", "poison", str(_jsonl(tmp_path / "points.jsonl", points)), "--wait", "--json")
    assert run.returncode == 2, run.stderr
    status = json.loads(run.stdout)
    assert status["state"] == "partial"

    out = tmp_path / "results.jsonl"
    run = _cli(env, "results", status["id"], "--out", str(out))
    assert run.returncode == 0, run.stderr
    succeeded = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [json.loads(line) for line in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert [row["item"] for row in succeeded] == [i for i in range(12) if i not in bad]
    assert all(set(row) == {"item", "output", "model_versions"} and 0 <= row["output"]["p"] <= 1 for row in succeeded)
    assert [row["item"] for row in failed] == sorted(bad)
    assert all(set(row) == {"item", "error", "model_versions"} and row["error"] for row in failed)
    # The pinned champion scored every input; a failed input's rows have no version.
    assert len({row["model_versions"]["poison-model"] for row in succeeded}) == 1
    assert all(row["model_versions"] == {} for row in failed)
    assert f"9 results written to {out}, 3 failed inputs to {tmp_path / 'results.errors.jsonl'}" in run.stdout


def test_results_out_to_a_missing_folder(
    finished: str, services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "missing" / "results.jsonl"
    run = _cli(_env(services, models_dir), "results", finished, "--out", str(out))
    _assert_one_line_error(run, f"cannot write {out}: No such file or directory")


def test_results_to_a_reader_that_stops_early(finished: str, services: RunServices, models_dir: Path) -> None:
    """`pipeline results ID | head -1`: the rest of 600 lines (~140 kB, more than a pipe
    holds) meets a closed pipe, and the command ends without a traceback."""
    with subprocess.Popen(
        [PIPELINE_CLI, "results", finished],
        env=_env(services, models_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        first = json.loads(process.stdout.readline())
        process.stdout.close()
        stderr = process.stderr.read()
        process.wait(timeout=120)
    assert first["item"] == 0 and first["output"]["decision"] in ("malignant", "benign")
    assert stderr == ""


# --- what a command loads --------------------------------------------------------------------

# Prints the third-party (and pipeline) modules the code after it loaded, as JSON.
LOADED_MODULES = """
import json, sys
before = set(sys.modules)
{code}
print(json.dumps(sorted({{name.split(".")[0] for name in set(sys.modules) - before}} - set(sys.stdlib_module_names))))
"""


def _loaded_by(code: str, env: dict[str, str] | None = None) -> set[str]:
    script = LOADED_MODULES.format(code=code)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return set(json.loads(run.stdout.splitlines()[-1]))


def test_the_cli_and_its_help_load_click_alone() -> None:
    """What makes `pipeline --help` answer at once: no library a command needs is loaded before it runs."""
    assert _loaded_by("import pipeline.cli") == {"click", "pipeline"}
    help_run = "from pipeline.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass"
    assert _loaded_by(help_run) == {"click", "pipeline"}


@pytest.fixture(scope="module")
def loaded_by_status(services: RunServices, models_dir: Path) -> set[str]:
    status_run = "from pipeline.cli import main\ntry: main(['status', '--limit', '1'])\nexcept SystemExit: pass"
    return _loaded_by(status_run, _env(services, models_dir))


@pytest.mark.parametrize(
    "module",
    [
        "sqlalchemy",
        "pydantic_settings",
        "sklearn",
        "matplotlib",
        "redis",
        "alembic",
        "celery",
    ],
)
def test_status_does_not_load(module: str, loaded_by_status: set[str]) -> None:
    """`pipeline status` (the newest batches) reads the ledger on a psycopg connection: no
    SQLAlchemy, no pydantic-settings (most of the time it took, issue 11), no model library,
    no plotting, no Celery, no Alembic."""
    assert {"psycopg", "pydantic", "rich"} <= loaded_by_status  # the command ran
    assert module not in loaded_by_status
