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

from aggregator.assemble import aggregate_batch
from pipeline import heartbeat, ledger, model_registry, registry, rollout_evidence, rollouts
from pipeline.chunker import canary_inputs
from pipeline.client import Client
from pipeline.errors import InvalidArgumentError, RolloutError, UnknownVersionError
from pipeline.gate import FAIL, INSUFFICIENT, NO_LABEL, PASS
from pipeline.ledger import rollouts as rollout_rows
from pipeline.pipelines import screening
from pipeline.pipelines.digits import DigitsPipeline, held_out_strips, tile_labels
from pipeline.scratch import ScratchServices, delete_keys, scratch_services
from pipeline.settings import Settings
from pipeline.splitter import split_steps
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


def _forest(models_dir: Path) -> Any:
    """The trained (first champion) screening forest."""
    data = (models_dir / f"{screening.FOREST}.skops").read_bytes()
    return skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))


def _refit_forest(engine: Engine, settings: Settings, models_dir: Path, seed: int, shuffled: bool) -> str:
    """The champion forest refitted with `seed` (`screening.refit_forest`), registered as challenger."""
    refit = screening.refit_forest(_forest(models_dir), seed, shuffled_labels=shuffled)
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
        unpaired = (
            "SELECT count(*) FROM subtasks WHERE role = 'shadow' AND state = 'succeeded' AND champion_cpu_s IS NULL"
        )
        with engine.connect() as conn:
            assert conn.execute(text(unpaired)).scalar_one() == 0  # every shadow timed its champion too
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


def _split_under_shadow(engine: Engine, settings: Settings, models_dir: Path) -> tuple[uuid.UUID, int]:
    """A shadow roll-out of the classifier, and a batch of 40 one-digit strips split under it
    in classifier sub-tasks of 16 rows; returns the batch and the classifier's outputs per row."""
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.shadow, started_by="ana")
    batch_id, _ = store_batch(engine, held_out_strips(40, max_digits=1, seed=5))
    split_batch(engine, batch_id, {CLASSIFIER: 16, OOD: 64}, step_items=40)
    return batch_id, registry.get_model(CLASSIFIER).n_outputs


def test_shadow_sub_tasks_are_claimable_only_once_their_batch_has_finished(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path
) -> None:
    _, settings, engine = own
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.shadow, started_by="ana")
    batch_id, _ = store_batch(engine, held_out_strips(20, max_digits=1, seed=7))
    split_batch(engine, batch_id, {CLASSIFIER: 8, OOD: 64}, step_items=20)
    rows = [r for r in _subtasks(engine, str(batch_id)) if r.model == CLASSIFIER]
    serve_seqs = {r.seq for r in rows if r.role == "serve"}
    with engine.connect() as conn:
        ids = dict(
            conn.execute(
                text("SELECT seq, id FROM subtasks WHERE batch_id = :b AND model = :m"),
                {"b": batch_id, "m": CLASSIFIER},
            ).all()
        )
    shadow_id = ids[-1]
    # A shadow's own message claims the best serve sub-task while any is dispatched...
    taken = [ledger.claim_subtask(engine, shadow_id, "test-worker", lease_s=300) for _ in serve_seqs]
    assert all(claim is not None and claim.role == "serve" for claim in taken)
    # ...and nothing while its batch runs, though its shadow sub-tasks are the only ones dispatched.
    assert ledger.claim_subtask(engine, shadow_id, "test-worker", lease_s=300) is None
    with engine.connect() as conn:
        waiting = rollout_rows.dispatched_shadows(conn, batch_id)
    assert sorted(d.subtask_id for d in waiting) == sorted(ids[-1 - seq] for seq in serve_seqs)
    with engine.begin() as conn:
        conn.execute(text("UPDATE batches SET finished_at = clock_timestamp() WHERE id = :b"), {"b": batch_id})
    claim = ledger.claim_subtask(engine, shadow_id, "test-worker", lease_s=300)
    assert claim is not None and claim.role == "shadow"


