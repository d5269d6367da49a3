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
    from pipeline.batch_handle import BatchHandle, ItemResult
    from pipeline.client import Client
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
    from pipeline.status import BatchStatus

__all__ = [
    "ArtifactError",
    "BatchHandle",
    "BatchNotFoundError",
    "BatchState",
    "BatchStatus",
    "Client",
    "EmbeddedServiceError",
    "FailurePolicy",
    "GuardrailViolation",
    "IdempotencyKeyError",
    "InvalidArgumentError",
    "InvalidInputError",
    "ItemResult",
    "Kpis",
    "ModelRows",
    "ModelSpec",
    "Pipeline",
    "PipelineError",
    "ServiceNotReadyError",
    "SplitError",
    "TrainedModel",
    "UnknownPipelineError",
]

# The module defining each public name but the errors (all in pipeline.errors).
_MODULES = {
    "Client": "pipeline.client",
    "BatchHandle": "pipeline.batch_handle",
    "BatchStatus": "pipeline.status",
    "ItemResult": "pipeline.batch_handle",
    "BatchState": "pipeline.schema",
    "FailurePolicy": "pipeline.schema",
    "Pipeline": "pipeline.definition",
    "ModelSpec": "pipeline.definition",
    "ModelRows": "pipeline.definition",
    "TrainedModel": "pipeline.definition",
    "Kpis": "pipeline.definition",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES.get(name, "pipeline.errors")), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
