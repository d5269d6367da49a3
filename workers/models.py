"""The model versions a worker process keeps loaded: fetched from the registry by
(model, version) on first use, verified by SHA-256 before loading, the least recently used
dropped past `Settings.worker_model_cache`. A new champion needs no restart: the next
sub-task pinned to it loads it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine

from pipeline import model_registry
from pipeline.artifacts import Manifest
from pipeline.settings import Settings

_loaded: OrderedDict[tuple[str, str], tuple[Any, Manifest]] = OrderedDict()


def loaded_version(engine: Engine, settings: Settings, model: str, version: str) -> tuple[Any, Manifest]:
    """Return (estimator, manifest) of `version` of `model`, loading it on first use.

    Raises:
        ArtifactError: not registered, or its stored bytes do not match its SHA-256.
        InvalidArtifactError: it needs a type outside the allow-list, or does not load.
        OSError: its file in the store directory cannot be read here.
    """
    key = (model, version)
    if key in _loaded:
        _loaded.move_to_end(key)
        return _loaded[key]
    _loaded[key] = model_registry.load_version(engine, settings, model, version)
    while len(_loaded) > settings.worker_model_cache:
        _loaded.popitem(last=False)
    return _loaded[key]


def cached_versions() -> list[tuple[str, str]]:
    """The (model, version) pairs loaded in this process, least recently used first."""
    return list(_loaded)


# The models this worker serves (`pipeline worker --models`), recorded before its pool forks.
_served: list[str] = []


def serve(names: Sequence[str]) -> None:
    """Record the models this worker process (and the pool it forks) serves."""
    _served[:] = names


def served() -> tuple[str, ...]:
    """The models this worker serves; empty outside a `pipeline worker`."""
    return tuple(_served)
