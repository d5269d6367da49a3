"""Property-based checks on real PostgreSQL: malformed submissions leave no trace,
and no interleaving of duplicate, late or stale completions breaks the counters."""

from __future__ import annotations

import math
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from pipeline import ledger
from pipeline.client import Client
from pipeline.errors import InvalidInputError
from pipeline.pipelines.digits import held_out_strips
from tests.helpers import RunServices, split_batch, store_batch

pixel = st.one_of(
    st.floats(min_value=0, max_value=16),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-5, max_value=40),
)
row = st.lists(pixel, min_size=0, max_size=24)
image = st.lists(row, min_size=0, max_size=10)
item = st.one_of(
    st.fixed_dictionaries({"image": image}),
    st.fixed_dictionaries({"image": image, "extra": st.integers()}),
    st.just({}),
    st.just("text"),
    st.none(),
)


def _valid(candidate: object) -> bool:
    """An independent statement of what a valid digit strip is."""
    if not isinstance(candidate, dict) or set(candidate) != {"image"}:
        return False
    rows = candidate["image"]
    if len(rows) != 8 or len({len(r) for r in rows}) != 1:
        return False
    width = len(rows[0])
    ok_pixels = all(math.isfinite(v) and 0 <= v <= 16 for r in rows for v in r)
    return ok_pixels and width % 8 == 0 and 1 <= width // 8 <= 32


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(item, min_size=1, max_size=6))
def test_malformed_submissions_are_refused_without_trace(
    items: list[object], isolated: tuple[Client, str], quiet_engine: Engine, services: RunServices
) -> None:
    client, prefix = isolated
    bad = [index for index, candidate in enumerate(items) if not _valid(candidate)]
    if not bad:
        return
    with quiet_engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM batches")).scalar()
    with pytest.raises(InvalidInputError) as caught:
        client.submit("digits", items)
    assert [index for index, _ in caught.value.problems] == bad
    with quiet_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM batches")).scalar() == before
    assert list(redis.Redis.from_url(services.broker_url).scan_iter(match=f"{prefix}*")) == []


operation = st.tuples(
    st.sampled_from(["claim", "complete", "fail", "retry", "expire", "cancel"]),
    st.integers(min_value=0, max_value=7),
)


def _check_counters(engine: Engine, batch_id: uuid.UUID) -> None:
    with engine.connect() as conn:
        batch = conn.execute(text("SELECT * FROM batches WHERE id = :b"), {"b": batch_id}).mappings().one()
        states = dict(
            conn.execute(
                text("SELECT state, count(*) FROM subtasks WHERE batch_id = :b GROUP BY state"), {"b": batch_id}
            ).all()
        )
    assert batch["succeeded"] == states.get("succeeded", 0)
    assert batch["failed"] == states.get("failed", 0)
    assert batch["cancelled"] == states.get("cancelled", 0)
    complete = batch["succeeded"] + batch["failed"] + batch["cancelled"] == batch["total"]
    if batch["state"] in ("running", "pending"):
        assert not complete
    if batch["state"] == "aggregating":
        assert complete


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(operation, min_size=1, max_size=40))
def test_no_interleaving_breaks_the_counters(operations: list[tuple[str, int]], quiet_engine: Engine) -> None:
    # In-process claims: a database no worker process reads (a worker claims any dispatched
    # sub-task of its models).
    engine = quiet_engine
    inputs = held_out_strips(4, max_digits=3, seed=5)
    batch_id, _ = store_batch(engine, inputs)
    split_batch(engine, batch_id, {"digit-classifier": 3, "digit-ood": 4})
    with engine.connect() as conn:
        ids = conn.execute(
            text("SELECT id, rows, model FROM subtasks WHERE batch_id = :b ORDER BY id"), {"b": batch_id}
        ).all()
    claims: list[ledger.Claim] = []  # every claim ever taken, stale ones included
    for name, index in operations:
        subtask_id, rows, model = ids[index % len(ids)]
        width = 10 if model == "digit-classifier" else 2
        if name == "claim":
            claim = ledger.claim_subtask(engine, subtask_id, "w", lease_s=300)
            if claim is not None:
                claims.append(claim)
        elif name == "expire":
            with engine.begin() as conn:
                conn.execute(
                    text("UPDATE subtasks SET lease_until = clock_timestamp() - interval '1 s' WHERE id = :i"),
                    {"i": subtask_id},
                )
        elif name == "cancel":
            ledger.cancel_batch(engine, batch_id)
        elif claims:
            claim = claims[index % len(claims)]
            if name == "complete":
                ledger.complete_subtask(engine, claim, bytes(4 * width * claim.rows), "v", None)
            else:
                ledger.fail_subtask(engine, claim, "boom", retry=name == "retry", lease_s=300)
        _check_counters(engine, batch_id)
