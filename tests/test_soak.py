"""The chaos soak (issue 11): for `PIPELINE_TEST_SOAK_S` seconds (default 45) several threads
submit batches of mixed sizes, some again under an idempotency key they used before, while
at random the test kills -9 a worker or the aggregator (starting another), flushes the
broker, terminates every PostgreSQL connection, restarts PostgreSQL or Redis, and publishes
a malformed message. At the end every batch succeeded, with every input's one result, its
counters equal to its sub-tasks and one aggregate run; the ledger holds exactly the batches
the submitters were given; and every process the chaos did not kill still runs, or ended on
kombu's Redis reconnection failure only and was restarted, as the deployment's supervisor does
(see KOMBU_RECONNECT_CRASH).

Roll-outs are active throughout (started before the submitters): the digit classifier's
challenger in shadow, the OOD guard's as a canary of CANARY_PERCENT %. At the end every batch
followed both; every shadow sub-task is finished, one per serve sub-task of the classifier,
never counted; every serve sub-task ran the version the batch pinned, the canary's inputs
the ones its hash picks; and each roll-out's gate can be computed.

Settings are a production's, shortened only where recovery waits on them: a lease long
enough for a sub-task on a loaded machine (a short one has the sweeper re-publish what is
merely slow, again and again), a sweep every few seconds.
`PIPELINE_TEST_SOAK_SEED` replays a run's chaos and requests (the seed is in every failure message).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu.exceptions
import numpy as np
import psycopg
import pytest
import redis
import sqlalchemy.exc
from sqlalchemy import text

from pipeline import broker, model_registry, rollouts
from pipeline.chunker import canary_inputs
from pipeline.client import Client
from pipeline.database import libpq_url
from pipeline.pipelines.digits import CLASSIFIER, OOD_GUARD, held_out_strips
from pipeline.states import RolloutMode, RolloutState
from tests.helpers import OwnStack, assert_finished_and_consistent, assert_shadow_twins, rows_per_input, second_version
from tests.malformed import QUEUE_KINDS, Malformed, malformed_messages, publish

SOAK_S = float(os.environ.get("PIPELINE_TEST_SOAK_S", "45"))
SEED = int(os.environ.get("PIPELINE_TEST_SOAK_SEED", str(random.SystemRandom().randrange(2**32))))
# How long the batches may take to finish once the chaos stopped: each loss is recovered by
# the sweeper a lease after it happened, and a loaded machine runs everything slower.
FINAL_WAIT_S = 600.0
LEASE_S = 25.0
SWEEP_INTERVAL_S = 3.0
# Batches above 10 inputs are split by the aggregator, in steps of 25 inputs; smaller ones by
# the client. Odd chunk sizes, so an input's rows straddle sub-tasks.
SMALL_BATCH_ITEMS = 10
SPLIT_STEP_ITEMS = 25
CHUNK_SIZES = {"digit-classifier": 7, "digit-ood": 9}
BATCH_SIZES = (1, 2, 5, 20, 80)
SIZE_WEIGHTS = (4, 3, 3, 2, 1)
SUBMITTERS = 3
# The share of submissions that repeat an earlier request under its key.
REPEAT_SHARE = 0.25
WORKERS = 2
# The default: one process splits while another follows a big batch.
AGGREGATOR_CONCURRENCY = 2
# What `Client.submit` documents it raises while PostgreSQL or Redis restarts or its
# connection was terminated: retried with the same key, which returns the batch if the first
# attempt stored it.
TRANSIENT_SUBMIT_ERRORS = (sqlalchemy.exc.OperationalError, kombu.exceptions.OperationalError)
SUBMIT_RETRY_S = 120.0
# kombu's Redis transport can fail a reconnection while Redis restarts with an AttributeError
# of its own (a closed channel's `connection` is None; celery/kombu#582 and kin): in Celery's
# consumer it is an "Unrecoverable error" that ends the process, in a publish it escapes
# `submit` (the batch is stored; the sweeper publishes what was lost). The deployment's
# supervisor (compose: `restart: unless-stopped`) restarts such a process; the soak does the
# same, and a submitter retries such a publish with its key. Anything else fails the soak.
KOMBU_RECONNECT_CRASH = "Unrecoverable error: AttributeError"
# The OOD guard's canary: the share of inputs its challenger serves.
CANARY_PERCENT = 30.0


@dataclass
class Request:
    """One request a submitter made, under its idempotency key."""

    inputs: list[dict[str, Any]]
    batch_id: str | None = None
    submits: int = 0


@dataclass
class Submitter:
    """A thread's stream of requests through the shared client, until `stop` is set."""

    client: Client
    index: int
    stop: threading.Event
    rng: random.Random
    requests: dict[str, Request] = field(default_factory=dict)
    retried: list[str] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set():
            if self.requests and self.rng.random() < REPEAT_SHARE:
                key = self.rng.choice(list(self.requests))
            else:
                key = f"soak-{self.index}-{len(self.requests)}"
                size = self.rng.choices(BATCH_SIZES, SIZE_WEIGHTS)[0]
                inputs = held_out_strips(size, max_digits=3, seed=self.rng.randrange(2**32))
                self.requests[key] = Request(inputs)
            request = self.requests[key]
            batch_id = self.submit(key, request.inputs)
            assert request.batch_id in (None, batch_id), f"key {key}: batch {request.batch_id}, then {batch_id}"
            request.batch_id = batch_id
            request.submits += 1
            self.stop.wait(self.rng.uniform(0.2, 1.0))

    def submit(self, key: str, inputs: list[dict[str, Any]]) -> str:
        """Submit until the ledger and the broker took the request, retrying transient errors
        with the same key; return the batch id."""
        deadline = time.monotonic() + SUBMIT_RETRY_S
        while True:
            try:
                return self.client.submit("digits", inputs, idempotency_key=key).id
            except (*TRANSIENT_SUBMIT_ERRORS, AttributeError) as error:
                if time.monotonic() > deadline or (isinstance(error, AttributeError) and not _in_kombu(error)):
                    raise
                self.retried.append(f"{type(error).__module__}.{type(error).__name__}")
                time.sleep(0.5)


