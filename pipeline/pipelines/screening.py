"""`screening`: a soft-vote malignancy screen of breast tumour records.

An input is one patient record: the 30 features of scikit-learn's
`load_breast_cancer` and, when ground truth is known, its label (0 = malignant,
1 = benign, as in the data set). Three different models score every record on
their own queues; the aggregate is the mean of their malignant probabilities,
decided at an operating threshold chosen at training time for high recall on
malignant cases (a missed cancer costs far more than a second look).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.artifacts import Manifest, read_manifest
from pipeline.definition import (
    Estimation,
    InputPage,
    Kpis,
    ModelRows,
    ModelSpec,
    MonitoringConfig,
    PageOutputs,
    Pipeline,
    RowLabels,
    TrainedModel,
)
from pipeline.estimation import fit_calibration
from pipeline.forests import boosting_proba, forest_proba
from pipeline.gate import NO_LABEL
from pipeline.profile import outside_range, range_warnings
from pipeline.settings import get_settings

FEATURES: tuple[str, ...] = tuple(str(name) for name in load_breast_cancer().feature_names)
MALIGNANT, BENIGN = 0, 1
LOGREG, FOREST, BOOSTING = "screen-logreg", "screen-forest", "screen-boosting"
MODELS = (LOGREG, FOREST, BOOSTING)


class ScreeningConfig(BaseModel):
    """The screen's knobs. `target_recall` picks the operating threshold at training
    time; a result `needs_review` when its probability is within `review_margin` of
    the threshold, when the models disagree, or when an input value is more than
    `range_margin` times the training range outside it."""

    target_recall: float = Field(default=0.98, gt=0, le=1)
    review_margin: float = Field(default=0.1, ge=0)
    range_margin: float = Field(default=0.5, ge=0)


CONFIG = ScreeningConfig()

# Strict: a number, never a bool or a numeric string converted silently.
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]


class RecordLabel(BaseModel):
    """A record's fields besides its features: the label, when ground truth is known."""

    # Strict: `true`, "1" or 1.0 is refused, not stored as label 1.
    label: Annotated[int, Strict()] | None = Field(default=None, ge=0, le=1, description="0 = malignant, 1 = benign")


class PatientRecord(RecordLabel):
    """One record: `features` maps each of the 30 feature names to its value."""

    model_config = ConfigDict(extra="forbid")

    features: dict[str, Finite]

    @model_validator(mode="after")
    def _all_features(self) -> PatientRecord:
        missing = [name for name in FEATURES if name not in self.features]
        unknown = sorted(set(self.features) - set(FEATURES))
        if missing or unknown:
            raise ValueError(f"features: missing {missing or 'none'}; unknown {unknown or 'none'}")
        return self

    def row(self) -> list[float]:
        return [self.features[name] for name in FEATURES]


@lru_cache(maxsize=1)
def dataset_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train / held-out split of `load_breast_cancer`: (X_train, X_test, y_train, y_test)."""
    data = load_breast_cancer()
    return tuple(train_test_split(data.data, data.target, test_size=0.3, random_state=0, stratify=data.target))


def refit_forest(forest: Any, seed: int, shuffled_labels: bool = False) -> Any:
    """The forest's recipe (its hyper-parameters) fitted again on the training split with
    `random_state=seed`: a retrained challenger; on shuffled labels (a broken one) when
    `shuffled_labels`."""
    from sklearn.base import clone

    X_train, _, y_train, _ = dataset_split()
    y = np.random.default_rng(seed).permutation(y_train) if shuffled_labels else y_train
    return clone(forest).set_params(random_state=seed).fit(X_train, y)


def held_out_records(count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Labelled records of the held-out split: all of them in order, or `count` drawn with replacement."""
    _, X_test, _, y_test = dataset_split()
    rows = np.arange(len(X_test)) if count is None else np.random.default_rng(seed).integers(0, len(X_test), count)
    return [{"features": dict(zip(FEATURES, X_test[row].tolist())), "label": int(y_test[row])} for row in rows.tolist()]


def _estimator(name: str) -> Any:
    if name == LOGREG:
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    if name == FOREST:
        return RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=0, n_jobs=1)
    return GradientBoostingClassifier(n_estimators=150, max_depth=2, learning_rate=0.1, random_state=0)


@lru_cache(maxsize=1)
def _out_of_fold() -> dict[str, np.ndarray]:
    """Each model's out-of-fold malignant probability for every training row (5-fold)."""
    X_train, _, y_train, _ = dataset_split()
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return {
        name: cross_val_predict(_estimator(name), X_train, y_train, cv=folds, method="predict_proba")[:, MALIGNANT]
        for name in MODELS
    }


