"""The model registry on real services: `models train` registers a champion, `register`
refuses what cannot serve with one line and writes nothing, the split pins the champion on
every sub-task (a promotion while a batch waits does not change its version), a running
worker serves a new champion without restart, rollback restores the previous one for the
next batch, a version that fails its SHA-256 check fails its sub-tasks with the reason, and
every change is in `model_events`."""

from __future__ import annotations

import json
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import skops.io
from sqlalchemy import Engine, event, text

from pipeline import broker, heartbeat, ledger, model_registry
from pipeline.client import Client
from pipeline.errors import FeatureCountError, InvalidArtifactError, UnknownVersionError
from pipeline.pipelines.digits import held_out_strips
from pipeline.scratch import ScratchServices, delete_keys, scratch_services
from pipeline.settings import Settings
from pipeline.states import Alias
from tests.helpers import (
    TEST_SPLIT_ENV,
    Processes,
    assert_one_line_error,
    register_champions,
    run_cli,
    run_client_settings,
    wait_for,
)

CLASSIFIER, OOD = "digit-classifier", "digit-ood"
# Below digit-ood's artifact (3.2 MB), above digit-classifier's (1.9 MB): one of each is
# stored in PostgreSQL, the other in the store directory.
INLINE_MAX_BYTES = 2_500_000


@pytest.fixture
def own(embedded_dir: Path, tmp_path: Path) -> Iterator[tuple[ScratchServices, Settings, Engine]]:
    """A database with an empty registry, the store directory in `tmp_path`."""
    with scratch_services("registry", embedded_dir) as services:
        settings = services.settings(
            tmp_path / "models",
            registry_store_dir=tmp_path / "store",
            registry_inline_max_bytes=INLINE_MAX_BYTES,
            chunk_sizes={CLASSIFIER: 97, OOD: 128},
        )
        engine = ledger.make_engine(services.database_url)
        yield services, settings, engine
        engine.dispose()


def _registry_rows(engine: Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        versions, aliases, events = (
            conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("model_versions", "model_aliases", "model_events")
        )
    return versions, aliases, events


def _redumped(models_dir: Path, model: str) -> bytes:
    """The model's trained artifact written again with compression: the same estimator, so
    it passes every check, as another version (other bytes, another SHA-256)."""
    data = (models_dir / f"{model}.skops").read_bytes()
    estimator = skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))
    return skops.io.dumps(estimator, compression=zipfile.ZIP_DEFLATED)


def test_train_registers_a_champion(own: tuple[ScratchServices, Settings, Engine]) -> None:
    services, settings, engine = own
    run = run_cli(services, settings, "models", "train", "--only", "poison-model")
    assert run.returncode == 0, run.stderr
    listed = run_cli(services, settings, "models", "versions", "poison-model", "--json")
    assert listed.returncode == 0, listed.stderr
    [version] = json.loads(listed.stdout)
    assert version["aliases"] == ["champion"] and version["source"] == "trained"
    assert version["stored_inline"] and version["created_by"]
    assert model_registry.champion(engine, "poison-model") == version["version"]
    assert f"{version['version'][:12]} (champion)" in run.stdout
    events = model_registry.events(engine, "poison-model")
    assert [(e["event"], e["alias"]) for e in events] == [("registered", None), ("alias_set", "champion")]


def test_a_registered_manifest_is_read_once_per_process(own: tuple[ScratchServices, Settings, Engine]) -> None:
    """The aggregate's drift and CBPE need each scoring version's manifest: a version never
    changes, so the second aggregate of a version reads nothing from the ledger for it."""
    services, settings, engine = own
    assert run_cli(services, settings, "models", "train", "--only", "poison-model").returncode == 0
    key = ("poison-model", model_registry.champion(engine, "poison-model"))
    unknown = ("poison-model", "0" * 64)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with engine.connect() as conn:
        first = model_registry.registered_manifests(conn, [key, unknown])
        read = len(statements)
        again = model_registry.registered_manifests(conn, [key])
    assert read == 1 and len(statements) == read + 0, statements
    assert set(first) == {key} and again[key] is first[key]
    assert first[key].sha256 == key[1]


