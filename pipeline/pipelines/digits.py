"""`digits`: read a number written as a strip of handwritten digits.

An input is an 8 x 8k image (k = 1..32 digits side by side, pixels 0..16 as in
scikit-learn's `load_digits`). The splitter cuts it into k tiles of 8 x 8; a
digit classifier and an out-of-distribution guard score every tile on their own
queues; the aggregate is the number read, with its confidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.ensemble import IsolationForest
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.svm import SVC

from pipeline.calibrated import calibrated_proba
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
from pipeline.estimation import top_class_calibration
from pipeline.forests import isolation_decision
from pipeline.gate import NO_LABEL

TILE = 8
MAX_DIGITS = 32
# A strip is sent to review when its least sure digit is below this confidence.
REVIEW_CONFIDENCE = 0.8
CLASSIFIER = "digit-classifier"
OOD_GUARD = "digit-ood"

# Strict: a number, never a bool or a numeric string converted silently.
Pixel = Annotated[float, Strict(), Field(ge=0, le=16, allow_inf_nan=False)]
PIXELS = tuple(f"pixel[{row},{column}]" for row in range(TILE) for column in range(TILE))


class DigitStrip(BaseModel):
    """One strip: `image` is 8 rows of 8*k pixels; `label`, when known, is the k digits."""

    model_config = ConfigDict(extra="forbid")

    image: list[list[Pixel]]
    label: str | None = Field(default=None, pattern=r"^[0-9]+$")

    @model_validator(mode="after")
    def _shape(self) -> DigitStrip:
        if len(self.image) != TILE:
            raise ValueError(f"image must have {TILE} rows, got {len(self.image)}")
        widths = set(map(len, self.image))
        if len(widths) != 1:
            raise ValueError(f"image rows must all have the same length, got lengths {sorted(widths)}")
        width = widths.pop()
        if width % TILE or not 1 <= width // TILE <= MAX_DIGITS:
            raise ValueError(f"image rows must have 8*k numbers with k in 1..{MAX_DIGITS}, got {width}")
        if self.label is not None and len(self.label) != width // TILE:
            raise ValueError(f"label has {len(self.label)} digits but the image has {width // TILE}")
        return self

    @property
    def digits(self) -> int:
        return len(self.image[0]) // TILE


@lru_cache(maxsize=1)
def dataset_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train / held-out halves of `load_digits`: (X_train, X_test, y_train, y_test)."""
    data = load_digits()
    return tuple(train_test_split(data.data, data.target, test_size=0.5, random_state=0, stratify=data.target))