@lru_cache(maxsize=1)
def _fitted() -> dict[str, Any]:
    X_train, _, y_train, _ = dataset_split()
    return {name: _estimator(name).fit(X_train, y_train) for name in MODELS}


def operating_threshold(p_malignant: np.ndarray, malignant: np.ndarray, target_recall: float) -> float:
    """The highest threshold t such that deciding `p >= t` finds at least `target_recall`
    of the `malignant` rows."""
    scores = np.sort(p_malignant[malignant])
    misses = math.floor((1 - target_recall) * len(scores) + 1e-9)
    return float(scores[misses])


def _screen_rates(p_malignant: np.ndarray, y: np.ndarray, threshold: float) -> tuple[float, float]:
    """(recall on malignant, false-positive rate) of deciding `p >= threshold`."""
    flagged = p_malignant >= threshold
    return float(flagged[y == MALIGNANT].mean()), float(flagged[y == BENIGN].mean())


def _train(name: str) -> TrainedModel:
    """Fit model `name` on the training split. The three models share one operating
    threshold and one CBPE calibration (the soft vote to its chance of being malignant;
    sigmoid, as 398 rows are few for isotonic), both fitted on the soft vote of their
    out-of-fold probabilities, so every manifest stores the same values."""
    X_train, X_test, y_train, y_test = dataset_split()
    oof = _out_of_fold()
    vote = np.mean(list(oof.values()), axis=0)
    threshold = operating_threshold(vote, y_train == MALIGNANT, CONFIG.target_recall)
    fitted = _fitted()
    held_out = {model: fitted[model].predict_proba(X_test)[:, MALIGNANT] for model in MODELS}
    recall, fpr = _screen_rates(np.mean(list(held_out.values()), axis=0), y_test, threshold)
    return TrainedModel(
        fitted[name],
        {
            "held_out_auc": float(roc_auc_score(y_test == MALIGNANT, held_out[name])),
            "ensemble_held_out_recall": recall,
            "ensemble_held_out_false_positive_rate": fpr,
        },
        reference=X_train,
        reference_scores=oof[name],
        config={
            "operating_threshold": threshold,
            "target_recall": CONFIG.target_recall,
            "cbpe_calibration": fit_calibration(vote, y_train == MALIGNANT, method="sigmoid"),
        },
    )


def _predict(model: Any, X: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict_proba(X))


def _malignant_probability(output: np.ndarray) -> np.ndarray:
    return output[:, MALIGNANT]


# Rows per sub-task, from each model's cost per predict call (measured on 2 cores): with
# `forest_proba` the forest costs ~0.5 ms a call plus ~1.5 µs a row, near its best rate from
# 5,000 rows, as are the other two. The forest's 50,000 makes fewer ledger rows and
# messages: a 1,000,000-record batch took 9.1 s end to end with it, 9.7 s with 10,000
# (`python -m bench.run`, README "Performance").
CHUNK_SIZES = {LOGREG: 10_000, FOREST: 50_000, BOOSTING: 10_000}


# The tree ensembles' predictions skip scikit-learn's per-call and per-tree work (the same
# numbers: `pipeline.forests`).
PREDICTS = {LOGREG: _predict, FOREST: forest_proba, BOOSTING: boosting_proba}


def _spec(name: str) -> ModelSpec:
    return ModelSpec(
        name,
        len(FEATURES),
        2,
        lambda: _train(name),
        PREDICTS[name],
        chunk_size=CHUNK_SIZES[name],
        probabilities=True,
        feature_names=FEATURES,
        score=_malignant_probability,
    )


@cache
def _manifests() -> tuple[Manifest, ...]:
    """The three models' manifests, read once per process (restart after retraining)."""
    models_dir = get_settings().resolved_models_dir
    return tuple(read_manifest(models_dir, name) for name in MODELS)


def trained_threshold() -> float:
    """The operating threshold the models were trained with.

    Raises:
        ArtifactError: a manifest is missing.
        ValueError: the manifests disagree (models trained apart with other settings).
    """
    thresholds = {manifest.config.get("operating_threshold") for manifest in _manifests()}
    if len(thresholds) != 1 or (threshold := next(iter(thresholds))) is None:
        raise ValueError(f"the screening models' manifests disagree on the operating threshold: {thresholds}")
    return float(threshold)


