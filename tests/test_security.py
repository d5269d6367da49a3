"""Nothing on the wire can make a worker unpickle: a pickle message crafted to run
code, published straight to a model queue, is refused and never executed."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from pipeline import broker
from pipeline.client import Client
from tests.helpers import Processes, RunServices, wait_for


class CreatesFile:
    """Unpickling this runs `touch <path>`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.path}",)


def _payload(marker: Path) -> bytes:
    # Celery protocol 2 body: (args, kwargs, embed)
    return pickle.dumps(((), {"subtask_id": CreatesFile(marker)}, {}))


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: unpickled, the payload does create its file (so the next test can fail)."""
    marker = tmp_path / "control"
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
        input=_payload(marker),
        check=True,
    )
    assert marker.exists()


def test_pickle_message_on_a_model_queue_is_refused(
    client: Client, stack: Processes, services: RunServices, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    queue = broker.model_queue("digit-ood")
    with client.app.connection_for_write() as connection:
        connection.Producer().publish(
            _payload(marker),
            exchange="",
            routing_key=queue,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"lang": "py", "task": broker.PREDICT_TASK, "id": str(uuid.uuid4()), "retries": 0},
        )
    queues = redis.Redis.from_url(services.broker_url)
    wait_for(
        lambda: (
            queues.llen(services.broker_prefix + queue) == 0 and queues.hlen(services.broker_prefix + "unacked") == 0
        ),
        60,
        "the worker to take the message",
    )
    time.sleep(1)
    assert not marker.exists()
    logs = "".join(path.read_text(errors="replace") for path in stack.log_dir.glob("worker-*.log"))
    assert "Refusing to deserialize untrusted content of type pickle" in logs
