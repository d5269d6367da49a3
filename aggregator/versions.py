"""Which version of each model scored each input of a result page, as stored in
`result_pages.versions` (revision 0014)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

# A served code of an input: the index of its model's stream (version), or this when the
# model scored none of its rows (failed, cancelled, never split).
UNSCORED = -1


def _pinned_code(pinned: str | None, versions: Sequence[str | None]) -> int:
    """The served code of an input scored by the pinned version: its stream; UNSCORED for a
    model nothing pinned (a batch split before revision 0010); else a code no input has (the
    pinned version has no stream: every input differs)."""
    if pinned in versions:
        return versions.index(pinned)
    return UNSCORED if pinned is None else UNSCORED - 1


class ResultVersions:
    """Per input of a page, where its versions differ from the batch's pinned ones: built from
    each model's served codes in a few array operations and one JSON text per distinct
    combination (a handful), never per input."""

    def __init__(self, pinned: Mapping[str, str], streams: Mapping[str, Sequence[str | None]]) -> None:
        """`pinned`: the batch's `model_versions`; `streams`: per model, the version of each of
        its streams, in the order their served codes count them."""
        self._streams = streams
        self._pinned_code = {model: _pinned_code(pinned.get(model), versions) for model, versions in streams.items()}

    def page_json(self, served: Mapping[str, np.ndarray]) -> str | None:
        """The page's `result_pages.versions` JSON text from each model's served codes (one
        per input), or None when every input has the pinned versions."""
        # Each input's combination as one number: per model a digit, 0 for the pinned
        # version, 1 + (code - UNSCORED) otherwise.
        combination: np.ndarray | None = None
        for model, versions in self._streams.items():
            codes = served[model]
            radix = len(versions) + 2
            digit = np.where(codes == self._pinned_code[model], 0, codes.astype(np.int64) - UNSCORED + 1)
            combination = digit if combination is None else combination * radix + digit
        if combination is None or not combination.any():
            return None
        distinct, inverse = np.unique(combination, return_inverse=True)
        texts = np.array([self._entry(int(number)) for number in distinct], dtype=object)
        return "[" + ",".join(texts[inverse].tolist()) + "]"

    def _entry(self, combination: int) -> str:
        """One input's JSON entry: null, or {model: version or null} of the models that differ."""
        override: dict[str, str | None] = {}
        for model in reversed(list(self._streams)):
            versions = self._streams[model]
            combination, digit = divmod(combination, len(versions) + 2)
            if digit:
                code = digit - 1 + UNSCORED
                override[model] = None if code == UNSCORED else versions[code]
        return json.dumps(dict(reversed(override.items()))) if override else "null"
