"""Roll-outs on real services: a shadow roll-out leaves a batch's results byte-identical and
its shadow sub-tasks (the challenger's version) uncounted; a canary serves a stable share of
inputs within sampling error of its percent; promotion needs an approver and a passing gate
(or --force with a reason); abort; a second roll-out, an unknown version and a bad percent
are refused; every change is in `model_events`."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io
from sqlalchemy import Engine, text

from pipeline import heartbeat, ledger, model_registry, registry, rollouts
from pipeline.client import Client
from pipeline.errors import InvalidArgumentError, RolloutError, UnknownVersionError
from pipeline.gate import FAIL, INSUFFICIENT, PASS
from pipeline.pipelines import screening
from pipeline.pipelines.digits import held_out_strips
from pipeline.scratch import ScratchServices, delete_keys, scratch_services
from pipeline.settings import Settings
from pipeline.splitter import canary_inputs
from pipeline.states import Alias, RolloutMode, RolloutState
from tests.helpers import (
    TEST_CHUNK_SIZES,
    TEST_SPLIT_ENV,
    Processes,
    assert_one_line_error,
    assert_shadow_twins,
    register_champions,
    run_cli,
    run_client_settings,
    second_version,
    split_batch,
    store_batch,
    wait_for,
)

CLASSIFIER, OOD = "digit-classifier", "digit-ood"


@pytest.fixture
def own(embedded_dir: Path, models_dir: Path, tmp_path: Path) -> Iterator[tuple[ScratchServices, Settings, Engine]]:
    """A database of its own with the trained champions and a second digit-classifier version."""
    with scratch_services("rollouts", embedded_dir) as services:
        settings = services.settings(models_dir, registry_store_dir=tmp_path / "store")
        register_champions(services.database_url, models_dir)
        engine = ledger.make_engine(services.database_url)
        yield services, settings, engine
        engine.dispose()


def _subtasks(engine: Engine, batch_id: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT model, seq, role, priority, model_version, state, rows, items FROM subtasks"
                " WHERE batch_id = :b ORDER BY model, role, seq"
            ),
            {"b": uuid.UUID(batch_id)},
        ).all()


@contextlib.contextmanager
def _running(
    services: ScratchServices,
    settings: Settings,
    models_dir: Path,
    log_dir: Path,
    models: list[str],
    chunk_sizes: dict[str, int] | None = None,
) -> Iterator[Client]:
    """A worker and an aggregator on a broker prefix of their own, serving `models` (split with
    `chunk_sizes`, else the tests' sizes); yields a client of them."""
    chunks = chunk_sizes or TEST_CHUNK_SIZES
    prefix = f"rollouts-{uuid.uuid4().hex[:8]}:"
    client = Client(run_client_settings(services, models_dir, broker_prefix=prefix, chunk_sizes=chunks))
    processes = Processes(log_dir)
    env = services.env(
        models_dir,
        PIPELINE_BROKER_PREFIX=prefix,
        PIPELINE_REGISTRY_STORE_DIR=str(settings.resolved_registry_store_dir),
        **{**TEST_SPLIT_ENV, "PIPELINE_CHUNK_SIZES": json.dumps(chunks)},
    )
    try:
        processes.start("worker", ["-m", "workers", "--concurrency", "2"], env)
        processes.start("aggregator", ["-m", "aggregator", "--concurrency", "1"], env)
        queues = [f"model.{model}" for model in models]
        wait_for(lambda: not heartbeat.unserved_queues(client.engine, client.settings, queues), 120, "the worker")
        yield client
    finally:
        processes.stop_all()
        client.close()
        delete_keys(services.broker_url, prefix)


def _events(engine: Engine) -> list[tuple[str, str | None]]:
    return [(e["event"], e["alias"]) for e in model_registry.events(engine, CLASSIFIER)]


def test_shadow_results_identical_uncounted_and_promotion_needs_pass_or_force(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, tmp_path: Path
) -> None:
    services, settings, engine = own
    v1 = model_registry.champion(engine, CLASSIFIER)
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    inputs = held_out_strips(12, seed=3)
    with _running(services, settings, models_dir, tmp_path, [CLASSIFIER, OOD]) as client:
        plain = client.submit("digits", inputs)
        assert plain.wait(timeout=180).state == "succeeded"
        started = rollouts.start(engine, CLASSIFIER, version=v2[:12], mode=RolloutMode.shadow, started_by="ana")
        assert started.version == v2 and started.state == RolloutState.active
        shadowed = client.submit("digits", inputs)
        status = shadowed.wait(timeout=180)
        assert status.state == "succeeded"
        assert [json.dumps(r.output) for r in shadowed.results()] == [json.dumps(r.output) for r in plain.results()]

        rows = _subtasks(engine, shadowed.id)
        serve = [r for r in rows if r.role == "serve"]
        shadow = [r for r in rows if r.role == "shadow"]
        assert shadow and {r.model for r in shadow} == {CLASSIFIER}
        assert {r.priority for r in shadow} == {2}
        assert {r.model_version for r in serve if r.model == CLASSIFIER} == {v1}
        assert status.total == len(serve) and status.succeeded == len(serve)
        assert status.metrics is not None and status.metrics["model_versions"][CLASSIFIER] == [v1]
        wait_for(
            lambda: all(r.state == "succeeded" for r in _subtasks(engine, shadowed.id)), 120, "the shadow sub-tasks"
        )
        assert assert_shadow_twins(engine, shadowed.id, CLASSIFIER, v2) == len(shadow)

        gate = rollouts.status(engine, CLASSIFIER)
        assert gate.batches == 1 and gate.gate is not None and gate.gate.mode == "shadow"
        assert gate.verdict == "insufficient data"  # 12 strips: below the first milestone
        with pytest.raises(RolloutError, match="already has an active shadow roll-out"):
            rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.canary, percent=10, started_by="bo")
        with pytest.raises(InvalidArgumentError, match="named approver"):
            rollouts.promote(engine, CLASSIFIER, approved_by=" ")
        with pytest.raises(RolloutError, match="promotion refused, the gate is 'insufficient data'"):
            rollouts.promote(engine, CLASSIFIER, approved_by="lead")
        with pytest.raises(InvalidArgumentError, match="--force needs --reason"):
            rollouts.promote(engine, CLASSIFIER, approved_by="lead", force=True)
        assert model_registry.champion(engine, CLASSIFIER) == v1
        promoted = rollouts.promote(engine, CLASSIFIER, approved_by="lead", force=True, reason="same estimator")
        assert promoted.state == RolloutState.promoted and model_registry.champion(engine, CLASSIFIER) == v2
        with pytest.raises(RolloutError, match="no active roll-out"):
            rollouts.promote(engine, CLASSIFIER, approved_by="lead")
        after = client.submit("digits", inputs)
        assert after.wait(timeout=180).state == "succeeded"
        assert all(r.role == "serve" for r in _subtasks(engine, after.id))

    events = model_registry.events(engine, CLASSIFIER)
    kinds = [(e["event"], e["alias"]) for e in events]
    assert kinds[-4:] == [
        ("rollout_started", None),
        ("rollout_verdict", None),
        ("alias_set", Alias.champion),
        ("rollout_promoted", None),
    ]
    promote_event = events[-1]
    assert promote_event["actor"] == "lead" and "forced: same estimator" in promote_event["reason"]