def test_register_refuses_what_cannot_serve_and_writes_nothing(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, tmp_path: Path
) -> None:
    services, settings, engine = own
    register_champions(services.database_url, models_dir)
    before = _registry_rows(engine)
    garbage = tmp_path / "garbage.skops"
    garbage.write_bytes(b"not a zip file")
    assert_one_line_error(
        run_cli(services, settings, "models", "register", CLASSIFIER, str(garbage)), "not a skops artifact"
    )
    # A 64-feature digits model offered for the 4-feature test model.
    wrong = str(models_dir / f"{CLASSIFIER}.skops")
    assert_one_line_error(
        run_cli(services, settings, "models", "register", "poison-model", wrong),
        "takes 4 features; the artifact was fitted on 64",
    )
    assert_one_line_error(
        run_cli(services, settings, "models", "register", "no-such-model", wrong), "unknown model 'no-such-model'"
    )
    # An estimator without predict_proba for a probability model: it fails on the reference rows.
    assert_one_line_error(
        run_cli(services, settings, "models", "register", CLASSIFIER, str(models_dir / f"{OOD}.skops")),
        "fails on the reference rows",
    )
    assert_one_line_error(
        run_cli(services, settings, "models", "rollback", CLASSIFIER, "--to", "0123456789ab", "--approved-by", "x"),
        "is not a registered version",
    )
    assert_one_line_error(
        run_cli(services, settings, "models", "rollback", CLASSIFIER, "--approved-by", "x"), "has no previous champion"
    )
    with pytest.raises(FeatureCountError):
        model_registry.register(engine, settings, "poison-model", Path(wrong).read_bytes(), created_by="t")
    with pytest.raises(InvalidArtifactError, match="not a skops artifact"):
        model_registry.register(engine, settings, CLASSIFIER, b"PK\x03\x04", created_by="t")
    assert _registry_rows(engine) == before
    assert not settings.resolved_registry_store_dir.exists()


