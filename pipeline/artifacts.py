"""Model artifacts: a skops file plus a JSON manifest (name, version, SHA-256,
training metrics, the types skops must trust, values chosen at training time and
the drift reference profile). Training writes them; workers load them only after
the hash matches (see `workers/models.py`)."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import skops.io
from pydantic import BaseModel, Field

from pipeline.definition import ModelSpec, TrainedModel
from pipeline.errors import ArtifactError
from pipeline.profile import ReferenceProfile, build_profile

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Manifest(BaseModel):
    name: str
    version: str
    sha256: str
    file: str
    trained_at: datetime
    metrics: dict[str, Any]
    trusted_types: list[str]
    # Values the pipeline chose at training time and reads back (e.g. an operating threshold).
    config: dict[str, Any] = Field(default_factory=dict)
    # Drift reference of the model's inputs and output score; None for a model trained without one.
    reference: ReferenceProfile | None = None


def model_paths(models_dir: Path, name: str) -> tuple[Path, Path]:
    """Return (artifact, manifest) paths of model `name`; raises ArtifactError for a name
    that could escape `models_dir` (path separators, `..`)."""
    if not SAFE_NAME.match(name) or ".." in name:
        raise ArtifactError(f"model name {name!r} is not a safe file name")
    return models_dir / f"{name}.skops", models_dir / f"{name}.json"


def read_manifest(models_dir: Path, name: str) -> Manifest:
    """Return model `name`'s manifest; raises ArtifactError when it is missing.

    Parsed once per version of the file (keyed by its modification time and size), as
    the aggregator reads every model's manifest for every batch."""
    _, manifest_path = model_paths(models_dir, name)
    try:
        stat = manifest_path.stat()
    except FileNotFoundError:
        raise ArtifactError(
            f"model {name!r} is not trained: {manifest_path} is missing (run `pipeline models train`)"
        ) from None
    return _parsed_manifest(manifest_path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=256)
def _parsed_manifest(path: Path, mtime_ns: int, size: int) -> Manifest:
    return Manifest.model_validate_json(path.read_text())


def reference_of(spec: ModelSpec, manifest: Manifest) -> ReferenceProfile | str:
    """A model version's drift reference profile (from its manifest), or why there is none."""
    profile = manifest.reference
    if profile is None:
        return f"model {spec.name!r} version {manifest.version} was trained without a reference profile"
    if len(profile.features) != spec.n_features:
        return f"model {spec.name!r}: reference has {len(profile.features)} features, model {spec.n_features}"
    return profile


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reference_profile(spec: ModelSpec, trained: TrainedModel) -> ReferenceProfile | None:
    """The drift reference of a trained model, from its reference rows as float32
    (what a worker receives), or None when `train` gave no reference rows."""
    if trained.reference is None:
        return None
    X = np.asarray(trained.reference, dtype="<f4")
    scores = trained.reference_scores
    if scores is None:
        scores = spec.output_score(np.asarray(spec.predict(trained.estimator, X), dtype="<f4"))
    return build_profile(spec.columns, X, np.asarray(scores, dtype="<f4"))


def save_model(models_dir: Path, spec: ModelSpec) -> Manifest:
    """Train `spec`'s model and write its artifact and manifest; return the manifest."""
    trained = spec.train()
    data = skops.io.dumps(trained.estimator)
    digest = sha256_of(data)
    artifact_path, manifest_path = model_paths(models_dir, spec.name)
    models_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        name=spec.name,
        version=digest[:12],
        sha256=digest,
        file=artifact_path.name,
        trained_at=datetime.now(UTC),
        metrics=trained.metrics,
        trusted_types=skops.io.get_untrusted_types(data=data),
        config=trained.config,
        reference=reference_profile(spec, trained),
    )
    artifact_path.write_bytes(data)
    manifest_path.write_text(manifest.model_dump_json(indent=2))
    return manifest


def read_verified(models_dir: Path, name: str) -> tuple[bytes, Manifest]:
    """Model `name`'s artifact bytes and manifest, after checking its SHA-256 against the manifest.

    Raises:
        ArtifactError: missing files, or the artifact's hash differs from the manifest's.
    """
    manifest = read_manifest(models_dir, name)
    artifact_path, _ = model_paths(models_dir, name)
    if not artifact_path.exists():
        raise ArtifactError(f"model {name!r}: artifact {artifact_path} is missing")
    data = artifact_path.read_bytes()
    digest = sha256_of(data)
    if digest != manifest.sha256:
        raise ArtifactError(
            f"model {name!r}: artifact {artifact_path} has SHA-256 {digest}, manifest says {manifest.sha256};"
            " refusing to load it (retrain with `pipeline models train`)"
        )
    return data, manifest


def load_verified(models_dir: Path, name: str) -> tuple[Any, Manifest]:
    """Load model `name` after checking its SHA-256 against the manifest (`read_verified`)."""
    data, manifest = read_verified(models_dir, name)
    return skops.io.loads(data, trusted=manifest.trusted_types), manifest
