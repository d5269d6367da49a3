"""The model versions a worker process keeps loaded: fetched from the registry by
(model, version) on first use, verified by SHA-256 before loading, the least recently used
dropped past `Settings.worker_model_cache`. A new champion needs no restart: the next
sub-task pinned to it loads it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine

from pipeline import model_registry
from pipeline.artifacts import Manifest
from pipeline.settings import Settings

_loaded: OrderedDict[tuple[str, str], tuple[Any, Manifest]] = OrderedDict()
# The loaded versions this process has already run once, untimed (`warm_once`).
_warmed: set[tuple[str, str]] = set()


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
        _warmed.discard(_loaded.popitem(last=False)[0])
    return _loaded[key]


def warm_once(model: str, version: str, run: Callable[[], object]) -> None:
    """Call `run` (an untimed predict) the first time this process uses `version` of `model`,
    until it returns. What a model does once, on its first call (the forms `pipeline.forests`
    derives from a fitted model, scikit-learn's own first-call work), is then never charged to
    a sub-task's timed predict: the roll-out gate compares those times between versions, and a
    freshly loaded challenger would pay it in the very sub-tasks the gate reads first.

    Raises:
        Whatever `run` raises; the version is then warmed on its next use.
    """
    key = (model, version)
    if key not in _warmed:
        run()
        _warmed.add(key)


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
