"""A JSON array kept as its text: how a page of inputs travels between the client, the
ledger and the processes that read it back.

A page's items are serialized once, by pydantic's serializer, and stored as that text; a
reader validates them straight from it (`TypeAdapter.validate_json`), without first
building a Python object per value. Parsing it into Python values, when something asks
for them, is done by pydantic-core (several times faster than the standard library's
`json` on arrays of numbers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any, overload

from pydantic_core import from_json


class JsonArray(Sequence[Any]):
    """A read-only sequence over the values of the JSON array `text` (UTF-8 bytes or str),
    parsed on first use."""

    def __init__(self, text: bytes | str) -> None:
        self.text = text

    @classmethod
    def of_values(cls, values: Iterable[bytes]) -> JsonArray:
        """The array of the already serialized `values` (each one JSON value, as bytes)."""
        return cls(b"[" + b",".join(values) + b"]")

    @classmethod
    def joined(cls, arrays: Sequence[JsonArray]) -> JsonArray:
        """One array of the values of `arrays` (each non-empty, its text as bytes), in order."""
        return cls(b"[" + b",".join(array.as_bytes()[1:-1] for array in arrays) + b"]")

    @cached_property
    def values(self) -> list[Any]:
        """The array's values as Python objects (parsed once)."""
        values = from_json(self.text)
        if not isinstance(values, list):
            raise ValueError(f"a JSON array was expected, not {type(values).__name__}")
        return values

    def as_bytes(self) -> bytes:
        """The array's text as UTF-8 bytes."""
        return self.text if isinstance(self.text, bytes) else self.text.encode()

    def as_str(self) -> str:
        """The array's text as str (what a `text` or `json` column takes)."""
        return self.text if isinstance(self.text, str) else self.text.decode()

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        return self.values[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values)

    def __repr__(self) -> str:
        return f"JsonArray({self.text[:60]!r}{'...' if len(self.text) > 60 else ''})"