def _pinned(engine: Engine, batch_id: str) -> dict[str, set[str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT model, model_version FROM subtasks WHERE batch_id = :b"), {"b": uuid.UUID(batch_id)}
        ).all()
    versions: dict[str, set[str]] = {}
    for model, version in rows:
        versions.setdefault(model, set()).add(version)
    return versions


def _run_batch(client: Client, seed: int) -> dict[str, Any]:
    """A small digits batch to the end; its metrics' versions per model."""
    status = client.submit("digits", held_out_strips(4, seed=seed)).wait(timeout=180)
    assert status.state == "succeeded", status.error
    assert status.metrics is not None
    versions: dict[str, Any] = status.metrics["model_versions"]
    return versions


def test_pinned_versions_promotion_without_restart_rollback_and_a_tampered_version(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path, tmp_path: Path
) -> None:
    services, settings, engine = own
    model_registry.adopt_models_dir(engine, settings.model_copy(update={"models_dir": models_dir}), created_by="t")
    v1 = model_registry.champion(engine, CLASSIFIER)
    v2 = model_registry.register(
        engine, settings, CLASSIFIER, _redumped(models_dir, CLASSIFIER), created_by="retrain", as_alias=Alias.challenger
    )
    assert v2 != v1 and model_registry.champion(engine, CLASSIFIER) == v1
    stored = {r.version: r.stored_inline for r in model_registry.versions(engine, OOD)}
    assert list(stored.values()) == [False]  # 3.2 MB: in the store directory

    prefix = f"registry-{uuid.uuid4().hex[:8]}:"
    client = Client(run_client_settings(services, models_dir, broker_prefix=prefix))
    waiting = Client(run_client_settings(services, models_dir, broker_prefix=prefix + "unserved:"))
    processes = Processes(tmp_path)
    env = services.env(
        models_dir,
        PIPELINE_BROKER_PREFIX=prefix,
        PIPELINE_REGISTRY_STORE_DIR=str(settings.resolved_registry_store_dir),
        PIPELINE_REGISTRY_INLINE_MAX_BYTES=str(INLINE_MAX_BYTES),
        **TEST_SPLIT_ENV,
    )
    try:
        # A batch split while v1 is champion, whose sub-tasks wait (no worker reads its prefix,
        # and a bulk batch's are no interactive lane's).
        pending = waiting.submit("digits", held_out_strips(3, seed=1), priority="bulk")
        assert _pinned(engine, pending.id) == {CLASSIFIER: {v1}, OOD: {model_registry.champion(engine, OOD)}}
        # v2 is promoted while the batch waits.
        assert model_registry.rollback(engine, CLASSIFIER, approved_by="lead", to=v2[:12], reason="retrained") == v2

        processes.start("worker", ["-m", "workers", "--models", f"{CLASSIFIER},{OOD}", "--concurrency", "1"], env)
        queues = [f"model.{CLASSIFIER}", f"model.{OOD}"]
        wait_for(lambda: not heartbeat.unserved_queues(client.engine, client.settings, queues), 120, "the worker")
        with engine.connect() as conn:
            waiting_subtasks = conn.execute(
                text("SELECT id, model, priority FROM subtasks WHERE batch_id = :b"), {"b": uuid.UUID(pending.id)}
            ).all()
        broker.publish_predictions(client.app, [tuple(row) for row in waiting_subtasks])
        status = waiting.batch(pending.id).wait(timeout=180)
        assert status.state == "succeeded" and status.metrics is not None
        assert status.metrics["model_versions"][CLASSIFIER] == [v1]
        assert status.metrics["drift"]["models"][CLASSIFIER]["reference_version"] == v1
        assert _run_batch(client, 2)[CLASSIFIER] == [v2]

        # Rollback without --to: the previous champion, for the next batch, served by the same worker.
        assert model_registry.rollback(engine, CLASSIFIER, approved_by="lead", reason="v2 misbehaves") == v1
        assert _run_batch(client, 4)[CLASSIFIER] == [v1]

        # A version whose stored bytes no longer match its SHA-256 is never loaded: its sub-tasks fail with the reason.
        in_store = settings.model_copy(update={"registry_inline_max_bytes": 0})
        ood = model_registry.register(engine, in_store, OOD, _redumped(models_dir, OOD), created_by="retrain")
        [record] = [r for r in model_registry.versions(engine, OOD) if r.version == ood]
        assert not record.stored_inline
        path = settings.resolved_registry_store_dir / ood[:2] / f"{ood}.skops"
        path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
        model_registry.rollback(engine, OOD, approved_by="lead", to=ood)
        failed = client.submit("digits", held_out_strips(2, seed=5)).wait(timeout=180)
        assert failed.state in ("partial", "failed")
        assert failed.error is not None and f"stored artifact of version {ood[:12]}" in failed.error
        assert "refusing to load it" in failed.error
    finally:
        processes.stop_all()
        client.close()
        waiting.close()
        delete_keys(services.broker_url, prefix)

    events = [(e["event"], e["alias"], e["version"]) for e in model_registry.events(engine, CLASSIFIER)]
    assert events == [
        ("registered", None, v1),
        ("alias_set", Alias.champion, v1),
        ("registered", None, v2),
        ("alias_set", Alias.challenger, v2),
        ("rollback", Alias.champion, v2),
        ("rollback", Alias.champion, v1),
    ]
    with engine.begin() as conn, pytest.raises(Exception, match="append-only"):
        conn.execute(text("DELETE FROM model_events"))


def test_rollback_needs_a_known_version(own: tuple[ScratchServices, Settings, Engine], models_dir: Path) -> None:
    services, _, engine = own
    register_champions(services.database_url, models_dir)
    with pytest.raises(UnknownVersionError, match="is not a registered version"):
        model_registry.rollback(engine, CLASSIFIER, approved_by="lead", to="f" * 64)
