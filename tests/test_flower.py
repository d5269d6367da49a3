"""Flower on the live pipeline, in a real browser. Flower is started as `pipeline up`
starts it (basic auth, the pipeline's Celery app with the run's broker key prefix),
a batch runs, and headless Chromium (Debian's, driven by Playwright) logs in and finds
the running workers on the workers page, the pipeline's tasks on the tasks page and
their queues on the broker page, saving screenshots under tests/artifacts/. That
Flower refuses a request without credentials (401) is checked by tests/test_up.py,
on the same command."""

from __future__ import annotations

import base64
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from pipeline import broker
from pipeline.client import Client
from pipeline.pipelines.digits import held_out_strips
from pipeline.stack import flower_args
from tests.helpers import Processes, RunServices, free_port, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
USER, PASSWORD = "ops", "flower-test-pw"
PIPELINE_TASKS = (broker.SPLIT_TASK, broker.PREDICT_TASK, broker.AGGREGATE_TASK)


def _worker_names(stack: Processes) -> list[str]:
    """The Celery hostnames (up to the '@') of the stack's live worker and aggregator."""
    roles = {"workers": "models", "aggregator": "aggregator"}
    return [
        f"{roles[process.args[2]]}-{process.pid}@"
        for process in stack.running
        if process.poll() is None and process.args[2] in roles
    ]


def _flower_json(url: str) -> dict[str, Any]:
    """GET a Flower JSON `url` with the credentials; {} until Flower answers."""
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError):
        return {}


def _flower_knows(url: str, workers: list[str]) -> bool:
    """Flower has the workers' heartbeat events and, asked over the remote-control channel, their queues."""
    heard = [worker["hostname"] for worker in _flower_json(f"{url}/workers?json=1").get("data", [])]
    # refresh: asks the workers again (at start-up Flower may ask before they answer).
    inspected = [name for name, info in _flower_json(f"{url}/api/workers?refresh=1").items() if "active_queues" in info]
    return all(
        any(name.startswith(worker) for name in heard) and any(name.startswith(worker) for name in inspected)
        for worker in workers
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium to drive: apt-get install -y chromium (`make test` does so as root)"
)
def test_flower_shows_the_live_workers_and_the_pipeline_tasks(
    stack: Processes, client: Client, services: RunServices, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workers = _worker_names(stack)
    assert len(workers) == 2
    env = services.env(models_dir, PIPELINE_FLOWER_USER=USER, PIPELINE_FLOWER_PASSWORD=PASSWORD)
    flower = stack.start("flower", flower_args(port), env)
    try:
        # Flower hears the events before the batch runs, so it sees every task of it.
        wait_for(lambda: _flower_knows(url, workers), 90, "Flower to see the workers and their queues")
        status = client.submit("digits", held_out_strips(20)).wait(timeout=300)
        assert status.state == "succeeded", status.error
        # A batch too big for the client to split itself runs the split task too.
        X = load_breast_cancer().data[np.arange(client.settings.small_batch_items + 1) % 569]
        status = client.submit("screening", X).wait(timeout=300)
        assert status.state == "succeeded", status.error

        ARTIFACTS.mkdir(exist_ok=True)
        screenshots = [ARTIFACTS / f"flower-{page}.png" for page in ("workers", "tasks", "broker")]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            context = browser.new_context(
                http_credentials={"username": USER, "password": PASSWORD}, viewport={"width": 1400, "height": 900}
            )
            page = context.new_page()
            expect.set_options(timeout=30_000)

            page.goto(f"{url}/workers")
            for name in workers:
                expect(page.locator("#workers-table")).to_contain_text(name)
            page.screenshot(path=screenshots[0], full_page=True)

            page.goto(f"{url}/tasks")
            expect(page.locator("#tasks-table tbody")).to_contain_text(broker.PREDICT_TASK)
            page.screenshot(path=screenshots[1], full_page=True)

            # The queues the workers consume (asked over the prefixed remote-control channel).
            page.goto(f"{url}/broker")
            for queue in (broker.model_queue("digit-classifier"), broker.SPLIT_QUEUE, broker.AGGREGATE_QUEUE):
                expect(page.locator("#queue-table")).to_contain_text(queue)
            page.screenshot(path=screenshots[2], full_page=True)

            # Each task by Flower's name filter (the page keeps a filter for its next visit: so last).
            for task in PIPELINE_TASKS:
                page.goto(f"{url}/tasks?name={task}")
                expect(page.locator("#tasks-table tbody")).to_contain_text(task)
            browser.close()
    finally:
        stack.stop(flower)
    with capsys.disabled():
        print(f"\nFlower screenshots: {', '.join(map(str, screenshots))}")