def test_canary_share_is_stable_per_input_and_within_sampling_error(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path
) -> None:
    _, settings, engine = own
    v1 = model_registry.champion(engine, CLASSIFIER)
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    percent = 30.0
    rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.canary, percent=percent, started_by="ana")
    inputs = held_out_strips(400, max_digits=1, seed=7)
    batch_id, _ = store_batch(engine, inputs)
    split_batch(engine, batch_id, {CLASSIFIER: 64, OOD: 64}, step_items=150)
    rows = _subtasks(engine, str(batch_id))
    challenger = sorted(i for r in rows if r.model == CLASSIFIER and r.model_version == v2 for i in r.items)
    champion = sorted(i for r in rows if r.model == CLASSIFIER and r.model_version == v1 for i in r.items)
    assert sorted(challenger + champion) == list(range(len(inputs)))  # one digit per strip: one row per input
    assert all(r.role == "serve" for r in rows)
    share, n = len(challenger) / len(inputs), len(inputs)
    assert abs(share - percent / 100) < 4 * np.sqrt(0.3 * 0.7 / n), share
    # The same choice at every split of the batch (a re-split after a crash included).
    assert challenger == np.flatnonzero(canary_inputs(batch_id, np.arange(n), percent)).tolist()
    with engine.connect() as conn:
        counted = conn.execute(text("SELECT total FROM batches WHERE id = :b"), {"b": batch_id}).scalar_one()
    assert counted == len(rows)  # canary sub-tasks serve: they are counted
    other = canary_inputs(uuid.uuid4(), np.arange(n), percent)
    assert np.flatnonzero(other).tolist() != challenger

    aborted = rollouts.abort(engine, CLASSIFIER, actor="ana", reason="enough")
    assert aborted.state == RolloutState.aborted and aborted.reason == "enough"
    assert model_registry.champion(engine, CLASSIFIER) == v1
    assert _events(engine)[-2:] == [("rollout_started", None), ("rollout_aborted", None)]


