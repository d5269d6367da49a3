"""The README's examples, taken from the README itself, run end to end: the custom
pipeline through real `pipeline models train`, worker, aggregator and client
processes, and the Python client example against the session's worker and aggregator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

from pipeline.scratch import delete_keys
from tests.helpers import Processes, RunServices

ROOT = Path(__file__).resolve().parent.parent
CLIENT = """
import json
from pipeline import Client
batch = Client().submit("iris", [{"measurements": [5.1, 3.5, 1.4, 0.2]}, {"measurements": [6.7, 3.0, 5.2, 2.3]}])
status = batch.wait(timeout=120)
print(json.dumps({"state": status.state, "kpis": status.metrics["kpis"],
                  "results": [r.output for r in batch.results()]}))
"""


# Appended to the README's client example: what it did, as one JSON line.
CLIENT_CHECK = """
import json
print(json.dumps({"state": status.state, "final": client.batch(batch.id).status().state,
                  "listed": batch.id in {str(row.id) for row in client.batches(state="succeeded", limit=10)}}))
"""


def _readme_client_example() -> str:
    match = re.search(r"## Python client\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, "README.md lost its Python client example"
    return match.group(1)


def test_readme_client_example_runs(services: RunServices, models_dir: Path, stack: object) -> None:
    env = services.env(models_dir, PYTHONPATH=str(ROOT))
    code = _readme_client_example() + CLIENT_CHECK
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    outcome = json.loads(lines[-1])
    # The batch succeeded; cancelling it afterwards changed nothing.
    assert outcome == {"state": "succeeded", "final": "succeeded", "listed": True}
    # One printed line per input, "<item> <number read>", in input order.
    printed = [line.split() for line in lines if line.split()[0].isdigit()]
    assert [int(fields[0]) for fields in printed] == list(range(100))
    assert all(len(fields) == 2 and fields[1].isdigit() for fields in printed)


def _readme_module() -> str:
    match = re.search(r"```python\n# my_pipelines/iris.py\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, "README.md lost its custom pipeline example"
    return match.group(1)


def test_readme_custom_pipeline_runs(services: RunServices, tmp_path: Path) -> None:
    package = tmp_path / "my_pipelines"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "iris.py").write_text(_readme_module())
    models = tmp_path / "models"
    prefix = f"readme-{uuid.uuid4().hex[:8]}:"  # its own queues: the session's aggregator does not know iris
    env = services.env(
        models,
        PIPELINE_BROKER_PREFIX=prefix,
        PIPELINE_PIPELINES="my_pipelines.iris:IrisPipeline",
        PYTHONPATH=f"{tmp_path}:{ROOT}",
    )
    pipeline_cli = str(Path(sys.executable).parent / "pipeline")
    subprocess.run([pipeline_cli, "models", "train", "--only", "iris-tree"], env=env, check=True, timeout=120)
    processes = Processes(tmp_path)
    try:
        processes.start("worker", ["-m", "workers", "--models", "iris-tree"], env)
        processes.start("aggregator", ["-m", "aggregator", "--concurrency", "1"], env)
        run = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=180)
    finally:
        processes.stop_all()
        delete_keys(services.broker_url, prefix)
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["state"] == "succeeded"
    assert [r["species"] for r in outcome["results"]] == ["setosa", "virginica"]
    assert outcome["kpis"]["species_counts"] == {"setosa": 1, "versicolor": 0, "virginica": 1}
