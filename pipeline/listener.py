"""A client's wake-ups: one LISTEN connection, held by one daemon thread, that turns each
`batch_finished` NOTIFY into a wake-up of the threads waiting on that batch.

A waiter subscribes before it reads the batch's status, so a finish committed after the
read still wakes it; a client that submits a batch while it listens already watches it from
before it is stored (`watch`), so its first wait reads nothing until woken. While the
connection is down (PostgreSQL restarted, the backend was terminated) notifications are
lost: once the thread listens again it wakes every waiter, and each reads its batch's
status again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from pipeline.database import libpq_url
from pipeline.ledger import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

# How long the thread waits for a notification before it checks whether it was closed.
IDLE_S = 1.0
# How long the first subscriber waits for the thread's first connection attempt.
CONNECT_WAIT_S = 10.0
# Backoff between reconnection attempts.
RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 5.0
# How the connection shows in pg_stat_activity.
APPLICATION_NAME = "pipeline-client-listener"


class BatchListener:
    """Wakes the threads waiting on a batch when its `batch_finished` notification arrives.

    Safe to share between threads; the thread and its connection start on the first
    `subscription` and end on `close`. `notified` counts the wake-ups a notification
    delivered to a waiter.
    """

    def __init__(self, database_url: str) -> None:
        self._url = libpq_url(database_url)
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        # Set once the thread's first connection attempt is over (listening, or failed).
        self._attempted = threading.Event()
        self._closed = threading.Event()
        # The thread's connection is up and listening.
        self._listening = False
        self.notified = 0

    @contextmanager
    def subscription(self, batch_id: str, watched: threading.Event | None = None) -> Iterator[threading.Event]:
        """Within the block, the returned event is set by every notification of `batch_id`
        (and after a reconnection). Clear it before reading the batch's status, then wait on it.
        `watched`: an event `watch` returned for the batch, used (and released) instead of a new one."""
        woken = watched or threading.Event()
        with self._lock:
            self._waiters.setdefault(batch_id, set()).add(woken)
            if self._thread is None or not self._thread.is_alive():
                self._closed.clear()
                self._thread = threading.Thread(target=self._run, name="batch-listener", daemon=True)
                self._thread.start()
        # Listening before the caller reads the status, so a finish after the read wakes it.
        # Without a connection the caller reads anyway, and is woken once the thread listens.
        self._attempted.wait(CONNECT_WAIT_S)
        try:
            yield woken
        finally:
            self.unwatch(batch_id, woken)

    def watch(self, batch_id: str) -> threading.Event | None:
        """An event set by every notification of `batch_id` from now on (and after a
        reconnection), as `subscription` gives, when the thread is listening already; None
        when it is not (a client that never waited opens no connection for it). Release it with
        `unwatch`, or hand it to `subscription`."""
        woken = threading.Event()
        with self._lock:
            if not self._listening:
                return None
            self._waiters.setdefault(batch_id, set()).add(woken)
        return woken

    def unwatch(self, batch_id: str, woken: threading.Event) -> None:
        """Stop setting `woken` on notifications of `batch_id` (nothing if it was released already)."""
        with self._lock:
            waiters = self._waiters.get(batch_id)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[batch_id]

    def close(self) -> None:
        """Stop the thread; it closes its connection within `IDLE_S`."""
        self._closed.set()

    def _wake(self, batch_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(batch_id, ()))
            self.notified += len(waiters)
        for woken in waiters:
            woken.set()

    def _wake_all(self) -> None:
        with self._lock:
            waiters = [woken for events in self._waiters.values() for woken in events]
        for woken in waiters:
            woken.set()

    def _set_listening(self, listening: bool) -> None:
        with self._lock:
            self._listening = listening

    def _run(self) -> None:
        delay = RECONNECT_FIRST_S
        while not self._closed.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, application_name=APPLICATION_NAME) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    # What finished while nothing listened: every waiter reads its status again
                    # (woken before the first subscriber reads: it clears the wake-up first).
                    self._set_listening(True)
                    self._wake_all()
                    self._attempted.set()
                    delay = RECONNECT_FIRST_S
                    self._dispatch(conn)
                self._set_listening(False)  # closed
            # Any driver error (the server gone, the backend terminated, the socket closed):
            # the connection is useless, open another.
            except psycopg.Error as error:
                # Notifications are lost from here on, until all waiters are woken on reconnection.
                self._set_listening(False)
                self._attempted.set()
                if self._closed.is_set():
                    return  # closed by its client while the connection went down: nothing to report
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                log.warning("batch listener: no connection (%s); reconnecting in %.1f s", reason, delay)
                self._wake_all()
                self._closed.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _dispatch(self, conn: psycopg.Connection[Any]) -> None:
        while not self._closed.is_set():
            for notify in conn.notifies(timeout=IDLE_S):
                self._wake(notify.payload)
