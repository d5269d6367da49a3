"""Pure logic, no service: chunking, page cutting, the output stream of the aggregate,
final-state rules, result streaming order, the named SQL, what input validation and
settings refuse, and reading a JSON-lines file. `make test-fast` runs these."""

from __future__ import annotations

import gc
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from aggregator.assemble import FailureCauses, ModelOutputStream, final_state
from pipeline import ledger, registry
from pipeline.artifacts import read_manifest
from pipeline.chunker import Chunker
from pipeline.definition import InputPage, ModelRows, ModelSpec, TrainedModel
from pipeline.errors import InputFileError, InvalidInputError, PipelineError, SettingsError, SplitError
from pipeline.garbage import collection_paused
from pipeline.inputs import PAGE_ITEMS, JsonLinesFile, encode_inputs, iter_input_pages, read_ahead
from pipeline.ledger import raw_sql
from pipeline.pipelines.screening import FEATURES as SCREENING_FEATURES
from pipeline.pipelines.screening import dataset_split as screening_split
from pipeline.schema import BatchState, FailurePolicy
from pipeline.settings import Settings
from pipeline.training import train_models
from workers import interactive, models
from workers.interactive import sliced_predict


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
    names = set(raw_sql.RAW)
    assert {"batch_status", "batch_statuses", "new_subtask_ids", "subtask_outputs", "copy_subtasks"} <= names
    assert all(sql.strip() and not sql.lstrip().startswith("--") for sql in raw_sql.RAW.values())
    assert all(sql.startswith("COPY ") for name, sql in raw_sql.RAW.items() if name.startswith("copy_"))


def test_every_named_query_binds_the_same_parameters_on_psycopg() -> None:
    """`pipeline status` runs queries.sql on a plain psycopg connection: each statement's
    `%(name)s` binds are the parameters SQLAlchemy's `text()` finds in it, and no `:name`
    is left (a `::type` cast is kept)."""
    for name, sql in raw_sql.RAW.items():
        converted = raw_sql.for_psycopg(name)
        assert set(re.findall(r"%\((\w+)\)s", converted)) == set(text(sql).compile().params), name
        assert not re.search(r"(?<!:):\w", converted.replace("::", "")), name
        assert converted.count("::") == sql.count("::"), name


# --- inputs: what validation refuses before a batch exists -------------------------------


def _records_frame(count: int = 3) -> pd.DataFrame:
    return pd.DataFrame(np.resize(screening_split()[1], (count, len(SCREENING_FEATURES))), columns=SCREENING_FEATURES)


def _refusal(pipeline: str, inputs: object) -> str:
    with pytest.raises(InvalidInputError) as caught:
        encode_inputs(registry.get_pipeline(pipeline), inputs, 1_000, 1_000_000)
    return str(caught.value)


def test_a_dataframe_with_a_repeated_column_is_refused() -> None:
    frame = _records_frame()
    repeated = pd.concat([frame, frame[[SCREENING_FEATURES[3]]]], axis=1)
    assert f"the DataFrame has the columns {[SCREENING_FEATURES[3]]} more than once" in _refusal("screening", repeated)


