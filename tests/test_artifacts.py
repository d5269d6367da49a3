"""Model artifacts are loaded only when their SHA-256 matches the manifest."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline import heartbeat
from pipeline.artifacts import ArtifactError, load_verified, model_paths
from pipeline.client import Client
from pipeline.pipelines.digits import held_out_strips
from pipeline.scratch import delete_keys
from tests.helpers import TEST_SPLIT_ENV, Processes, RunServices, run_client_settings, wait_for


@pytest.fixture
def tampered(models_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    artifact, _ = model_paths(folder, "digit-classifier")
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    return folder


def test_tampered_artifact_is_refused(tampered: Path, models_dir: Path) -> None:
    load_verified(models_dir, "digit-classifier")  # the untouched copy loads
    with pytest.raises(ArtifactError, match="has SHA-256 .* manifest says .* refusing to load"):
        load_verified(tampered, "digit-classifier")


def test_worker_refuses_to_start_on_a_tampered_artifact(tampered: Path, services: RunServices) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "workers", "--models", "digit-classifier"],
        env=services.env(tampered),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "refusing to load" in run.stderr


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "..", ".hidden", ""])
def test_model_name_cannot_escape_the_models_folder(name: str, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a safe file name"):
        model_paths(tmp_path, name)


def test_an_artifact_tampered_with_after_start_fails_its_batch_with_the_reason(
    services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    """The worker verified its artifacts at start-up; one is changed before a pool process
    loads it. The sub-tasks fail for good, the worker logs why with the file's path, and
    the batch's error and its results say what failed without the server's folders."""
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    prefix = f"artifact-{uuid.uuid4().hex[:8]}:"
    env = services.env(folder, PIPELINE_BROKER_PREFIX=prefix, **TEST_SPLIT_ENV)
    client = Client(run_client_settings(services, folder, broker_prefix=prefix))
    processes = Processes(tmp_path)
    try:
        processes.start("worker", ["-m", "workers", "--models", "digit-classifier,digit-ood"], env)
        queues = ["model.digit-classifier", "model.digit-ood"]
        wait_for(lambda: not heartbeat.unserved_queues(client.engine, client.settings, queues), 120, "the worker")
        artifact, _ = model_paths(folder, "digit-classifier")
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0xFF
        artifact.write_bytes(bytes(data))

        # A small batch: its last sub-task's worker aggregates it (no aggregator runs here).
        batch = client.submit("digits", held_out_strips(3, seed=8))
        status = batch.wait(timeout=180)
        assert status.state == "failed"
        assert status.error is not None and status.error.startswith("no input has a result; 3 of 3 inputs")
        assert "model 'digit-classifier': ArtifactError" in status.error and "refusing to load" in status.error
        errors = [result.error or "" for result in batch.results()]
        assert len(errors) == 3 and all("digit-classifier.skops has SHA-256" in error for error in errors)
        assert not any(str(tmp_path) in error for error in [status.error, *errors])
    finally:
        processes.stop_all()
        client.close()
        delete_keys(services.broker_url, prefix)
    log = "".join(path.read_text(errors="replace") for path in tmp_path.glob("worker-*.log"))
    assert "failed for good: ArtifactError" in log and str(artifact) in log
