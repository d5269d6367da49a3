"""Async fan-out / aggregate inference pipeline: the core every role shares."""

from pipeline.client import BatchHandle, BatchNotFoundError, BatchStatus, Client, InvalidInputError, ItemResult
from pipeline.registry import UnknownPipelineError

__all__ = [
    "BatchHandle",
    "BatchNotFoundError",
    "BatchStatus",
    "Client",
    "InvalidInputError",
    "ItemResult",
    "UnknownPipelineError",
]
