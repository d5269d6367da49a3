"""`pipeline models train`: fit every registered model and write its artifact."""

from __future__ import annotations

from pathlib import Path

from pipeline import registry
from pipeline.artifacts import Manifest, read_manifest, save_model
from pipeline.errors import ArtifactError


def missing_models(models_dir: Path) -> list[str]:
    """Names of registered models with no manifest in `models_dir`."""
    missing = []
    for name in sorted(registry.all_models()):
        try:
            read_manifest(models_dir, name)
        except ArtifactError:
            missing.append(name)
    return missing


def train_models(models_dir: Path, names: list[str] | None = None) -> list[Manifest]:
    """Train the named models (default: all registered) into `models_dir`; return their manifests."""
    specs = [registry.get_model(name) for name in names] if names else list(registry.all_models().values())
    return [save_model(models_dir, spec) for spec in specs]
