"""Async fan-out / aggregate inference pipeline.

The client API (`Client`, `BatchHandle`, `BatchStatus`, `ItemResult`, `BatchState`,
`FailurePolicy`), the extension API for writing a pipeline (`Pipeline`, `ModelSpec`,
`ModelRows`, `TrainedModel`, `Kpis`) and the errors (`PipelineError` and its subclasses).

Names are imported on first use (PEP 562), so `import pipeline.cli` or a pipeline module
does not pay for the client's dependencies until it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.client import BatchHandle, BatchStatus, Client, ItemResult
    from pipeline.definition import Kpis, ModelRows, ModelSpec, Pipeline, TrainedModel
    from pipeline.errors import (
        ArtifactError,
        BatchNotFoundError,
        EmbeddedServiceError,
        GuardrailViolation,
        IdempotencyKeyError,
        InvalidArgumentError,
        InvalidInputError,
        PipelineError,
        ServiceNotReadyError,
        SplitError,
        UnknownPipelineError,
    )
    from pipeline.schema import BatchState, FailurePolicy

# Public name → the module defining it.
_EXPORTS = {
    "Client": "pipeline.client",
    "BatchHandle": "pipeline.client",
    "BatchStatus": "pipeline.client",
    "ItemResult": "pipeline.client",
    "BatchState": "pipeline.schema",
    "FailurePolicy": "pipeline.schema",
    "Pipeline": "pipeline.definition",
    "ModelSpec": "pipeline.definition",
    "ModelRows": "pipeline.definition",
    "TrainedModel": "pipeline.definition",
    "Kpis": "pipeline.definition",
    "PipelineError": "pipeline.errors",
    "ArtifactError": "pipeline.errors",
    "BatchNotFoundError": "pipeline.errors",
    "EmbeddedServiceError": "pipeline.errors",
    "GuardrailViolation": "pipeline.errors",
    "IdempotencyKeyError": "pipeline.errors",
    "InvalidArgumentError": "pipeline.errors",
    "InvalidInputError": "pipeline.errors",
    "ServiceNotReadyError": "pipeline.errors",
    "SplitError": "pipeline.errors",
    "UnknownPipelineError": "pipeline.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