def test_bad_rollout_commands_are_refused_and_write_nothing(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path
) -> None:
    _, settings, engine = own
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    before = _events(engine)
    with pytest.raises(UnknownVersionError, match="is not a registered version"):
        rollouts.start(engine, CLASSIFIER, version="f" * 12, mode=RolloutMode.shadow, started_by="ana")
    for percent in (None, 0.0, 100.0, 150.0):
        with pytest.raises(InvalidArgumentError, match="--percent between 0 and 100"):
            rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.canary, percent=percent, started_by="a")
    with pytest.raises(InvalidArgumentError, match="is for a canary"):
        rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.shadow, percent=5, started_by="a")
    with pytest.raises(InvalidArgumentError, match="is the champion"):
        rollouts.start(
            engine,
            CLASSIFIER,
            version=model_registry.champion(engine, CLASSIFIER),
            mode=RolloutMode.shadow,
            started_by="a",
        )
    with pytest.raises(RolloutError, match="has no roll-out"):
        rollouts.status(engine, CLASSIFIER)
    with pytest.raises(RolloutError, match="no active roll-out"):
        rollouts.abort(engine, CLASSIFIER, actor="a")
    assert _events(engine) == before


def test_rollout_cli_start_status_abort_and_one_line_refusals(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path
) -> None:
    services, settings, engine = own
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    cli = functools.partial(run_cli, services, settings, "rollout")
    refused = assert_one_line_error
    refused(cli("start", "no-such-model", "--version", v2, "--mode", "shadow"), "unknown model 'no-such-model'")
    refused(cli("start", CLASSIFIER, "--version", "0" * 12, "--mode", "shadow"), "is not a registered version")
    refused(cli("start", CLASSIFIER, "--version", v2, "--mode", "canary", "--percent", "120"), "--percent")
    assert_one_line_error(cli("promote", CLASSIFIER, "--approved-by", "lead"), "has no active roll-out")
    started = cli("start", CLASSIFIER, "--version", v2[:12], "--mode", "canary", "--percent", "10")
    assert started.returncode == 0 and "canary 10 % roll-out" in started.stdout, started.stderr
    assert_one_line_error(cli("start", CLASSIFIER, "--version", v2, "--mode", "shadow"), "already has an active canary")
    shown = cli("status", CLASSIFIER, "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert (status["version"], status["mode"], status["percent"], status["state"]) == (v2, "canary", 10.0, "active")
    assert_one_line_error(cli("promote", CLASSIFIER, "--approved-by", "lead"), "promotion refused")
    aborted = cli("abort", CLASSIFIER, "--reason", "not today")
    assert aborted.returncode == 0 and "aborted" in aborted.stdout, aborted.stderr
    # `status` recomputed the gate: its first verdict is recorded.
    kinds = [("rollout_started", None), ("rollout_verdict", None), ("rollout_aborted", None)]
    assert _events(engine)[-3:] == kinds


# 1,000 records make 20 forest sub-tasks of 50 (the latency check's first look needs 10 of
# each version) and few of the other models.
SCREENING_CHUNKS = {**TEST_CHUNK_SIZES, screening.LOGREG: 250, screening.FOREST: 50, screening.BOOSTING: 250}
GATE_BATCH = 1000


def _refit_forest(engine: Engine, settings: Settings, models_dir: Path, seed: int, shuffled: bool) -> str:
    """The champion forest refitted with `seed` (`screening.refit_forest`), registered as challenger."""
    data = (models_dir / f"{screening.FOREST}.skops").read_bytes()
    champion = skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))
    refit = screening.refit_forest(champion, seed, shuffled_labels=shuffled)
    return model_registry.register(
        engine, settings, screening.FOREST, skops.io.dumps(refit), created_by="retrain", as_alias=Alias.challenger
    )