def test_a_gate_is_recomputed_after_a_batch_at_most_once_per_interval_and_the_sweeper_catches_up(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path
) -> None:
    _, settings, engine = own
    batch_id, outputs = _split_under_shadow(engine, settings, models_dir)
    finish = text(
        "UPDATE subtasks SET state = 'succeeded', started_at = clock_timestamp(), finished_at = clock_timestamp(),"
        " predict_cpu_s = 0.001, output = decode(repeat('3e000000', rows * :outputs), 'hex')"
        " WHERE batch_id = :b AND model = :m AND (role = 'serve' OR seq <> -1)"
    )
    with engine.begin() as conn:
        # Every classifier sub-task done but one shadow twin, which finishes after the batch.
        conn.execute(finish, {"b": batch_id, "m": CLASSIFIER, "outputs": outputs})

    def gate_at() -> Any:
        return rollouts.status(engine, CLASSIFIER, refresh=False).gate_at

    rollouts.evaluate_batch(engine, batch_id, min_age_s=60)
    first = gate_at()
    assert first is not None  # no gate yet: due
    rollouts.evaluate_batch(engine, batch_id, min_age_s=60)
    assert gate_at() == first  # computed less than 60 s ago: skipped
    rollouts.refresh_gates(engine, min_age_s=0)
    assert gate_at() == first  # nothing finished since: kept
    paired_before = rollouts.status(engine, CLASSIFIER, refresh=False).gate
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE subtasks SET state = 'succeeded', started_at = clock_timestamp(),"
                " finished_at = clock_timestamp(), predict_cpu_s = 0.001,"
                " output = decode(repeat('3e000000', rows * :outputs), 'hex')"
                " WHERE batch_id = :b AND model = :m AND role = 'shadow' AND seq = -1"
            ),
            {"b": batch_id, "m": CLASSIFIER, "outputs": outputs},
        )
    rollouts.refresh_gates(engine, min_age_s=0)
    after = rollouts.status(engine, CLASSIFIER, refresh=False)
    assert after.gate_at is not None and after.gate_at > first  # the late shadow twin: recomputed
    assert paired_before is not None and after.gate is not None
    rows_before = max(check.n_challenger for check in paired_before.checks if check.kind == "behaviour")
    assert max(check.n_challenger for check in after.gate.checks if check.kind == "behaviour") > rows_before


def test_a_gate_error_after_a_batch_is_logged_and_recorded_on_the_rollout_not_raised(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, settings, engine = own
    batch_id, outputs = _split_under_shadow(engine, settings, models_dir)
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


def _finish_all(engine: Engine, batch_id: uuid.UUID, model: str) -> None:
    """Mark every sub-task of `model` in the batch succeeded, with all-zero outputs."""
    outputs = registry.get_model(model).n_outputs
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE subtasks SET state = 'succeeded', started_at = clock_timestamp(),"
                " finished_at = clock_timestamp(), predict_cpu_s = 0.001,"
                " output = decode(repeat('00000000', rows * :outputs), 'hex') WHERE batch_id = :b AND model = :m"
            ),
            {"b": batch_id, "m": model, "outputs": outputs},
        )


def _digit_truth(engine: Engine, batch_id: uuid.UUID, labels: dict[int, str]) -> dict[int, list[int]]:
    """Per serve classifier sub-task (by seq), each row's labelled digit or NO_LABEL: an input's
    rows are its tiles left to right, in seq order (each input is in one version's sub-tasks)."""
    seen: dict[int, int] = {}
    truth = {}
    for row in sorted(
        (r for r in _subtasks(engine, str(batch_id)) if r.model == CLASSIFIER and r.role == "serve"),
        key=lambda r: r.seq,
    ):
        digits = []
        for item in row.items:
            offset, seen[item] = seen.get(item, 0), seen.get(item, 0) + 1
            label = labels.get(item)
            digits.append(int(label[offset]) if label is not None and offset < len(label) else NO_LABEL)
        truth[row.seq] = digits
    return truth


