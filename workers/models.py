"""Models loaded once per worker process, each only after its SHA-256 matches its manifest."""

from __future__ import annotations

from collections.abc import Sequence
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


# The models this worker serves (`pipeline worker --models`), recorded before its pool forks.
_served: list[str] = []


def serve(names: Sequence[str]) -> None:
    """Record the models this worker process (and the pool it forks) serves."""
    _served[:] = names


def served() -> tuple[str, ...]:
    """The models this worker serves; empty outside a `pipeline worker`."""
    return tuple(_served)