@dataclass(frozen=True)
class Screened:
    """A page's screening outcome, one entry per input; `answered` marks the inputs with a result."""

    answered: np.ndarray
    probability: np.ndarray
    votes: np.ndarray  # models x inputs
    malignant: np.ndarray
    disagreement: np.ndarray
    needs_review: np.ndarray
    # Range warnings of the inputs that have any, by index (most have none).
    warnings: dict[int, list[str]]

    def results_json(self) -> list[str | None]:
        """Each answered input's result as JSON text, None for the others. Filled into a
        template rather than dumped per dict: this runs once per input of million-row
        batches (a test checks it against `json.loads`)."""
        warnings = ["[]"] * len(self.answered)
        for index, found in self.warnings.items():
            warnings[index] = json.dumps(found)
        columns = zip(
            self.probability.tolist(),
            np.where(self.malignant, "malignant", "benign").tolist(),
            *self.votes.tolist(),
            np.where(self.disagreement, "true", "false").tolist(),
            np.where(self.needs_review, "true", "false").tolist(),
            warnings,
        )
        return [RESULT_TEMPLATE % values if answered else None for values, answered in zip(columns, self.answered)]


# Probabilities are rounded to 6 decimals, so `%.6f` writes them exactly (and faster than repr).
RESULT_TEMPLATE = (
    '{"malignant_probability": %.6f, "decision": "%s", "votes": {'
    + ", ".join(f"{json.dumps(name)}: %.6f" for name in MODELS)
    + '}, "disagreement": %s, "needs_review": %s, "warnings": %s}'
)


def screen(X: np.ndarray, votes: np.ndarray, answered: np.ndarray) -> Screened:
    """Decide every record of `X` (rows x features) from the models' malignant
    probabilities `votes` (models x rows); rows not `answered` are left undecided."""
    threshold = trained_threshold()
    probability = votes.mean(axis=0)
    malignant = probability >= threshold
    said = votes >= threshold
    disagreement = np.asarray(said.any(axis=0) & ~said.all(axis=0))
    reference = _manifests()[0].reference
    warned = np.zeros(len(X), dtype=bool)
    warnings: dict[int, list[str]] = {}
    if reference is not None:
        warned = outside_range(reference, X, CONFIG.range_margin) & answered
        warnings = {
            row: range_warnings(reference, X[row].tolist(), CONFIG.range_margin)
            for row in np.flatnonzero(warned).tolist()
        }
    needs_review = disagreement | (np.abs(probability - threshold) < CONFIG.review_margin) | warned
    return Screened(
        answered, np.round(probability, 6), np.round(votes, 6), malignant, disagreement, needs_review, warnings
    )


class ScreeningKpis(Kpis):
    """Label-free rates for every batch; recall and false-positive rate over labelled records."""

    def __init__(self) -> None:
        self.items = self.failed = self.reviewed = self.disagreed = self.warned = self.flagged = 0
        self.true_pos = self.false_neg = self.false_pos = self.true_neg = 0

    def add_page(self, screened: Screened, labels: np.ndarray) -> None:
        """Count a page; `labels` holds -1 for an unlabelled record."""
        answered = screened.answered
        flagged = screened.malignant & answered
        self.items += len(answered)
        self.failed += int((~answered).sum())
        self.flagged += int(flagged.sum())
        self.reviewed += int((screened.needs_review & answered).sum())
        self.disagreed += int((screened.disagreement & answered).sum())
        self.warned += len(screened.warnings)
        malignant = answered & (labels == MALIGNANT)
        benign = answered & (labels == BENIGN)
        self.true_pos += int((flagged & malignant).sum())
        self.false_neg += int((~flagged & malignant).sum())
        self.false_pos += int((flagged & benign).sum())
        self.true_neg += int((~flagged & benign).sum())

    def summary(self) -> dict[str, Any]:
        answered = self.items - self.failed
        malignant = self.true_pos + self.false_neg
        benign = self.false_pos + self.true_neg

        def share(count: int, of: int) -> float | None:
            return count / of if of else None

        return {
            "items": self.items,
            "failed_items": self.failed,
            "labelled_items": malignant + benign,
            "recall_malignant": share(self.true_pos, malignant),
            "missed_malignant": self.false_neg if malignant + benign else None,
            "false_positive_rate": share(self.false_pos, benign),
            "malignant_rate": share(self.flagged, answered),
            "disagreement_rate": share(self.disagreed, answered),
            "review_rate": share(self.reviewed, answered),
            "input_warning_rate": share(self.warned, answered),
        }