def held_out_strips(count: int, max_digits: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """Build `count` labelled strips of 1..max_digits digits from the held-out half."""
    _, X_test, _, y_test = dataset_split()
    rng = np.random.default_rng(seed)
    strips = []
    for _ in range(count):
        chosen = rng.integers(0, len(X_test), size=int(rng.integers(1, max_digits + 1)))
        tiles = X_test[chosen].reshape(-1, TILE, TILE)
        strips.append({"image": np.hstack(list(tiles)).tolist(), "label": "".join(str(d) for d in y_test[chosen])})
    return strips


def _classifier() -> CalibratedClassifierCV:
    return CalibratedClassifierCV(SVC(gamma=0.001, C=10.0), method="isotonic", ensemble=True)


def _train_classifier() -> TrainedModel:
    """The classifier, and its CBPE calibration fitted on out-of-fold probabilities of the
    training half (its own isotonic outputs run under-confident on unseen digits)."""
    X_train, X_test, y_train, y_test = dataset_split()
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    out_of_fold = cross_val_predict(_classifier(), X_train, y_train, cv=folds, method="predict_proba")
    model = _classifier().fit(X_train, y_train)
    accuracy = float((model.predict_proba(X_test).argmax(axis=1) == y_test).mean())
    config = {"cbpe_calibration": top_class_calibration(out_of_fold, y_train)}
    return TrainedModel(model, {"held_out_accuracy": accuracy}, reference=X_train, config=config)


def _predict_classifier(model: Any, X: np.ndarray) -> np.ndarray:
    # The same numbers as `predict_proba`, a third of its time on a few rows.
    return np.asarray(calibrated_proba(model, X))


def _train_ood_guard() -> TrainedModel:
    X_train, X_test, _, _ = dataset_split()
    model = IsolationForest(contamination=0.01, random_state=0).fit(X_train)
    noise = np.random.default_rng(0).uniform(0, 16, size=(500, TILE * TILE))
    return TrainedModel(
        model,
        {
            "held_out_in_distribution_rate": float((model.predict(X_test) == 1).mean()),
            "noise_in_distribution_rate": float((model.predict(noise) == 1).mean()),
        },
        reference=X_train,
    )


def _confidence(output: np.ndarray) -> np.ndarray:
    return np.asarray(output.max(axis=1))


def _predict_ood_guard(model: Any, X: np.ndarray) -> np.ndarray:
    score = isolation_decision(model, X)
    return np.column_stack([score, score >= 0])


class DigitsKpis(Kpis):
    def __init__(self) -> None:
        self.items = self.failed = self.reviewed = 0
        self.labelled = self.numbers_right = self.digits_labelled = self.digits_right = 0

    def add(self, item: BaseModel, result: dict[str, Any] | None) -> None:
        assert isinstance(item, DigitStrip)
        self.items += 1
        if result is None:
            self.failed += 1
            return
        self.reviewed += bool(result["needs_review"])
        if item.label is not None:
            self.labelled += 1
            self.numbers_right += result["text"] == item.label
            self.digits_labelled += len(item.label)
            self.digits_right += sum(a == b for a, b in zip(result["text"], item.label))

    def summary(self) -> dict[str, Any]:
        answered = self.items - self.failed
        return {
            "items": self.items,
            "failed_items": self.failed,
            "review_rate": self.reviewed / answered if answered else None,
            "labelled_items": self.labelled,
            "whole_number_accuracy": self.numbers_right / self.labelled if self.labelled else None,
            "digit_accuracy": self.digits_right / self.digits_labelled if self.digits_labelled else None,
        }


def tile_labels(items: np.ndarray, offsets: np.ndarray, labels: Mapping[int, Any]) -> np.ndarray:
    """`RowLabels` of the digit classifier: a strip's rows are its tiles left to right, so row
    `offset` of a strip is labelled by the label's digit `offset` (its decision, the most
    probable class, is the digit). NO_LABEL past the end of a label shorter than the strip."""
    found = []
    for item, offset in zip(items.tolist(), offsets.tolist()):
        label = labels.get(item)
        found.append(int(label[offset]) if label is not None and offset < len(label) else NO_LABEL)
    return np.array(found, dtype=np.int64)


class DigitsPipeline(Pipeline):
    name = "digits"
    input_model = DigitStrip
    # The digits of the strip, as text.
    label_type = Annotated[str, Field(strict=True, pattern=r"^[0-9]+$", max_length=MAX_DIGITS)]
    # The classifier reads 98 to 99 % of held-out digits right.
    monitoring = MonitoringConfig(kpi_floors={"digit_accuracy": 0.95})
    # CBPE: the classifier's chance of reading each digit right, so the share of digits read right.
    estimation = Estimation(CLASSIFIER, {"accuracy": "digit_accuracy"})

    def label_counts(self, outputs: Sequence[dict[str, Any] | None], labels: Sequence[Any]) -> dict[str, int]:
        counts = dict.fromkeys(("labelled", "unanswered", "numbers_right", "digits_labelled", "digits_right"), 0)
        for output, label in zip(outputs, labels, strict=True):
            counts["labelled"] += 1
            if output is None:
                counts["unanswered"] += 1
                continue
            counts["numbers_right"] += output["text"] == label
            counts["digits_labelled"] += len(label)
            counts["digits_right"] += sum(read == given for read, given in zip(output["text"], label))
        return counts

    def row_labels(self, model: str) -> RowLabels | None:
        # The OOD guard's in / out of distribution has no ground truth in a strip's digits.
        return tile_labels if model == CLASSIFIER else None

    def estimate_scores(
        self, page: InputPage, outputs: dict[str, PageOutputs], results: list[str | None]
    ) -> tuple[np.ndarray, None]:
        # Each digit of an answered strip, scored by its top probability.
        classified = outputs[CLASSIFIER]
        answered = np.array([result is not None for result in results], dtype=bool)
        return classified.rows[answered[classified.items]].max(axis=1), None

    def realised_kpis(self, counts: dict[str, int]) -> dict[str, float | None]:
        answered = counts["labelled"] - counts["unanswered"]
        accuracy = counts["numbers_right"] / answered if answered else None
        return {
            "accuracy": accuracy,
            "whole_number_accuracy": accuracy,
            "digit_accuracy": counts["digits_right"] / counts["digits_labelled"] if counts["digits_labelled"] else None,
        }

    models = (
        ModelSpec(
            CLASSIFIER,
            TILE * TILE,
            10,
            _train_classifier,
            _predict_classifier,
            chunk_size=1000,
            probabilities=True,
            feature_names=PIXELS,
            score=_confidence,
        ),
        # Output: the isolation score (the watched score), then 1 for in distribution, 0 for not.
        ModelSpec(
            OOD_GUARD,
            TILE * TILE,
            2,
            _train_ood_guard,
            _predict_ood_guard,
            chunk_size=1000,
            feature_names=PIXELS,
            label_columns=(1,),
            labels=(0.0, 1.0),
        ),
    )

    def split(self, items: Sequence[BaseModel]) -> dict[str, ModelRows]:
        tiles = []
        owners = []
        for index, item in enumerate(items):
            assert isinstance(item, DigitStrip)
            image = np.asarray(item.image, dtype=np.float32)
            k = item.digits
            tiles.append(image.reshape(TILE, k, TILE).transpose(1, 0, 2).reshape(k, TILE * TILE))
            owners.append(np.full(k, index, dtype=np.int32))
        rows = ModelRows(np.concatenate(tiles), np.concatenate(owners))
        return {CLASSIFIER: rows, OOD_GUARD: rows}

    def aggregate(self, item: BaseModel, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        probabilities = outputs[CLASSIFIER]
        ood = outputs[OOD_GUARD]
        digits = probabilities.argmax(axis=1)
        confidences = probabilities.max(axis=1)
        in_distribution = ood[:, 1] > 0.5
        confidence = float(confidences.min())
        return {
            "text": "".join(str(int(d)) for d in digits),
            "digits": [
                {"digit": int(d), "confidence": round(float(c), 6), "in_distribution": bool(i)}
                for d, c, i in zip(digits, confidences, in_distribution)
            ],
            "confidence": round(confidence, 6),
            "needs_review": bool(confidence < REVIEW_CONFIDENCE or not in_distribution.all()),
        }

    def kpis(self) -> Kpis:
        return DigitsKpis()
