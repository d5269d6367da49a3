"""Pausing CPython's cyclic garbage collector while a page of inputs is turned into
objects (validated, split, aggregated) or a page of results is parsed.

The collector runs after every 700 net allocations of tracked objects (dicts, lists,
model instances), and its runs of the older generations walk every live tracked object.
A page of nested JSON items allocates several such objects per item, all kept until the
page is done: the collector then costs several times the work itself (10,000 items of
the test suite's `shipments` pipeline, 8 model objects each: `validate_json` 0.52 s with
the collector, 0.13 s paused). Those objects hold no reference cycles, so nothing waits
for the collector; it resumes at the end of the page with its counts carried over, and
frees any cycle a pipeline's own code made then.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause automatic cyclic garbage collection for the block, when it is enabled (it is
    process-wide: another thread's allocations are not collected meanwhile either; a
    block inside another, or in another thread at the same time, leaves it to the
    outermost to resume it)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