def _votes(outputs: dict[str, PageOutputs], count: int) -> np.ndarray:
    """The models' malignant probabilities of a page's `count` records (models x records; NaN
    where a model gave none)."""
    votes = np.full((len(MODELS), count), np.nan)
    for model, name in enumerate(MODELS):
        votes[model, outputs[name].items] = outputs[name].rows[:, MALIGNANT]
    return votes


def record_labels(items: np.ndarray, offsets: np.ndarray, labels: Mapping[int, Any]) -> np.ndarray:
    """`RowLabels` of every screening model: one row per record, whose decision (the most
    probable of the columns malignant, benign) numbers its classes as the label does."""
    return np.array([labels.get(item, NO_LABEL) for item in items.tolist()], dtype=np.int64)


class ScreeningPipeline(Pipeline):
    name = "screening"
    input_model = PatientRecord
    models = tuple(_spec(name) for name in MODELS)
    feature_names = FEATURES
    extras_model = RecordLabel
    # 0 = malignant, 1 = benign, as in the data set.
    label_type = Annotated[int, Field(strict=True, ge=0, le=1)]
    # Trained for 98 % recall on malignant records; a window below 90 % is a screen missing cancers.
    monitoring = MonitoringConfig(kpi_floors={"recall_malignant": 0.9})
    # CBPE of the soft vote's decision (malignant is the positive class).
    estimation = Estimation(
        LOGREG, {"accuracy": "accuracy", "recall": "recall_malignant", "false_positive_rate": "false_positive_rate"}
    )

    def label_counts(self, outputs: Sequence[dict[str, Any] | None], labels: Sequence[Any]) -> dict[str, int]:
        counts = dict.fromkeys(("labelled", "unanswered", "true_pos", "false_neg", "false_pos", "true_neg"), 0)
        for output, label in zip(outputs, labels, strict=True):
            counts["labelled"] += 1
            if output is None:
                counts["unanswered"] += 1
                continue
            flagged = output["decision"] == "malignant"
            if label == MALIGNANT:
                counts["true_pos" if flagged else "false_neg"] += 1
            else:
                counts["false_pos" if flagged else "true_neg"] += 1
        return counts

    def realised_kpis(self, counts: dict[str, int]) -> dict[str, float | None]:
        malignant = counts["true_pos"] + counts["false_neg"]
        benign = counts["false_pos"] + counts["true_neg"]

        def share(count: int, of: int) -> float | None:
            return count / of if of else None

        return {
            "accuracy": share(counts["true_pos"] + counts["true_neg"], malignant + benign),
            "recall_malignant": share(counts["true_pos"], malignant),
            "false_positive_rate": share(counts["false_pos"], benign),
        }

    def row_labels(self, model: str) -> RowLabels | None:
        return record_labels

    def item_parts(self, item: BaseModel) -> tuple[list[float], dict[str, Any]]:
        assert isinstance(item, PatientRecord)
        return item.row(), item.model_dump(mode="json", include={"label"}, exclude_defaults=True)

    def make_item(self, features: list[float], extras: dict[str, Any]) -> BaseModel:
        return PatientRecord.model_construct(features=dict(zip(FEATURES, features)), **extras)

    def split_page(self, page: InputPage) -> dict[str, ModelRows]:
        # Every model scores every record as it is: the stored features, not a copy.
        assert page.X is not None, "a feature-vector pipeline's pages carry their features (with_features)"
        rows = ModelRows(page.X, np.arange(page.count), of_inputs=True)
        return {name: rows for name in MODELS}

    def aggregate_page(
        self, page: InputPage, outputs: dict[str, PageOutputs], errors: list[str | None], kpis: Kpis
    ) -> list[str | None]:
        assert isinstance(kpis, ScreeningKpis) and page.X is not None
        votes = _votes(outputs, page.count)
        answered = np.array([error is None for error in errors], dtype=bool)
        for index in np.flatnonzero(answered & np.isnan(votes).any(axis=0)).tolist():
            errors[index] = "aggregate failed: a model gave no output for this record"
            answered[index] = False
        screened = screen(page.X, votes, answered)
        labels = np.array([extra.get("label", -1) for extra in page.data] if page.data else [-1] * page.count)
        kpis.add_page(screened, labels)
        return screened.results_json()

    def estimate_scores(
        self, page: InputPage, outputs: dict[str, PageOutputs], results: list[str | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        # Each answered record's soft vote, and whether it was decided malignant.
        answered = np.array([result is not None for result in results], dtype=bool)
        vote = _votes(outputs, page.count)[:, answered].mean(axis=0)
        return vote, vote >= trained_threshold()

    def kpis(self) -> Kpis:
        return ScreeningKpis()
