"""Every error the pipeline raises on purpose, under one root: `PipelineError`.

Catch `PipelineError` for anything the library refuses or cannot do; each class also
keeps the builtin base it had before (`ValueError`, `LookupError`, `RuntimeError`), so
code catching those still works. Anything else that escapes the library is a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

# How many bad items an InvalidInputError spells out in its message (all are in `.problems`).
SHOWN_PROBLEMS = 20


class PipelineError(Exception):
    """The root of the pipeline's errors."""


class BatchNotFoundError(PipelineError, LookupError):
    """No batch has the id asked for."""


class UnknownPipelineError(PipelineError, LookupError):
    """No pipeline (or model) is registered under the name asked for."""


class InvalidInputError(PipelineError, ValueError):
    """Some inputs do not match the pipeline's input model; nothing was stored or queued.

    `problems` lists (item index, reason) for every bad item.
    """

    def __init__(self, pipeline: str, problems: list[tuple[int, str]]) -> None:
        self.pipeline = pipeline
        self.problems = problems
        lines = [f"item {index}: {reason}" for index, reason in problems[:SHOWN_PROBLEMS]]
        if len(problems) > SHOWN_PROBLEMS:
            lines.append(f"... and {len(problems) - SHOWN_PROBLEMS} more bad items")
        super().__init__(f"{len(problems)} invalid input(s) for pipeline {pipeline!r}:\n  " + "\n  ".join(lines))


class IdempotencyKeyError(PipelineError, ValueError):
    """An idempotency key already names a batch that is not this request's: one of another
    pipeline, or one submitted with other inputs or options (another request fingerprint)."""


class InputFileError(PipelineError, ValueError):
    """An input file cannot be read as JSON lines (missing, not UTF-8, a line that is not JSON
    or longer than `PIPELINE_MAX_ITEM_BYTES`); the message names `FILE:LINE`."""


class SettingsError(PipelineError, ValueError):
    """A setting (a `PIPELINE_*` variable) is invalid: malformed, out of range, or naming a
    model that no registered pipeline has."""


class InvalidArgumentError(PipelineError, ValueError):
    """An argument of a library call is out of its range (e.g. a `limit` of 0); nothing was done."""


class SplitError(PipelineError, ValueError):
    """A pipeline cannot split a batch's inputs (its split returned rows that do not fit
    its model specs, or it refused an input): the batch fails with the reason. A
    pipeline's own `split` raises it for an input it cannot split."""


class ArtifactError(PipelineError, RuntimeError):
    """A model artifact is missing, misnamed or does not match its manifest."""


class InvalidArtifactError(PipelineError, ValueError):
    """A file offered to the model registry is not an artifact the model can serve (not a
    skops file, a type outside the allow-list, wrong output shape, a guardrail violation);
    nothing was registered."""


class FeatureCountError(InvalidArtifactError):
    """An artifact expects another number of input features than its model has."""


class UnknownVersionError(PipelineError, LookupError):
    """A model has no registered version of that name (or no champion yet)."""


class NoChampionError(UnknownVersionError):
    """A model has no champion version yet: no batch can be split for it."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} has no champion version: run `pipeline models train --only {model}`"
            f" or `pipeline models register {model} FILE.skops`"
        )


class RegistryConflictError(PipelineError, RuntimeError):
    """A model's alias changed while this change was being made; nothing was changed."""


class GuardrailViolation(PipelineError, ValueError):
    """A model's output is malformed; retrying cannot fix it."""


class EmbeddedServiceError(PipelineError, RuntimeError):
    """An embedded service could not be started."""


class ServiceNotReadyError(PipelineError, RuntimeError):
    """A service is unreachable or not set up; the message names it and what to do."""


class InvalidLabelError(PipelineError, ValueError):
    """Labels refused whole (wrong type, items out of range, a batch not finished or of a
    pipeline that takes no labels); nothing was stored."""


class InvalidWindowError(PipelineError, ValueError):
    """A monitoring window spec that does not parse (`1h`, `24h`, `30m`, `7d`, `rows:N`)."""


class EstimationError(PipelineError, ValueError):
    """Performance cannot be estimated: the model gives no calibrated probabilities, or
    what was given is not probabilities."""


def validation_line(error: ValidationError) -> str:
    """A pydantic `ValidationError` as one line: what was validated, then each field and why."""
    problems = (f"{'.'.join(str(part) for part in e['loc']) or 'value'}: {e['msg']}" for e in error.errors())
    return f"invalid {error.title}: " + "; ".join(problems)


class RolloutError(PipelineError, ValueError):
    """A roll-out command refused: a second roll-out of a model, none to promote or abort, a
    promotion without a passing gate or an approver. Nothing was changed."""
