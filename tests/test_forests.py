"""pipeline.forests: the tree-ensemble shortcuts give scikit-learn's own numbers, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier, IsolationForest, RandomForestClassifier

from pipeline.forests import boosting_proba, forest_proba, isolation_decision
from pipeline.pipelines.digits import dataset_split as digits_split
from pipeline.pipelines.screening import dataset_split as screening_split


@pytest.mark.parametrize("rows", [1, 7, 2000])
def test_forest_proba_gives_scikit_learns_probabilities(rows: int) -> None:
    X_train, X_test, y_train, _ = screening_split()
    forest = RandomForestClassifier(n_estimators=25, min_samples_leaf=2, random_state=0).fit(X_train, y_train)
    X = np.resize(X_test, (rows, X_test.shape[1])).astype("<f4")
    np.testing.assert_array_equal(forest_proba(forest, X), forest.predict_proba(X))


@pytest.mark.parametrize("rows", [1, 7, 2000])
def test_forest_proba_sends_missing_values_where_each_node_learnt_to(rows: int) -> None:
    X_train, X_test, y_train, _ = screening_split()
    rng = np.random.default_rng(0)
    X_train = np.where(rng.random(X_train.shape) < 0.2, np.nan, X_train)
    forest = RandomForestClassifier(n_estimators=25, random_state=0).fit(X_train, y_train)
    X = np.resize(X_test, (rows, X_test.shape[1])).astype("<f4")
    X[rng.random(X.shape) < 0.3] = np.nan
    np.testing.assert_array_equal(forest_proba(forest, X), forest.predict_proba(X))


@pytest.mark.parametrize("init", [None, "zero"])
def test_boosting_proba_gives_scikit_learns_probabilities(init: str | None) -> None:
    X_train, X_test, y_train, _ = screening_split()
    binary = GradientBoostingClassifier(n_estimators=40, max_depth=2, init=init, random_state=0).fit(X_train, y_train)
    digits_train, digits_test, digit_labels, _ = digits_split()
    # Ten classes: ten trees a stage.
    multiclass = GradientBoostingClassifier(n_estimators=5, max_depth=3, init=init, random_state=0).fit(
        digits_train, digit_labels
    )
    for model, X in ((binary, X_test), (multiclass, digits_test)):
        X = X.astype("<f4")
        one_row_calls = np.concatenate([boosting_proba(model, row[None, :]) for row in X[:40]])
        np.testing.assert_array_equal(one_row_calls, model.predict_proba(X[:40]))
        np.testing.assert_array_equal(boosting_proba(model, X[:7]), model.predict_proba(X[:7]))
        np.testing.assert_array_equal(boosting_proba(model, X), model.predict_proba(X))


@pytest.mark.parametrize("rows", [1, 7, 2000])
def test_isolation_decision_gives_scikit_learns_scores(rows: int) -> None:
    X_train, X_test, _, _ = digits_split()
    forest = IsolationForest(n_estimators=50, contamination=0.01, random_state=0).fit(X_train)
    noise = np.random.default_rng(0).uniform(0, 16, size=(rows, X_test.shape[1]))
    X = np.concatenate([np.resize(X_test, (rows, X_test.shape[1])), noise]).astype("<f4")
    np.testing.assert_array_equal(isolation_decision(forest, X), forest.decision_function(X))


def test_the_packed_walk_adds_one_row_s_trees_in_their_order() -> None:
    # One row's terms lie along a contiguous axis, which numpy's `sum` adds pairwise: the
    # scores then differ from scikit-learn's in the last bits for some rows.
    X_train, X_test, _, _ = digits_split()
    forest = IsolationForest(n_estimators=200, contamination=0.01, random_state=0).fit(X_train)
    rows = X_test[:50].astype("<f4")
    scores = np.concatenate([isolation_decision(forest, row[None, :]) for row in rows])
    np.testing.assert_array_equal(scores, forest.decision_function(rows))


def test_isolation_decision_refuses_a_forest_on_a_feature_subset() -> None:
    X_train, _, _, _ = digits_split()
    forest = IsolationForest(n_estimators=5, max_features=0.5, random_state=0).fit(X_train)
    with pytest.raises(ValueError, match="every feature"):
        isolation_decision(forest, X_train[:3].astype("<f4"))