def _in_kombu(error: BaseException) -> bool:
    """Whether `error` was raised inside kombu (its Redis transport's reconnection)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/kombu/" in frames[-1].filename


@dataclass
class Chaos:
    """The disruptions, and what they did."""

    own: OwnStack
    rng: random.Random
    workers: list[subprocess.Popen[bytes]]
    aggregator: subprocess.Popen[bytes]
    malformed: list[Malformed] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    supervised: list[str] = field(default_factory=list)

    def supervise(self) -> None:
        """Restart a worker or the aggregator that ended on kombu's reconnection failure, as
        the deployment's supervisor would; any other exit fails the soak."""
        for index, process in enumerate(list(self.workers)):
            if process.poll() is not None:
                self.workers[index] = self._restarted(process, "workers", "--concurrency", "1")
        if self.aggregator.poll() is not None:
            self.aggregator = self._restarted(
                self.aggregator, "aggregator", "--concurrency", str(AGGREGATOR_CONCURRENCY)
            )

    def _restarted(self, process: subprocess.Popen[bytes], role: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.own.processes.logs[process.pid].read_text(errors="replace")
        assert KOMBU_RECONNECT_CRASH in log, f"{process.args} exited (code {process.returncode}):\n{log[-3000:]}"
        self.own.processes.running.remove(process)
        self.supervised.append(role)
        return self.own.start(role, *args)

    def actions(self) -> list[Callable[[], None]]:
        return [
            self.kill_worker,
            self.kill_aggregator,
            self.flush_broker,
            self.terminate_connections,
            self.own.restart_postgres,
            self.own.kill_and_restart_redis,
            self.publish_malformed,
        ]

    def run(self, until: float) -> None:
        """Disrupt at random intervals until the monotonic time `until`: every kind of
        disruption in a shuffled round, then another round."""
        started = time.monotonic()
        while True:
            actions = self.actions()
            self.rng.shuffle(actions)
            for action in actions:
                time.sleep(self.rng.uniform(1.0, 6.0))
                self.supervise()
                if time.monotonic() >= until:
                    return
                action()
                self.done.append(f"{time.monotonic() - started:.0f}s {action.__name__}")

    def kill_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        self._kill(victim)
        self.workers.remove(victim)
        self.workers.append(self.own.start("workers", "--concurrency", "1"))

    def kill_aggregator(self) -> None:
        self._kill(self.aggregator)
        self.aggregator = self.own.start("aggregator", "--concurrency", str(AGGREGATOR_CONCURRENCY))

    def _kill(self, victim: subprocess.Popen[bytes]) -> None:
        self.own.kill(victim)

    def flush_broker(self) -> None:
        redis.Redis.from_url(self.own.broker_url).flushall()

    def terminate_connections(self) -> None:
        with psycopg.connect(libpq_url(self.own.database_url), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )

    def publish_malformed(self) -> None:
        kind = self.rng.choice(list(QUEUE_KINDS))
        queue = {
            "model": broker.model_queue(self.rng.choice(list(CHUNK_SIZES))),
            "split": broker.SPLIT_QUEUE,
            "aggregate": broker.AGGREGATE_QUEUE,
        }[kind]
        message = self.rng.choice(malformed_messages(kind))
        publish(self.own.client.app, queue, [message])
        self.malformed.append(message)


@pytest.fixture
def own(tmp_path: Path, models_dir: Path) -> Iterator[OwnStack]:
    stack = OwnStack(
        tmp_path,
        models_dir,
        chunk_sizes=json.dumps(CHUNK_SIZES),
        split_step_items=SPLIT_STEP_ITEMS,
        lease_s=LEASE_S,
        sweep_interval_s=SWEEP_INTERVAL_S,
        small_batch_items=SMALL_BATCH_ITEMS,
    )
    yield stack
    stack.close()


def _unfinished(own: OwnStack) -> list[dict[str, Any]]:
    with own.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT b.id, b.state, b.items, b.split_items, b.total, b.succeeded, b.failed, b.cancelled,"
                " b.aggregate_runs FROM batches b JOIN batch_status USING (id)"
                " WHERE NOT batch_status.results_ready ORDER BY b.created_at"
            )
        ).mappings()
        return [dict(row) for row in rows]


