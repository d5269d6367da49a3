"""A batch's progress on the terminal while `wait(progress=True)` waits: a bar, and a line
naming the queues it waits on that no worker serves."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.batch_handle import BatchHandle
    from pipeline.status import BatchStatus

# How long a queue may go unserved before the bar says so, and how often it is checked.
UNSERVED_CHECK_S = 2.0


class ProgressBar:
    """A batch's progress on the terminal, with a line naming the queues it waits on that no
    worker serves (checked every `UNSERVED_CHECK_S`, from that long after it appears)."""

    def __init__(self, batch: BatchHandle) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._batch = batch
        self._progress = Progress(
            TextColumn(f"batch {batch.id[:8]}"),
            TextColumn("{task.fields[state]:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("sub-tasks"),
            TimeElapsedColumn(),
            TextColumn("[yellow]{task.fields[warning]}"),
        )
        self._task = self._progress.add_task("batch", total=None, state="pending", warning="")
        self._next_check = time.monotonic() + UNSERVED_CHECK_S
        self._warning = ""
        self._progress.start()

    def update(self, status: BatchStatus) -> None:
        if status.finished:
            self._warning = ""
        elif time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + UNSERVED_CHECK_S
            unserved = self._batch.unserved_queues(status)
            self._warning = "; ".join(f"no worker is serving {queue}" for queue in unserved)
        done = status.succeeded + status.failed + status.cancelled
        self._progress.update(
            self._task, total=status.total or None, completed=done, state=status.state.value, warning=self._warning
        )

    def close(self) -> None:
        self._progress.stop()
