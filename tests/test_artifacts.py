"""Model artifacts are loaded only when their SHA-256 matches the manifest (a version the
registry stores that fails its check: tests/test_registry.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from pipeline import ledger
from pipeline.artifacts import ArtifactError, load_verified, model_paths
from pipeline.scratch import scratch_services


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


def test_worker_refuses_to_start_on_a_tampered_artifact(tampered: Path, embedded_dir: Path) -> None:
    """An upgrade from before the registry: the worker registers the models folder's artifacts
    as first versions only once each matches its manifest."""
    with scratch_services("tampered", embedded_dir) as services:
        run = subprocess.run(
            [sys.executable, "-m", "workers", "--models", "digit-classifier"],
            env=services.env(tampered),
            capture_output=True,
            text=True,
            timeout=120,
        )
        engine = ledger.make_engine(services.database_url)
        with engine.connect() as conn:
            registered = conn.execute(text("SELECT count(*) FROM model_versions")).scalar_one()
        engine.dispose()
    assert run.returncode == 1
    assert "refusing to load" in run.stderr
    assert registered == 0


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "..", ".hidden", ""])
def test_model_name_cannot_escape_the_models_folder(name: str, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a safe file name"):
        model_paths(tmp_path, name)
