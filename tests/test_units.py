"""Pure logic, no service: chunking, page cutting, the output stream of the aggregate,
final-state rules, result streaming order and the named SQL. `make test-fast` runs these."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.assemble import FailureCauses, ModelOutputStream, final_state
from pipeline import ledger
from pipeline.definition import InputPage, ModelRows, ModelSpec, TrainedModel
from pipeline.errors import SplitError
from pipeline.ledger import queries
from pipeline.schema import BatchState, FailurePolicy
from pipeline.splitter import Chunker


def _spec(n_features: int = 2, n_outputs: int = 1) -> ModelSpec:
    return ModelSpec(
        "m", n_features=n_features, n_outputs=n_outputs, train=lambda: TrainedModel(None), predict=lambda e, X: X
    )


# --- chunking ------------------------------------------------------------------------------


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=8),
    chunk_size=st.integers(min_value=1, max_value=25),
)
def test_chunker_packs_every_row_once_in_item_order(sizes: list[int], chunk_size: int) -> None:
    chunker = Chunker(_spec(), chunk_size, first_seq=3)
    chunks: list[ledger.NewSubtask] = []
    offset = 0
    for size in sizes:
        X = np.arange(size * 2, dtype=np.float32).reshape(size, 2) + offset * 2
        chunker.add(ModelRows(X, np.arange(size)), offset)
        chunks += chunker.take()
        offset += size
    chunks += chunker.take(final=True)
    items = np.concatenate([c.items for c in chunks]) if chunks else np.empty(0, np.int64)
    assert items.tolist() == list(range(sum(sizes)))
    assert [c.seq for c in chunks] == list(range(3, 3 + len(chunks)))
    assert all(c.rows == chunk_size for c in chunks[:-1]) and all(0 < c.rows <= chunk_size for c in chunks)
    for chunk in chunks:
        rows = np.frombuffer(chunk.payload or b"", dtype="<f4").reshape(chunk.rows, 2)
        assert rows[:, 0].tolist() == (chunk.items * 2).tolist(), "each payload row is its item's row"


def test_chunker_refuses_rows_that_do_not_fit_the_model() -> None:
    chunker = Chunker(_spec(n_features=3), 10)
    with pytest.raises(SplitError, match=r"shape \(4, 2\)"):
        chunker.add(ModelRows(np.zeros((4, 2), np.float32), np.arange(4)), 0)
    with pytest.raises(SplitError, match="3 item indices"):
        chunker.add(ModelRows(np.zeros((4, 3), np.float32), np.arange(3)), 0)


def test_chunker_of_inputs_carries_no_payload_and_refuses_mixing() -> None:
    chunker = Chunker(_spec(), 4)
    chunker.add(ModelRows(np.zeros((5, 2), np.float32), np.arange(5), of_inputs=True), 0)
    chunks = list(chunker.take(final=True))
    assert [c.payload for c in chunks] == [None, None] and [c.rows for c in chunks] == [4, 1]
    chunker.add(ModelRows(np.zeros((1, 2), np.float32), np.arange(1), of_inputs=True), 5)
    with pytest.raises(SplitError, match="mixed"):
        chunker.add(ModelRows(np.zeros((1, 2), np.float32), np.arange(1)), 6)


# --- input pages ---------------------------------------------------------------------------


@given(count=st.integers(min_value=1, max_value=40), data=st.data())
def test_page_cut_keeps_the_inputs_of_its_range(count: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(min_value=100, max_value=100 + count - 1))
    stop = data.draw(st.integers(min_value=start + 1, max_value=100 + count))
    X = np.arange(count * 3, dtype="<f4").reshape(count, 3)
    page = InputPage(100, count, X, [{"i": i} for i in range(count)])
    cut = page.cut(start, stop)
    assert (cut.first, cut.count) == (start, stop - start)
    assert cut.X is not None and cut.data is not None
    assert cut.X[:, 0].tolist() == X[start - 100 : stop - 100, 0].tolist()
    assert [d["i"] for d in cut.data] == list(range(start - 100, stop - 100))
    stored = InputPage.from_stored(cut.first, cut.count, cut.X.tobytes(), cut.data, 3)
    assert stored.X is not None and stored.X.tolist() == cut.X.tolist()


# --- the aggregate's output stream -------------------------------------------------------


def _stream(chunks: Sequence[ledger.SubtaskOutput]) -> ModelOutputStream:
    pending = list(chunks)

    def fetch(before_item: int) -> list[ledger.SubtaskOutput]:
        taken = [c for c in pending if c.items[0] < before_item]
        del pending[: len(taken)]
        return taken

    return ModelOutputStream(_spec(n_outputs=1), fetch)


def _chunk(seq: int, items: list[int], failed: bool = False) -> ledger.SubtaskOutput:
    output = None if failed else np.asarray(items, "<f4").reshape(-1, 1).tobytes()
    return ledger.SubtaskOutput(seq, np.asarray(items), output, "boom" if failed else None)


def test_output_stream_hands_out_rows_page_by_page_across_chunk_boundaries() -> None:
    # Input 3 has two rows, split across chunks 0 and 1; chunk 2 failed (inputs 6, 7).
    stream = _stream([_chunk(0, [0, 1, 2, 3]), _chunk(1, [3, 4, 5]), _chunk(2, [6, 7], failed=True)])
    first, errors = stream.take_page(0, 4)
    assert first.items.tolist() == [0, 1, 2, 3, 3] and first.rows[:, 0].tolist() == [0, 1, 2, 3, 3]
    assert errors == {}
    assert first.of(3).ravel().tolist() == [3, 3] and first.of(1).ravel().tolist() == [1]
    second, errors = stream.take_page(4, 4)
    assert second.items.tolist() == [0, 1] and second.rows[:, 0].tolist() == [4, 5]
    assert errors == {2: "boom", 3: "boom"}


# --- final state ---------------------------------------------------------------------------


def _batch(**fields: object) -> SimpleNamespace:
    defaults: dict[str, object] = dict(
        state=BatchState.aggregating,
        error=None,
        failure_policy=FailurePolicy.best_effort,
        max_failed_fraction=None,
        failed=0,
        total=10,
    )
    return SimpleNamespace(**{**defaults, **fields})


@pytest.mark.parametrize(
    ("batch", "answered", "unanswered", "expected"),
    [
        (_batch(), 10, 0, (BatchState.succeeded, None)),
        (_batch(), 7, 3, (BatchState.partial, None)),
        (_batch(), 0, 10, (BatchState.failed, "no input has a result")),
        (_batch(failure_policy=FailurePolicy.fail_fast, failed=1), 9, 1, (BatchState.failed, ledger.FAIL_FAST_REASON)),
        (_batch(max_failed_fraction=0.1, failed=2), 8, 2, (BatchState.failed, ledger.too_many_failures_reason(0.1))),
        (_batch(max_failed_fraction=0.5, failed=2), 8, 2, (BatchState.partial, None)),
        (_batch(state=BatchState.cancelled), 3, 7, (BatchState.cancelled, None)),
        (_batch(error="deadline passed"), 4, 6, (BatchState.partial, "deadline passed")),
    ],
)
def test_final_state_rules(
    batch: SimpleNamespace, answered: int, unanswered: int, expected: tuple[BatchState, str | None]
) -> None:
    assert final_state(batch, answered, unanswered, FailureCauses()) == expected  # type: ignore[arg-type]


def test_a_failed_batch_names_the_cause_that_left_most_inputs_without_a_result() -> None:
    causes = FailureCauses()
    causes.add("model 'a': boom", 2)
    causes.add("model 'b': ArtifactError: hash differs", 5)
    causes.add("model 'a': boom", 1)
    state, reason = final_state(_batch(), 0, 8, causes)  # type: ignore[arg-type]
    assert state == BatchState.failed
    assert reason == "no input has a result; 5 of 8 inputs without a result: model 'b': ArtifactError: hash differs"


# --- the named SQL -------------------------------------------------------------------------


def test_every_named_query_is_loaded_and_none_is_empty() -> None:
    names = set(queries.RAW)
    assert {"batch_status", "batch_statuses", "new_subtask_ids", "subtask_outputs", "copy_subtasks"} <= names
    assert all(sql.strip() and not sql.lstrip().startswith("--") for sql in queries.RAW.values())
    assert all(sql.startswith("COPY ") for name, sql in queries.RAW.items() if name.startswith("copy_"))
