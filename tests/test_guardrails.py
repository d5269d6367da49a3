"""Output guardrails: a model returning invalid probabilities fails its sub-tasks with
the guardrail's error (not retried), and the batch ends as its failure policy says."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import Engine, text

from pipeline import registry
from pipeline.client import Client
from pipeline.guardrails import GuardrailViolation, check_output
from tests.guarded import MODEL

BAD = {1, 4, 6}
GUARDRAIL_ERROR = f"GuardrailViolation: model {MODEL!r} returned probabilities outside [0, 1] in rows [0]"


def _inputs(count: int) -> list[dict[str, list[float]]]:
    return [{"values": [500.0 if i in BAD else 0.1 * i, 0.5, -0.5, 1.0]} for i in range(count)]


def test_invalid_probabilities_fail_their_subtasks_and_the_batch_is_partial(
    client: Client, stack: object, engine: Engine
) -> None:
    batch = client.submit("guarded", _inputs(8))
    status = batch.wait(timeout=120)
    assert status.state == "partial"
    assert (status.succeeded, status.failed) == (5, 3)
    with engine.connect() as conn:
        failed = conn.execute(
            text("SELECT items[1], attempts, error FROM subtasks WHERE batch_id = :b AND state = 'failed'"),
            {"b": batch.id},
        ).all()
    assert sorted(item for item, _, _ in failed) == sorted(BAD)
    # A guardrail violation is permanent: no second attempt.
    assert all(attempts == 1 and error == GUARDRAIL_ERROR for _, attempts, error in failed)
    results = list(batch.results())
    for result in results:
        if result.item in BAD:
            assert result.output is None and GUARDRAIL_ERROR in (result.error or "")
        else:
            assert result.error is None and 0 <= result.output["p"] <= 1  # type: ignore[index]


def test_invalid_probabilities_fail_a_fail_fast_batch(client: Client, stack: object) -> None:
    status = client.submit("guarded", _inputs(8), failure_policy="fail_fast").wait(timeout=120)
    assert status.state == "failed"
    assert status.failed >= 1


def test_label_columns_only_take_known_labels() -> None:
    spec = registry.get_model("digit-ood")
    good = np.array([[0.1, 1.0], [-0.2, 0.0]])
    assert check_output(spec, good, 2).dtype == np.float32
    with pytest.raises(GuardrailViolation, match=r"returned labels outside \[0.0, 1.0\] in rows \[1\]"):
        check_output(spec, np.array([[0.1, 1.0], [0.3, 0.5]]), 2)


def test_probabilities_must_sum_to_one() -> None:
    spec = registry.get_model("screen-logreg")
    with pytest.raises(GuardrailViolation, match=r"not summing to 1 in rows \[0\]"):
        check_output(spec, np.array([[0.7, 0.7], [0.3, 0.7]]), 2)
    with pytest.raises(GuardrailViolation, match=r"NaN or infinity in rows \[1\]"):
        check_output(spec, np.array([[0.3, 0.7], [np.nan, 0.7]]), 2)