def _shadow_verdicts(client: Client, engine: Engine, version: str, seed: int, batches: int = 5) -> list[str]:
    """Start a shadow roll-out of the forest's `version` and run up to `batches` batches of
    1,000 labelled records; after each (its shadow sub-tasks finished too) the gate's verdict.
    Stops at the first `pass` or `fail`."""
    rollouts.start(engine, screening.FOREST, version=version, mode=RolloutMode.shadow, started_by="ana")
    verdicts: list[str] = []
    for k in range(batches):
        batch = client.submit("screening", screening.held_out_records(GATE_BATCH, seed=seed + k))
        assert batch.wait(timeout=300).state == "succeeded"
        finished = ("succeeded", "failed")
        wait_for(lambda: all(r.state in finished for r in _subtasks(engine, batch.id)), 300, "the shadow sub-tasks")  # noqa: B023
        verdicts.append(rollouts.status(engine, screening.FOREST).verdict)
        if verdicts[-1] != INSUFFICIENT:
            break
    return verdicts


def test_gate_passes_a_reseeded_forest_and_fails_one_fitted_on_shuffled_labels(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, tmp_path: Path
) -> None:
    services, settings, engine = own
    reseeded = _refit_forest(engine, settings, models_dir, seed=1, shuffled=False)
    with _running(services, settings, models_dir, tmp_path, list(screening.MODELS), SCREENING_CHUNKS) as client:
        verdicts = _shadow_verdicts(client, engine, reseeded, seed=10)
        gate = rollouts.status(engine, screening.FOREST).gate
        assert gate is not None
        print(f"\nreseeded forest: {verdicts} after {len(verdicts)} batches; {gate.reasons}")
        assert verdicts[-1] == PASS, gate.reasons
        promoted = rollouts.promote(engine, screening.FOREST, approved_by="lead")
        assert promoted.state == RolloutState.promoted
        assert model_registry.champion(engine, screening.FOREST) == reseeded

        shuffled = _refit_forest(engine, settings, models_dir, seed=2, shuffled=True)
        verdicts = _shadow_verdicts(client, engine, shuffled, seed=20)
        gate = rollouts.status(engine, screening.FOREST).gate
        assert gate is not None
        print(f"shuffled-label forest: {verdicts} after {len(verdicts)} batches; {gate.reasons}")
        assert verdicts[-1] == FAIL, gate.reasons
        assert any(reason.startswith("agreement:") for reason in gate.reasons)
        with pytest.raises(RolloutError, match="promotion refused, the gate is 'fail'"):
            rollouts.promote(engine, screening.FOREST, approved_by="lead")
        assert model_registry.champion(engine, screening.FOREST) == reseeded


def test_a_gate_error_after_a_batch_is_logged_and_recorded_on_the_rollout_not_raised(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, settings, engine = own
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.shadow, started_by="ana")
    batch_id, _ = store_batch(engine, held_out_strips(40, max_digits=1, seed=5))
    split_batch(engine, batch_id, {CLASSIFIER: 16, OOD: 64}, step_items=40)
    outputs = registry.get_model(CLASSIFIER).n_outputs
    finish = text(
        "UPDATE subtasks SET state = 'succeeded', started_at = clock_timestamp(), finished_at = clock_timestamp(),"
        " output = CASE WHEN role = 'shadow' AND seq = -1 THEN :bad"
        " ELSE decode(repeat('00000000', rows * :outputs), 'hex') END"
        " WHERE batch_id = :b AND model = :m"
    )
    with engine.begin() as conn:
        # Every classifier sub-task done; the first shadow one's output is not whole float32 values.
        conn.execute(finish, {"b": batch_id, "m": CLASSIFIER, "outputs": outputs, "bad": b"\x00\x00\x00"})

    with caplog.at_level(logging.ERROR, logger="pipeline.rollouts"):
        rollouts.evaluate_batch(engine, batch_id)  # does not raise
    logged = [r for r in caplog.records if "could not be computed" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # with its traceback
    recorded = rollouts.status(engine, CLASSIFIER, refresh=False)
    assert recorded.gate is None and recorded.state == RolloutState.active
    assert recorded.gate_error is not None and recorded.gate_error.after == f"after batch {batch_id}"
    assert recorded.gate_error.error.startswith("ValueError: ")
    shown = rollouts.as_json(recorded)
    assert shown["gate_error"]["error"] == recorded.gate_error.error

    with engine.begin() as conn:
        conn.execute(finish, {"b": batch_id, "m": CLASSIFIER, "outputs": outputs, "bad": bytes(4 * outputs * 16)})
    repaired = rollouts.status(engine, CLASSIFIER)  # recomputed: the next gate replaces the error
    assert repaired.gate_error is None and repaired.gate is not None