def _unfinished_shadows(own: OwnStack) -> list[dict[str, Any]]:
    with own.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT batch_id, model, seq, state, attempts, lease_until FROM subtasks"
                " WHERE role = 'shadow' AND state IN ('pending', 'dispatched', 'running') ORDER BY id"
            )
        ).mappings()
        return [dict(row) for row in rows]


def _wait_until(own: OwnStack, chaos: Chaos, context: str, unfinished: Callable[[OwnStack], list[Any]]) -> None:
    """Until `unfinished(own)` is empty; fails the soak with what is left after FINAL_WAIT_S."""
    deadline = time.monotonic() + FINAL_WAIT_S
    while left := unfinished(own):
        chaos.supervise()
        if time.monotonic() > deadline:
            listed = "\n".join(str(row) for row in left[:50])
            waited = f"{len(left)} unfinished ({unfinished.__name__}) {FINAL_WAIT_S:.0f} s after the chaos"
            pytest.fail(f"{waited} ({context}):\n{listed}")
        time.sleep(1)


@dataclass(frozen=True)
class SoakRollouts:
    """The soak's roll-outs: per model, its champion and the challenger it tries."""

    champions: dict[str, str]
    challengers: dict[str, str]

    @classmethod
    def start(cls, own: OwnStack, models_dir: Path) -> SoakRollouts:
        """A shadow roll-out of the classifier and a canary of the OOD guard, each of its
        model's artifact registered again as the challenger."""
        models = (CLASSIFIER, OOD_GUARD)
        champions = {model: model_registry.champion(own.engine, model) for model in models}
        challengers = {model: second_version(own.engine, own.client.settings, models_dir, model) for model in models}
        shadow = challengers[CLASSIFIER]
        rollouts.start(own.engine, CLASSIFIER, version=shadow, mode=RolloutMode.shadow, started_by="soak")
        rollouts.start(
            own.engine,
            OOD_GUARD,
            version=challengers[OOD_GUARD],
            mode=RolloutMode.canary,
            percent=CANARY_PERCENT,
            started_by="soak",
        )
        return cls(champions, challengers)

    def assert_held(self, own: OwnStack, batches: list[str], context: str) -> str:
        """The roll-outs' invariants on every batch (see the module's docstring); returns a summary."""
        with own.engine.connect() as conn:
            followed = Counter(
                str(batch_id)
                for (batch_id,) in conn.execute(
                    text("SELECT batch_id FROM rollout_batches JOIN rollouts ON rollouts.id = rollout_id")
                )
            )
            serve = conn.execute(
                text("SELECT batch_id, model, model_version, state, items FROM subtasks WHERE role = 'serve'")
            ).all()
            metrics = dict(conn.execute(text("SELECT id, metrics -> 'model_versions' FROM batches")).all())
            pinned = dict(conn.execute(text("SELECT id, model_versions FROM batches")).all())
        assert {batch: 2 for batch in batches} == dict(followed), f"every batch followed both roll-outs ({context})"
        scored: dict[tuple[str, str], set[str]] = {}
        canary_share = Counter[bool]()
        for row in serve:
            batch_id = str(row.batch_id)
            if row.state == "succeeded":
                scored.setdefault((batch_id, row.model), set()).add(row.model_version)
            if row.model == CLASSIFIER:
                assert row.model_version == self.champions[CLASSIFIER], f"batch {batch_id} ({context})"
                continue
            chosen = canary_inputs(row.batch_id, np.asarray(row.items), CANARY_PERCENT)
            canary_share.update(chosen.tolist())
            version = self.challengers[OOD_GUARD] if chosen.all() else self.champions[OOD_GUARD]
            assert chosen.all() or not chosen.any(), f"batch {batch_id}: a sub-task of both versions ({context})"
            assert row.model_version == version, f"batch {batch_id}: the canary's version ({context})"
        shadows = 0
        for batch_id in batches:
            assert pinned[uuid.UUID(batch_id)] == self.champions, f"batch {batch_id} pinned ({context})"
            for model in (CLASSIFIER, OOD_GUARD):
                assert sorted(metrics[uuid.UUID(batch_id)][model]) == sorted(scored[batch_id, model]), context
            rows = rows_per_input(own.engine, batch_id, CLASSIFIER)
            assert rows == rows_per_input(own.engine, batch_id, OOD_GUARD), f"batch {batch_id} ({context})"
            shadows += assert_shadow_twins(own.engine, batch_id, CLASSIFIER, self.challengers[CLASSIFIER])
        verdicts = []
        for model in (CLASSIFIER, OOD_GUARD):
            status = rollouts.status(own.engine, model)
            assert status.state == RolloutState.active, f"{model}: {status.reason} ({context})"
            assert status.gate is not None and status.gate_error is None, f"{model}: {status.gate_error} ({context})"
            verdicts.append(f"{model} {status.mode.value} {status.verdict} over {status.batches} batches")
        share = canary_share[True] / max(1, canary_share.total())
        return f"{shadows} shadow sub-tasks; canary rows {share:.1%} of the OOD guard's; gates: {', '.join(verdicts)}"


