"""Bad input is refused before anything is written or queued."""

from __future__ import annotations

import math

import pytest
import redis
from sqlalchemy import Engine, text

from pipeline.client import Client
from pipeline.errors import InvalidInputError
from pipeline.pipelines.digits import held_out_strips
from pipeline.registry import UnknownPipelineError
from tests.helpers import RunServices


def _counts(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return (
            conn.execute(text("SELECT count(*) FROM batches")).scalar(),
            conn.execute(text("SELECT count(*) FROM input_pages")).scalar(),
        )


def test_each_bad_item_is_named_and_nothing_is_stored_or_queued(
    isolated: tuple[Client, str], engine: Engine, services: RunServices
) -> None:
    client, prefix = isolated
    good = held_out_strips(8, seed=2)
    bad = list(good)
    bad[1] = {"image": good[1]["image"][:7]}  # 7 rows
    bad[2] = {"image": [[17.0] * 8 for _ in range(8)]}  # out of range
    bad[3] = {"image": [[math.nan] * 8 for _ in range(8)]}  # NaN
    bad[4] = {"image": [[] for _ in range(8)]}  # k = 0
    bad[5] = {"image": [[0.0] * (8 * 33) for _ in range(8)]}  # k = 33
    bad[6] = {"image": [[0.0] * 12 for _ in range(8)]}  # not a multiple of 8
    bad[7] = "not an object"
    before = _counts(engine)
    with pytest.raises(InvalidInputError) as caught:
        client.submit("digits", bad)
    assert [index for index, _ in caught.value.problems] == [1, 2, 3, 4, 5, 6, 7]
    reasons = dict(caught.value.problems)
    assert "8 rows" in reasons[1]
    assert "less than or equal to 16" in reasons[2]
    assert "finite" in reasons[3]
    assert "k in 1..32, got 0" in reasons[4]
    assert "got 264" in reasons[5]
    assert "item 7:" in str(caught.value)
    assert _counts(engine) == before
    broker = redis.Redis.from_url(services.broker_url)
    assert list(broker.scan_iter(match=f"{prefix}*")) == []

    # The same checks see a valid submission (so they can fail).
    batch = client.submit("digits", good)
    assert _counts(engine)[0] == before[0] + 1
    # A batch this small is split by the client itself: its sub-tasks' messages are queued.
    assert broker.llen(f"{prefix}model.digit-classifier") >= 1
    batch.cancel()


def test_no_inputs_and_unknown_pipeline_are_refused(isolated: tuple[Client, str]) -> None:
    client, _ = isolated
    with pytest.raises(InvalidInputError, match="no inputs"):
        client.submit("digits", [])
    with pytest.raises(UnknownPipelineError, match="known: digits"):
        client.submit("nope", held_out_strips(1))