def test_stored_labels_map_to_the_rows_they_label_across_split_inputs(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path
) -> None:
    _, settings, engine = own
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    assert DigitsPipeline().row_labels(OOD) is None
    strips = held_out_strips(30, max_digits=6, seed=11)
    for mode, percent in ((RolloutMode.shadow, None), (RolloutMode.canary, 40.0)):
        started = rollouts.start(engine, CLASSIFIER, version=v2, mode=mode, percent=percent, started_by="ana")
        batch_id, _ = store_batch(engine, [{"image": s["image"]} for s in strips])
        # 4 rows a sub-task: a strip of up to 6 tiles runs on over two or three sub-tasks.
        split_batch(engine, batch_id, {CLASSIFIER: 4, OOD: 64}, step_items=10)
        _finish_all(engine, batch_id, CLASSIFIER)
        # Every third strip unlabelled; strip 1's first label replaced; strip 2's label one digit short.
        labels = {i: s["label"] for i, s in enumerate(strips) if i % 3}
        labels[2] = labels[2][:-1]
        rows = [{"i": i, "l": json.dumps(label), "old": False} for i, label in labels.items()]
        rows.append({"i": 1, "l": json.dumps("0" * 6), "old": True})
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO labels (batch_id, item, label, replaced_at)"
                    " VALUES (:b, :i, CAST(:l AS jsonb), CASE WHEN :old THEN clock_timestamp() END)"
                ),
                [{"b": batch_id, **row} for row in rows],
            )
            evidence = rollout_rows.evidence_subtasks(conn, started.id, CLASSIFIER, 10_000, labels=True)
        truth = _digit_truth(engine, batch_id, labels)
        serve = [s for s in evidence if s.batch_id == batch_id and s.role == "serve"]
        assert sorted(s.seq for s in serve) == sorted(truth)
        assert all(s.items is None for s in evidence if s.role == "shadow")  # paired with their serve twins
        if mode == RolloutMode.shadow:
            # A strip's third sub-task: the walk back went past one. Only in shadow, where every
            # strip is in the serve stream: a canary's share of strips depends on the random batch id.
            assert max(s.lead for s in serve) > 4
        for subtask in serve:
            items = np.asarray(subtask.items)
            mapped = tile_labels(items, rollout_evidence.row_offsets(items, subtask.lead), subtask.labels)
            assert mapped.tolist() == truth[subtask.seq], subtask.seq

        gate = rollouts.status(engine, CLASSIFIER).gate
        assert gate is not None
        kpi = next(check for check in gate.checks if check.name == "kpi:accuracy")
        labelled = sum(digit != NO_LABEL for digits in truth.values() for digit in digits)
        if mode == RolloutMode.shadow:
            assert kpi.n_champion == labelled, kpi
        else:
            by_seq = {s.seq: s.model_version for s in serve}
            champion = sum(d != NO_LABEL for seq, digits in truth.items() if by_seq[seq] != v2 for d in digits)
            assert (kpi.n_champion, kpi.n_challenger) == (champion, labelled - champion), kpi
        rollouts.abort(engine, CLASSIFIER, actor="ana")


def test_record_labels_are_the_screening_models_classes() -> None:
    items = np.array([0, 1, 2, 3])
    mapped = screening.ScreeningPipeline().row_labels(screening.FOREST)
    assert mapped is not None
    assert mapped(items, np.zeros(4, dtype=np.int64), {1: screening.MALIGNANT, 3: screening.BENIGN}).tolist() == [
        NO_LABEL,
        screening.MALIGNANT,
        NO_LABEL,
        screening.BENIGN,
    ]
    # The forest decides the most probable of (malignant, benign): the label's number.
    output = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    decisions, classes = rollout_evidence.decisions_of(registry.get_model(screening.FOREST), output)
    assert decisions.tolist() == [screening.MALIGNANT, screening.BENIGN] and classes == 2


