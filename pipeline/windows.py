"""Monitoring window specs (`1h`, `24h`, `10000rows`): parsed without the monitoring
machinery, so settings can check `PIPELINE_MONITOR_WINDOWS` cheaply."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from pipeline.errors import InvalidWindowError

WINDOW_SPEC = re.compile(r"^([1-9][0-9]{0,8})(m|h|d|rows)$")
UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
LONGEST_WINDOW = timedelta(days=366)


@dataclass(frozen=True)
class Window:
    """A monitoring window: the last `span` of time, or each model version's last `last_rows` rows."""

    spec: str
    span: timedelta | None
    last_rows: int | None

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """The (exclusive start, inclusive end) of its contributions' finish times at `now`."""
        return (now - self.span if self.span is not None else datetime.min.replace(tzinfo=now.tzinfo)), now


def parse_window(spec: str) -> Window:
    """`30m`, `1h`, `24h`, `7d` (the last so long, up to 366 days) or `10000rows` (each model
    version's newest contributions up to that many rows).

    Raises:
        InvalidWindowError: any other spec.
    """
    match = WINDOW_SPEC.match(spec.strip())
    if match is None:
        raise InvalidWindowError(
            f"window {spec!r} does not parse: give <n>m, <n>h, <n>d (minutes, hours, days) or <n>rows, e.g. 1h or 24h"
        )
    count, unit = int(match.group(1)), match.group(2)
    if unit == "rows":
        return Window(spec.strip(), None, count)
    span = count * UNITS[unit]
    if span > LONGEST_WINDOW:
        raise InvalidWindowError(f"window {spec!r} is longer than {LONGEST_WINDOW.days} days")
    return Window(spec.strip(), span, None)


def parse_windows(specs: str) -> list[Window]:
    """Comma-separated window specs (`PIPELINE_MONITOR_WINDOWS`)."""
    return [parse_window(spec) for spec in specs.split(",") if spec.strip()]
