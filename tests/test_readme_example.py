"""The README's custom pipeline, taken from the README itself, runs end to end
through real `pipeline models train`, worker, aggregator and client processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import Processes, RunServices, delete_keys

ROOT = Path(__file__).resolve().parent.parent
CLIENT = """
import json
from pipeline import Client
batch = Client().submit("iris", [{"measurements": [5.1, 3.5, 1.4, 0.2]}, {"measurements": [6.7, 3.0, 5.2, 2.3]}])
status = batch.wait(timeout=120)
print(json.dumps({"state": status.state, "kpis": status.metrics["kpis"],
                  "results": [r.output for r in batch.results()]}))
"""


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