def test_a_dataframe_column_the_pipeline_does_not_take_is_refused_by_name() -> None:
    """As a JSON input's unknown key is: one rule for extras whatever the input form."""
    frame = _records_frame().assign(label=[0, 1, 1], patient="x")
    assert "columns pipeline 'screening' does not take: ['patient'] (it takes its feature columns and ['label'])" in (
        _refusal("screening", frame)
    )
    assert "Extra inputs are not permitted" in _refusal(
        "screening", [{"features": dict(zip(SCREENING_FEATURES, range(30))), "patient": "x"}]
    )


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.ones((2, 30), dtype=np.complex128), "the array holds complex128 values"),
        (np.ones((2, 30), dtype=bool), "the array holds bool values"),
        (np.full((2, 30), "1.5"), "the array holds <U3 values"),
        (np.ones((2, 30), dtype=object), "the array holds object values"),
    ],
)
def test_an_array_of_anything_but_numbers_is_refused(values: np.ndarray, reason: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. numpy's ComplexWarning: a refusal, not a warning
        assert reason in _refusal("screening", values)


def test_a_dataframe_feature_column_of_anything_but_numbers_is_refused() -> None:
    frame = _records_frame()
    first, second = SCREENING_FEATURES[:2]
    frame[first] = [True, False, True]
    frame[second] = ["1.5", "2", "3"]
    reason = _refusal("screening", frame)
    # The strings' dtype: `str` from pandas 3, `object` before.
    assert f"feature columns must hold integer or float numbers: {first!r} is bool, {second!r} is " in reason


def test_a_missing_value_in_a_nullable_column_is_refused_as_not_finite() -> None:
    frame = _records_frame()
    frame[SCREENING_FEATURES[0]] = pd.array([1, None, 3], dtype="Int64")
    assert f"item 1: {SCREENING_FEATURES[0]}: not a finite float32 number" in _refusal("screening", frame)


@pytest.mark.parametrize("label", [True, "1", 1.0])
def test_a_label_that_is_not_an_integer_is_not_stored_as_one(label: object) -> None:
    record = {"features": dict(zip(SCREENING_FEATURES, map(float, range(30)))), "label": label}
    assert "item 0: label: Input should be a valid integer" in _refusal("screening", [record])


@pytest.mark.parametrize("labels", [[True, False], ["1", "0"], [1.5, 0.0]])
def test_a_dataframe_label_column_that_is_not_integers_is_refused(labels: list[object]) -> None:
    """A float column of whole numbers is pandas' integer column with a missing value (see
    test_screening); a fraction, a bool or a string is refused."""
    frame = _records_frame(2).assign(label=labels)
    assert "item 0: label: Input should be a valid integer" in _refusal("screening", frame)


def test_numeric_strings_and_bools_are_not_numbers() -> None:
    features = dict(zip(SCREENING_FEATURES, map(float, range(30))))
    reason = _refusal("screening", [{"features": {**features, SCREENING_FEATURES[4]: "4.5"}}])
    assert f"item 0: features.{SCREENING_FEATURES[4]}: Input should be a valid number" in reason
    image = [[0.0] * 8 for _ in range(8)]
    image[2][3] = "7"  # type: ignore[call-overload]
    assert "item 0: image.2.3: Input should be a valid number" in _refusal("digits", [{"image": image}])
    image[2][3] = True  # type: ignore[call-overload]
    assert "item 0: image.2.3: Input should be a valid number" in _refusal("digits", [{"image": image}])


@pytest.mark.parametrize(
    ("inputs", "kind"), [(None, "NoneType"), ("strips.jsonl", "str"), ({"image": []}, "dict"), (42, "int")]
)
def test_inputs_that_are_not_a_collection_of_items_are_refused(inputs: object, kind: str) -> None:
    assert f"the inputs must be a list (or an iterable) of items, not {kind}" in _refusal("digits", inputs)


def test_an_iterable_of_items_is_read_a_page_at_a_time() -> None:
    read = 0

    def points() -> Iterator[dict[str, list[float]]]:
        nonlocal read
        for _ in range(PAGE_ITEMS * 2 + 5):
            read += 1
            yield {"values": [0.5, 1.0, 2.0, 3.0]}

    pages = iter_input_pages(registry.get_pipeline("poison"), points(), 10**6, 10**6)
    first = next(pages)
    assert (first.first, first.count) == (0, PAGE_ITEMS) and read == PAGE_ITEMS
    assert [(page.first, page.count) for page in pages] == [(PAGE_ITEMS, PAGE_ITEMS), (2 * PAGE_ITEMS, 5)]


def test_no_page_is_yielded_after_a_bad_item_and_every_bad_item_is_named() -> None:
    points = [{"values": [0.5, 1.0, 2.0, 3.0]}] * (PAGE_ITEMS * 3)
    points[PAGE_ITEMS + 7] = points[2 * PAGE_ITEMS + 1] = {"values": [1.0]}
    pages = iter_input_pages(registry.get_pipeline("poison"), points, 10**6, 10**6)
    assert next(pages).first == 0
    with pytest.raises(InvalidInputError) as caught:
        next(pages)
    assert [index for index, _ in caught.value.problems] == [PAGE_ITEMS + 7, 2 * PAGE_ITEMS + 1]


def test_the_collector_is_paused_in_a_block_and_resumed_by_the_outermost_only() -> None:
    assert gc.isenabled()
    with collection_paused():
        assert not gc.isenabled()
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled(), "a collector its process turned off stays off"
    finally:
        gc.enable()


def test_a_page_of_items_is_validated_with_the_collector_paused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validating nested items allocates objects the collector would walk again and again
    (pipeline/garbage.py); it runs again between pages."""
    pipeline = registry.get_pipeline("shipments")
    adapter = pipeline.items_adapter
    collector_on: list[bool] = []

    def validate_python(raw: list[object]) -> list[object]:
        collector_on.append(gc.isenabled())
        return adapter.validate_python(raw)

    monkeypatch.setattr(pipeline, "items_adapter", SimpleNamespace(validate_python=validate_python))
    items = pipeline.example_inputs(PAGE_ITEMS + 1)
    pages = list(iter_input_pages(pipeline, items, 10**6, 10**6))
    assert sum(page.count for page in pages) == PAGE_ITEMS + 1
    assert collector_on and not any(collector_on)
    assert gc.isenabled()


# --- a JSON-lines file: bounded reads, refused lines named by FILE:LINE --------------------


def _lines_file(tmp_path: Path, content: bytes, max_item_bytes: int = 1_000) -> JsonLinesFile:
    path = tmp_path / "inputs.jsonl"
    path.write_bytes(content)
    return JsonLinesFile(path, max_item_bytes)


def test_a_json_lines_file_names_the_line_of_each_input(tmp_path: Path) -> None:
    with _lines_file(tmp_path, b'{"a": 1}\r\n\n\n[2]\n  \n3\n"x"') as lines:
        assert list(lines) == [{"a": 1}, [2], 3, "x"]
        assert [lines.line_of(index) for index in range(4)] == [1, 4, 6, 7]
        assert lines.bytes_read == lines.size and lines.count == 4


def test_a_line_longer_than_an_input_may_be_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    # Not JSON past the limit: parsing it would be refused as "not JSON" instead.
    with _lines_file(tmp_path, b"[1]\n[" + b"1," * 50_000 + b"\n[2]\n", max_item_bytes=100) as lines:
        with pytest.raises(InputFileError, match=r"inputs.jsonl:2: longer than 100 bytes, the largest input"):
            list(lines)
        assert lines.bytes_read <= 4 + 102  # the first line, then a bounded read of the second
    with _lines_file(tmp_path, b"[" + b"1," * 48 + b"11]\r\n", max_item_bytes=100) as lines:
        assert list(lines) == [[1] * 48 + [11]]  # exactly the limit, with a CR LF


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[1]\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n", "inputs.jsonl:2: nested too deeply to read"),
        (b"1" * 5_000 + b"\n", "inputs.jsonl:1: an integer of more than 4300 digits"),
        (b"[1]\n{not json\n", "inputs.jsonl:2: not JSON: Expecting property name"),
        (b"[1]\n\xff\n", "inputs.jsonl: not UTF-8 text (line 2)"),
    ],
)
def test_a_line_that_cannot_be_read_is_one_clear_error(tmp_path: Path, content: bytes, reason: str) -> None:
    with _lines_file(tmp_path, content, max_item_bytes=1_000_000) as lines:
        with pytest.raises(InputFileError) as caught:
            list(lines)
    assert reason in str(caught.value) and isinstance(caught.value, PipelineError)


def test_a_missing_input_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="cannot read .*missing.jsonl: No such file"):
        JsonLinesFile(tmp_path / "missing.jsonl", 100)


# --- settings: refused at start-up with one line ------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("digit-classifier: 5", "chunk_sizes: Value error, PIPELINE_CHUNK_SIZES is not JSON: Expecting value"),
        ('{"digit-classifier": 0}', "chunk_sizes.digit-classifier: Input should be greater than 0"),
        ('{"digit-classifier": -5}', "chunk_sizes.digit-classifier: Input should be greater than 0"),
        ('{"digit-classifier": "500"}', "chunk_sizes.digit-classifier: Input should be a valid integer"),
        ("[500]", "chunk_sizes: Input should be a valid dictionary"),
    ],
)
def test_malformed_chunk_sizes_are_refused(value: str, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_CHUNK_SIZES", value)
    with pytest.raises(SettingsError) as caught:
        Settings()
    assert str(caught.value) == f"invalid Settings: {reason}" or reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_chunk_sizes_of_a_model_no_pipeline_has_are_refused() -> None:
    registry.check_chunk_sizes({"digit-classifier": 500})
    with pytest.raises(SettingsError, match="PIPELINE_CHUNK_SIZES names models no pipeline has: digit-clasifier;"):
        registry.check_chunk_sizes({"digit-clasifier": 500})


def test_a_non_numeric_port_is_a_settings_error_without_the_password() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(database_url="postgresql://u:secret-pw@127.0.0.1:abc/db")
    assert "PIPELINE_DATABASE_URL is not a valid URL: Port could not be cast to integer" in str(caught.value)
    assert "secret-pw" not in str(caught.value) and isinstance(caught.value, PipelineError)


def test_a_model_name_that_is_not_a_safe_file_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="unknown model '../evil'"):
        train_models(tmp_path, ["../evil"])
    with pytest.raises(PipelineError, match="not a safe file name"):
        read_manifest(tmp_path, "../evil")


def test_every_ledger_name_is_its_modules_own_object() -> None:
    """`ledger.X` (imported on first use) is X as its module defines it, never a sub-module
    of the same name, and `__all__` names exactly what the package re-exports."""
    import importlib
    import types

    assert sorted(ledger.__all__) == sorted(name for names in ledger._EXPORTS.values() for name in names)
    for module, names in ledger._EXPORTS.items():
        defined = importlib.import_module(f"pipeline.ledger.{module}")
        for name in names:
            value = getattr(ledger, name)
            assert value is getattr(defined, name) and not isinstance(value, types.ModuleType), name


def test_bulk_chunks_are_cut_to_their_predict_time_but_not_below_the_cost_rows() -> None:
    from pipeline.chunker import bulk_chunk_sizes
    from pipeline.ledger.split import COST_MIN_ROWS

    sizes = {"slow": 50_000, "fast": 10_000, "unmeasured": 7_000, "very-slow": 20_000}
    costs = {"slow": 4e-6, "fast": 2e-7, "very-slow": 1e-3, "not-in-this-pipeline": 1e-6}
    # 40 ms at 4 µs a row: 10,000 rows; the fast model keeps its own smaller size; the
    # very slow one is held at the rows that measure a cost.
    assert bulk_chunk_sizes(sizes, costs, 40.0) == {
        "slow": 10_000,
        "fast": 10_000,
        "unmeasured": 7_000,
        "very-slow": COST_MIN_ROWS,
    }


def test_a_result_that_is_not_json_is_its_inputs_error_and_not_the_pages() -> None:
    """An aggregate giving NaN (which the ledger's json refuses) or a numpy scalar fails that
    input alone, with the reason; the page's other inputs keep their results."""
    from pipeline.definition import PageOutputs
    from pipeline.inputs import encode_inputs
    from tests.pipelines import CountingKpis

    pipeline = registry.get_pipeline("poison")
    (page,) = encode_inputs(pipeline, [{"values": [0.5, 1.0, 2.0, 3.0]}] * 3, 10, 10_000)
    rows = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]], dtype=np.float32)
    outputs = {"poison-model": PageOutputs(rows, np.arange(3))}
    errors: list[str | None] = [None] * 3
    kpis = CountingKpis()
    results = pipeline.aggregate_page(page, outputs, errors, kpis)
    assert results[0] is not None and results[2] is not None and results[1] is None
    assert errors[1] is not None and "Out of range float values are not JSON compliant" in errors[1]
    assert errors[0] is None and errors[2] is None and kpis.answered == 2


