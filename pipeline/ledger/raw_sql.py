"""The ledger's raw SQL, named: read once from `queries.sql` (procrastinate keeps its SQL
the same way), so a reader finds every hand-written statement in one file. Written with
`:name` binds for SQLAlchemy's `text()` (`queries`); `for_psycopg` gives the same statement
to a plain psycopg connection (`listing`). A line `-- include: <name>` stands for a query
defined above it: a statement that shares another's SQL says so instead of copying it. Loads
no SQLAlchemy."""

from __future__ import annotations

import re
from importlib.resources import files

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_INCLUDE = re.compile(r"^\s*-- include: (\w+)\s*$")
# A bind as SQLAlchemy's `text()` finds it: `:name`, not a `::type` cast nor an escaped `\:`.
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")


def _parse(source: str) -> dict[str, str]:
    """Split `source` into its `-- name:` blocks: name → SQL, without comment lines, each
    `-- include:` line replaced by the SQL of the query it names.

    Raises:
        KeyError: an include names no query defined above it.
    """
    parts = _NAME.split(source)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = []
        for line in body.splitlines():
            if (include := _INCLUDE.match(line)) is not None:
                lines.append(queries[include.group(1)])
            elif line.strip() and not line.lstrip().startswith("--"):
                lines.append(line)
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
