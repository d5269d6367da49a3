"""Models loaded once per worker process, each only after its SHA-256 matches its manifest."""

from __future__ import annotations

from functools import cache
from typing import Any

from pipeline.artifacts import Manifest, load_verified
from pipeline.settings import get_settings


@cache
def loaded_model(name: str) -> tuple[Any, Manifest]:
    """Return (estimator, manifest) of model `name`, loading it on first use in this process.

    Raises:
        ArtifactError: missing artifact, or its hash does not match the manifest.
    """
    return load_verified(get_settings().resolved_models_dir, name)