def test_a_page_of_items_is_cut_at_its_stored_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Items are validated a few at a time and a page is cut once its JSON reaches
    PAGE_BYTES; the pages hold every item, in order, as one JSON array each."""
    from pipeline import inputs

    monkeypatch.setattr(inputs, "VALIDATE_ITEMS", 10)
    monkeypatch.setattr(inputs, "PAGE_BYTES", 2000)
    points = [{"values": [float(i), 1.0, 2.0, 3.0]} for i in range(100)]
    pages = encode_inputs(registry.get_pipeline("poison"), points, 10**6, 10**6)
    # About 30 bytes an item: cut after the part of 10 that reaches 2,000 bytes.
    assert [(page.first, page.count) for page in pages] == [(0, 70), (70, 30)]
    assert [item for page in pages for item in page.data or []] == points


def _pages_then(count: int, error: Exception | None, made: list[int]) -> Iterator[InputPage]:
    for first in range(count):
        made.append(first)
        yield InputPage(first, 1, None, [{"n": first}])
    if error is not None:
        raise error


def test_read_ahead_yields_every_page_in_order_then_raises_what_the_pages_raise() -> None:
    made: list[int] = []
    pages = read_ahead(_pages_then(5, InvalidInputError("p", [(5, "bad")]), made))
    seen = []
    with pytest.raises(InvalidInputError, match="bad"):
        for page in pages:
            seen.append(page.first)
    assert seen == made == [0, 1, 2, 3, 4]


def test_read_ahead_stops_its_thread_once_the_caller_stops() -> None:
    made: list[int] = []
    pages = read_ahead(_pages_then(1000, None, made))
    assert next(pages).first == 0
    pages.close()
    deadline = time.monotonic() + 10
    while any(t.name == "read-ahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    # The thread has ended: past the first, only the pages it held or was making were made.
    assert not any(t.name == "read-ahead" for t in threading.enumerate())
    assert len(made) <= 3


def test_a_sliced_predict_gives_the_whole_predict_and_runs_between_its_slices() -> None:
    X = np.arange(1000, dtype=np.float32).reshape(250, 4)
    spec = cast(ModelSpec, SimpleNamespace(predict=lambda estimator, rows: rows.sum(axis=1) * estimator))
    pauses: list[int] = []
    outputs, cpu_s = sliced_predict(spec, 2.0, X, 1e-9, lambda: pauses.append(1))
    np.testing.assert_array_equal(outputs, X.sum(axis=1) * 2.0)
    # The first slice holds 1/8 of the rows: there is a pause at least.
    assert len(pauses) >= 1 and cpu_s >= 0
    one, _ = sliced_predict(spec, 1.0, X[:1], 1e-9, lambda: pauses.append(1))
    assert one.shape == (1,) and len(pauses) >= 1


@pytest.mark.parametrize("cheap_up_to_rows", [0, 32])
def test_a_model_that_costs_much_per_call_gets_slices_long_enough_to_pay_for_it(
    cheap_up_to_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 ms of CPU per call whatever its rows (a forest's per-tree dispatch, say), or only on
    # calls over 32 rows (as `pipeline.forests` walks a few rows through every tree at once):
    # a slice has many rows, so it pays the 1 ms either way.
    def predict(estimator: object, rows: np.ndarray) -> np.ndarray:
        started = time.process_time()
        while len(rows) > cheap_up_to_rows and time.process_time() - started < 0.001:
            pass
        return rows.sum(axis=1)

    monkeypatch.setattr(interactive, "_call_overheads", {})  # no time measured by another test
    X = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    pauses: list[int] = []
    outputs, _ = sliced_predict(
        cast(ModelSpec, SimpleNamespace(predict=predict)), object(), X, 1e-9, lambda: pauses.append(1)
    )
    np.testing.assert_array_equal(outputs, X.sum(axis=1))
    # A slice is at least 1 ms / MAX_CALL_SHARE (20 ms): after the first eighth, the rest in one.
    assert len(pauses) == 1


def test_a_model_version_runs_once_untimed_per_process_until_that_run_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    # A first call's one-time work (the packed trees of `pipeline.forests`) must not reach a
    # sub-task's timed predict, which the roll-out gate compares between versions.
    monkeypatch.setattr(models, "_warmed", set())
    runs: list[str] = []

    def fails_once() -> None:
        runs.append("v1")
        if len(runs) == 1:
            raise RuntimeError("no warm-up")

    with pytest.raises(RuntimeError, match="no warm-up"):
        models.warm_once("m", "v1", fails_once)
    for _ in range(3):
        models.warm_once("m", "v1", fails_once)
        models.warm_once("m", "v2", lambda: runs.append("v2"))
    assert runs == ["v1", "v1", "v2"]
