"""Finds pipelines by name: the shipped ones, the `pipeline.pipelines` entry point
group, and `PIPELINE_PIPELINES=package.module:attr,...`."""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points

from pipeline.definition import ModelSpec, Pipeline
from pipeline.errors import EstimationError, SettingsError, UnknownPipelineError
from pipeline.settings import get_settings

SHIPPED = ("pipeline.pipelines.digits:DigitsPipeline", "pipeline.pipelines.screening:ScreeningPipeline")
ENTRY_POINT_GROUP = "pipeline.pipelines"


def _load(reference: str) -> type[Pipeline]:
    module_name, _, attr = reference.partition(":")
    if not attr:
        raise ValueError(f"pipeline reference {reference!r} must look like package.module:attr")
    obj = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(obj, type) and issubclass(obj, Pipeline)):
        raise TypeError(f"{reference} is not a Pipeline subclass")
    return obj


def check_estimation(pipeline: Pipeline) -> None:
    """Refuse a pipeline whose CBPE (`Pipeline.estimation`) names a model that is not one of
    its models giving probabilities, or a figure CBPE does not estimate.

    Raises:
        EstimationError: naming the pipeline and what is wrong.
    """
    estimation = pipeline.estimation
    if estimation is None:
        return
    spec = next((spec for spec in pipeline.models if spec.name == estimation.model), None)
    if spec is None or not spec.probabilities:
        raise EstimationError(
            f"pipeline {pipeline.name!r} asks for CBPE of model {estimation.model!r}, which is not one of its"
            " models giving probabilities: its performance cannot be estimated"
        )
    unknown = sorted(set(estimation.kpis) - {"accuracy", "recall", "false_positive_rate"})
    if unknown:
        raise EstimationError(f"pipeline {pipeline.name!r}: CBPE estimates no {', '.join(unknown)}")


@lru_cache(maxsize=1)
def _registered() -> dict[str, Pipeline]:
    references = list(SHIPPED)
    references += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    references += [r.strip() for r in get_settings().pipelines.split(",") if r.strip()]
    pipelines: dict[str, Pipeline] = {}
    model_owner: dict[str, str] = {}
    for reference in references:
        pipeline = _load(reference)()
        if pipeline.name in pipelines:
            if type(pipelines[pipeline.name]) is type(pipeline):
                continue
            raise ValueError(f"two pipelines are named {pipeline.name!r}")
        for spec in pipeline.models:
            if spec.name in model_owner:
                raise ValueError(f"model {spec.name!r} is in both {model_owner[spec.name]!r} and {pipeline.name!r}")
            model_owner[spec.name] = pipeline.name
        check_estimation(pipeline)
        pipelines[pipeline.name] = pipeline
    return pipelines


def all_pipelines() -> list[Pipeline]:
    return list(_registered().values())


def get_pipeline(name: str) -> Pipeline:
    """Return the pipeline registered as `name`; raises UnknownPipelineError."""
    try:
        return _registered()[name]
    except KeyError:
        raise UnknownPipelineError(f"unknown pipeline {name!r}; known: {', '.join(sorted(_registered()))}") from None


def all_models() -> dict[str, ModelSpec]:
    return {spec.name: spec for pipeline in all_pipelines() for spec in pipeline.models}


def get_model(name: str) -> ModelSpec:
    """Return the spec of model `name`; raises UnknownPipelineError."""
    models = all_models()
    try:
        return models[name]
    except KeyError:
        raise UnknownPipelineError(f"unknown model {name!r}; known: {', '.join(sorted(models))}") from None


def pipeline_of(model: str) -> Pipeline:
    """Return the pipeline that has model `model` (one at most: `_registered` checks it);
    raises UnknownPipelineError."""
    spec = get_model(model)
    return next(pipeline for pipeline in all_pipelines() if spec in pipeline.models)


def check_chunk_sizes(chunk_sizes: dict[str, int]) -> None:
    """Check that `PIPELINE_CHUNK_SIZES` names only registered models (its sizes are checked
    by `Settings`).

    Raises:
        SettingsError: naming the unknown models and the known ones.
    """
    models = all_models()
    unknown = sorted(set(chunk_sizes) - set(models))
    if unknown:
        raise SettingsError(
            f"PIPELINE_CHUNK_SIZES names models no pipeline has: {', '.join(unknown)};"
            f" known: {', '.join(sorted(models))}"
        )
