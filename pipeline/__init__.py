"""Async fan-out / aggregate inference pipeline: the core every role shares.

The client's names are imported on first use (PEP 562), so `import pipeline.cli` or
`import pipeline.settings` does not load the client's dependencies (SQLAlchemy, Celery,
NumPy) before a command needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.client import BatchHandle, BatchNotFoundError, BatchStatus, Client, InvalidInputError, ItemResult
    from pipeline.registry import UnknownPipelineError

# Each public name and the module that defines it.
_EXPORTS = {
    "BatchHandle": "pipeline.client",
    "BatchNotFoundError": "pipeline.client",
    "BatchStatus": "pipeline.client",
    "Client": "pipeline.client",
    "InvalidInputError": "pipeline.client",
    "ItemResult": "pipeline.client",
    "UnknownPipelineError": "pipeline.registry",
}

__all__ = [
    "BatchHandle",
    "BatchNotFoundError",
    "BatchStatus",
    "Client",
    "InvalidInputError",
    "ItemResult",
    "UnknownPipelineError",
]


def __getattr__(name: str) -> object:
    """Import a public name's module when the name is first read.

    Raises:
        AttributeError: `name` is not a public name (so `from pipeline import ledger`
            imports the submodule, as it would without this hook).
    """
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