def _records_both_decide_right(forests: list[Any], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` records of screening's training split that every forest of `forests` decides
    right (all but one or two of its 398), drawn with replacement, with their labels."""
    X_train, _, y_train, _ = screening.dataset_split()
    right = np.flatnonzero(np.all([f.predict_proba(X_train).argmax(axis=1) == y_train for f in forests], axis=0))
    rows = np.random.default_rng(seed).choice(right, count).tolist()
    features = [dict(zip(screening.FEATURES, X_train[row].tolist())) for row in rows]
    return [{"features": f, "label": int(y_train[row])} for f, row in zip(features, rows)]


def _batch_then_labels(client: Client, engine: Engine, records: list[dict[str, Any]]) -> tuple[str, str]:
    """Run a batch of `records` without their labels (its shadow sub-tasks finished too); return
    the forest's gate verdict before and after the labels are stored for it."""
    batch = client.submit("screening", [{"features": r["features"]} for r in records])
    assert batch.wait(timeout=300).state == "succeeded"
    wait_for(lambda: all(r.state in ("succeeded", "failed") for r in _subtasks(engine, batch.id)), 300, "sub-tasks")
    before = rollouts.status(engine, screening.FOREST).verdict
    batch.add_labels({i: r["label"] for i, r in enumerate(records)})
    # Storing the labels recomputed the gate: read it as stored, not recomputed again.
    return before, rollouts.status(engine, screening.FOREST, refresh=False).verdict


def test_labels_stored_after_batches_decide_a_canary_pass_and_a_shadow_kpi_fail(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, tmp_path: Path
) -> None:
    services, settings, engine = own
    reseeded = _refit_forest(engine, settings, models_dir, seed=1, shuffled=False)
    with _running(services, settings, models_dir, tmp_path, list(screening.MODELS), SCREENING_CHUNKS) as client:
        # Records both forests decide right: the accuracy difference is 0 on every resample, so the
        # first look (250 labelled rows of each version) passes. How many batches a canary needs
        # at real error rates is the simulation's to say (docs/rollouts.md); here a label mapped to
        # the wrong row would show as errors and keep the interval wide.
        forests = [_forest(models_dir), screening.refit_forest(_forest(models_dir), 1)]
        rollouts.start(engine, screening.FOREST, version=reseeded, mode=RolloutMode.canary, percent=50, started_by="a")
        verdicts: list[tuple[str, str]] = []
        for k in range(3):
            verdicts.append(_batch_then_labels(client, engine, _records_both_decide_right(forests, GATE_BATCH, 30 + k)))
            if verdicts[-1][1] != INSUFFICIENT:
                break
        gate = rollouts.status(engine, screening.FOREST).gate
        assert gate is not None
        print(f"\ncanary of the reseeded forest, (before, after labels) per batch: {verdicts}; {gate.reasons}")
        assert verdicts[0][0] == INSUFFICIENT and verdicts[-1][1] == PASS, gate.reasons  # a canary needs labels
        kpi = next(check for check in gate.checks if check.name == "kpi:accuracy")
        assert kpi.verdict == PASS and kpi.ci is not None and kpi.ci[0] > -0.01 and kpi.n_challenger >= 250, kpi
        rollouts.promote(engine, screening.FOREST, approved_by="lead")

        shuffled = _refit_forest(engine, settings, models_dir, seed=2, shuffled=True)
        rollouts.start(engine, screening.FOREST, version=shuffled, mode=RolloutMode.shadow, started_by="ana")
        before, after = _batch_then_labels(client, engine, screening.held_out_records(GATE_BATCH, seed=40))
        gate = rollouts.status(engine, screening.FOREST).gate
        assert gate is not None
        print(f"shadow of the shuffled-label forest: {before} before labels, {after} after; {gate.reasons}")
        assert after == FAIL, gate.reasons
        kpi = next(check for check in gate.checks if check.name == "kpi:accuracy")
        assert kpi.verdict == FAIL and kpi.ci is not None and kpi.ci[1] < -0.01 and kpi.n_champion == GATE_BATCH, kpi
        assert any(reason.startswith("kpi:accuracy:") for reason in gate.reasons), gate.reasons
        # The labels decide quality: the behaviour checks that fail only warn.
        assert any("a warning only" in reason for reason in gate.reasons), gate.reasons


def _score_in_process(engine: Engine, batch_id: uuid.UUID, fail: Any = None) -> None:
    """Claim and finish every sub-task of a split batch here, as a worker would (one-hot digit
    1, in distribution), each with its pinned version; `fail(subtask)` says which fail for good."""
    for row in _subtasks(engine, str(batch_id)):
        with engine.connect() as conn:
            subtask_id = conn.execute(
                text("SELECT id FROM subtasks WHERE batch_id = :b AND model = :m AND seq = :s"),
                {"b": batch_id, "m": row.model, "s": row.seq},
            ).scalar_one()
        claim = ledger.claim_subtask(engine, subtask_id, "test-worker", lease_s=300)
        assert claim is not None
        if fail is not None and fail(row):
            ledger.fail_subtask(engine, claim, "RuntimeError: boom", retry=False, lease_s=300)
            continue
        rows = np.ones((claim.rows, registry.get_model(claim.model).n_outputs), dtype="<f4")
        if claim.model == CLASSIFIER:
            rows[:] = 0
            rows[:, 1] = 1
        assert claim.model_version is not None
        ledger.complete_subtask(engine, claim, rows.tobytes(), claim.model_version, None)


def _versions_read(
    engine: Engine, services: ScratchServices, settings: Settings, batch_id: uuid.UUID, out: Path
) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """Each input's `model_versions` through the `results` view, the client and `pipeline
    results --out` (results and errors files merged, in item order); and the stored page versions."""
    with engine.connect() as conn:
        view = conn.execute(
            text("SELECT model_versions FROM results WHERE batch_id = :b ORDER BY item"), {"b": batch_id}
        ).scalars()
        pages = conn.execute(
            text("SELECT versions FROM result_pages WHERE batch_id = :b ORDER BY first_item"), {"b": batch_id}
        ).scalars()
        by_view, stored = list(view), list(pages)
    with Client(settings) as client:
        by_client = [result.model_versions for result in client.batch(str(batch_id)).results()]
    run = run_cli(services, settings, "results", str(batch_id), "--out", str(out))
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for path in (out, out.with_suffix(".errors.jsonl")) for line in path.open()]
    by_cli = [line["model_versions"] for line in sorted(lines, key=lambda line: line["item"])]
    return by_view, by_client, by_cli, stored


def test_only_the_aggregate_of_a_roll_out_s_batch_reads_its_shadows_and_gates(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement that finishes a batch says whether a roll-out followed its split: only
    then does the aggregate look for shadow sub-tasks to publish and gates to judge."""
    _, settings, engine = own
    reads: list[tuple[str, uuid.UUID]] = []

    def recording(kind: str, read: Any) -> Any:
        def recorded(conn: Any, batch_id: uuid.UUID, *rest: Any) -> Any:
            reads.append((kind, batch_id))
            return read(conn, batch_id, *rest)

        return recorded

    monkeypatch.setattr(rollout_rows, "dispatched_shadows", recording("shadows", rollout_rows.dispatched_shadows))
    monkeypatch.setattr(rollout_rows, "due_rollouts_of_batch", recording("gates", rollout_rows.due_rollouts_of_batch))
    strips = held_out_strips(4, max_digits=3, seed=5)
    alone, _ = store_batch(engine, strips)
    split_batch(engine, alone, {CLASSIFIER: 4, OOD: 64})
    _score_in_process(engine, alone)
    assert aggregate_batch(engine, alone) == "succeeded"
    assert reads == []

    # A canary: no shadow sub-task, but the aggregate still asks (a roll-out followed the split).
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.canary, percent=50.0, started_by="ana")
    followed, _ = store_batch(engine, strips)
    split_batch(engine, followed, {CLASSIFIER: 4, OOD: 64})
    _score_in_process(engine, followed)
    assert aggregate_batch(engine, followed) == "succeeded"
    assert reads == [("shadows", followed), ("gates", followed)]


def test_results_name_the_versions_that_scored_them_canary_inputs_the_challenger(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, tmp_path: Path
) -> None:
    services, settings, engine = own
    v1, ood = model_registry.champion(engine, CLASSIFIER), model_registry.champion(engine, OOD)
    v2 = second_version(engine, settings, models_dir, CLASSIFIER)
    percent = 40.0
    rollouts.start(engine, CLASSIFIER, version=v2, mode=RolloutMode.canary, percent=percent, started_by="ana")
    strips = held_out_strips(60, max_digits=3, seed=3)
    batch_id, _ = store_batch(engine, strips)
    # 4 rows a sub-task: a strip's tiles can span two. A challenger sub-task whose last strip
    # goes on into the next one fails: that strip has no classifier version, though some of its rows ran.
    split_batch(engine, batch_id, {CLASSIFIER: 4, OOD: 64}, step_items=25)
    # The two versions' chunks alternate (in seq order, the order they are claimed): the gate
    # times them at the same moments.
    classifier = [r.model_version for r in _subtasks(engine, str(batch_id)) if r.model == CLASSIFIER]
    assert classifier[:4] == [v1, v2, v1, v2], classifier
    challenger = [r for r in _subtasks(engine, str(batch_id)) if r.model_version == v2]
    failing = next(r.seq for r, after in zip(challenger, challenger[1:]) if r.items[-1] == after.items[0])
    _score_in_process(engine, batch_id, fail=lambda s: s.model == CLASSIFIER and s.seq == failing)
    assert aggregate_batch(engine, batch_id) == "partial"

    chosen = canary_inputs(batch_id, np.arange(len(strips)), percent)
    assert 0 < chosen.sum() < len(strips)
    failed = {i for r in _subtasks(engine, str(batch_id)) if r.state == "failed" for i in r.items}
    assert failed and failed <= set(np.flatnonzero(chosen).tolist())
    expected = [
        {OOD: ood} | ({} if item in failed else {CLASSIFIER: v2 if chosen[item] else v1}) for item in range(len(strips))
    ]
    by_view, by_client, by_cli, stored = _versions_read(engine, services, settings, batch_id, tmp_path / "c.jsonl")
    assert by_view == by_client == by_cli == expected
    assert stored[0] is not None and len(stored[0]) == len(strips)  # per input: overrides or null
    assert all(entry is None or set(entry) == {CLASSIFIER} for entry in stored[0])
    rollouts.abort(engine, CLASSIFIER, actor="ana")

    # No roll-out: the pinned champions, and nothing stored per input.
    batch_id, _ = store_batch(engine, strips)
    split_batch(engine, batch_id, {CLASSIFIER: 4, OOD: 64}, step_items=25)
    _score_in_process(engine, batch_id)
    assert aggregate_batch(engine, batch_id) == "succeeded"
    by_view, by_client, by_cli, stored = _versions_read(engine, services, settings, batch_id, tmp_path / "n.jsonl")
    assert by_view == by_client == by_cli == [{CLASSIFIER: v1, OOD: ood}] * len(strips)
    assert stored == [None]

    # A split that fails after its first step: no model scored any input.
    batch_id, _ = store_batch(engine, strips, page_items=25)
    next(split_steps(engine, batch_id, {CLASSIFIER: 4, OOD: 64}, 25))
    with engine.begin() as conn:
        ledger.fail_pending_batch(conn, batch_id, "split failed: boom")
    by_view, by_client, by_cli, stored = _versions_read(engine, services, settings, batch_id, tmp_path / "f.jsonl")
    assert by_view == by_client == by_cli == [{}] * len(strips)