@pytest.mark.services
@pytest.mark.timeout(SOAK_S + FINAL_WAIT_S + 300)
def test_chaos_soak(own: OwnStack, models_dir: Path) -> None:
    rng = random.Random(SEED)
    tried = SoakRollouts.start(own, models_dir)
    workers = [own.start("workers", "--concurrency", "1") for _ in range(WORKERS)]
    aggregator = own.start("aggregator", "--concurrency", str(AGGREGATOR_CONCURRENCY))
    chaos = Chaos(own, random.Random(rng.random()), workers, aggregator)
    stop = threading.Event()
    submitters = [Submitter(own.client, i, stop, random.Random(rng.random())) for i in range(SUBMITTERS)]
    with ThreadPoolExecutor(SUBMITTERS) as pool:
        running = [pool.submit(submitter.run) for submitter in submitters]
        try:
            chaos.run(until=time.monotonic() + SOAK_S)
        finally:
            stop.set()
        for future in running:
            future.result()
    requests = {key: request for submitter in submitters for key, request in submitter.requests.items()}
    context = f"seed {SEED}, {len(requests)} requests, chaos: {', '.join(chaos.done)}"
    chaos_ended = time.monotonic()
    _wait_until(own, chaos, context, _unfinished)
    recovery_s = time.monotonic() - chaos_ended
    # Shadow work is taken after all regular work: it finishes after the batches.
    _wait_until(own, chaos, context, _unfinished_shadows)
    shadows_s = time.monotonic() - chaos_ended

    with own.engine.connect() as conn:
        batches = {str(row.id): row for row in conn.execute(text("SELECT id, state, items, error FROM batches"))}
    given = {request.batch_id: len(request.inputs) for request in requests.values()}
    assert len(given) == len(requests), f"two keys were given one batch ({context})"
    assert {batch_id: row.items for batch_id, row in batches.items()} == given, context
    failed = {batch_id: (row.state, row.error) for batch_id, row in batches.items() if row.state != "succeeded"}
    assert not failed, f"batches not succeeded ({context}): {failed}"
    for batch_id in batches:
        assert_finished_and_consistent(own.engine, batch_id)
    held = tried.assert_held(own, list(batches), context)

    chaos.supervise()  # an exit other than kombu's reconnection failure fails here
    with own.engine.connect() as conn:
        dead_letters = conn.execute(text("SELECT message_id, count(*) FROM dead_letters GROUP BY message_id")).all()
    published = {message.id for message in chaos.malformed}
    assert {message_id for message_id, _ in dead_letters} <= published, "only malformed messages are dead-lettered"
    assert all(count == 1 for _, count in dead_letters), "a malformed message is dead-lettered once"
    print(
        f"soak: {len(requests)} requests ({sum(r.submits for r in requests.values())} submits,"
        f" {sum(given.values())} inputs), {len(chaos.done)} disruptions, all finished {recovery_s:.0f} s"
        f" after the chaos, shadow work {shadows_s:.0f} s; roll-outs: {held};"
        f" submit retries: {Counter(name for s in submitters for name in s.retried)};"
        f" restarted by the supervisor after kombu's reconnection failure: {Counter(chaos.supervised)} ({context})"
    )
