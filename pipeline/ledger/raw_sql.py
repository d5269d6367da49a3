"""The ledger's raw SQL, named: read once from `queries.sql` (procrastinate keeps its SQL
the same way), so a reader finds every hand-written statement in one file. Written with
`:name` binds for SQLAlchemy's `text()` (`queries`); `for_psycopg` gives the same statement
to a plain psycopg connection (`listing`). Loads no SQLAlchemy."""

from __future__ import annotations

import re
from importlib.resources import files

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# A bind as SQLAlchemy's `text()` finds it: `:name`, not a `::type` cast nor an escaped `\:`.
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")


def _parse(source: str) -> dict[str, str]:
    """Split `source` into its `-- name:` blocks: name → SQL, without comment lines."""
    parts = _NAME.split(source)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines)
    return queries


RAW: dict[str, str] = _parse(files("pipeline.ledger").joinpath("queries.sql").read_text())


def for_psycopg(name: str) -> str:
    """The named query with psycopg's `%(name)s` binds in place of `:name` (a literal `%`
    doubled, an escaped `\\:` unescaped).

    Raises:
        KeyError: no query has that name.
    """
    return _BIND.sub(r"%(\1)s", RAW[name].replace("%", "%%")).replace("\\:", ":")
