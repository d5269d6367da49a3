"""The Docker deployment, checked without a Docker engine: the compose files parse and
hold the services docs/deploy.md describes, every service runs a real command of the
installed package, `.env.example` names exactly the settings the code reads (and every
variable the compose files need), and the model workers cover every registered model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MAIN = "docker-compose.yml"
WORKERS = "docker-compose.workers.yml"
ENV_EXAMPLE = ROOT / ".env.example"
# `NAME=` or `# NAME=` at the start of a line of .env.example.
ENV_NAME = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)
# A compose interpolation: `${NAME}`, `${NAME:-default}`, `${NAME:?message}`.
INTERPOLATION = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(:?[-?])?")
SETTINGS_VARIABLES = {f"PIPELINE_{name.upper()}" for name in Settings.model_fields}
BIN = Path(sys.executable).parent


def _compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def _pipeline_services(name: str) -> dict[str, dict[str, Any]]:
    """The services of compose file `name` that run the pipeline's image (built from the Dockerfile)."""
    return {service: spec for service, spec in _compose(name)["services"].items() if "build" in spec}


def _models_of(command: list[str]) -> list[str]:
    return command[command.index("--models") + 1].split(",")


def _registered_models() -> list[str]:
    """Every model a container registers: the shipped pipelines, without this test run's extra ones."""
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_PIPELINES"}
    script = "import json; from pipeline import registry; print(json.dumps(sorted(registry.all_models())))"
    listed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(listed.stdout)


def test_main_compose_file_has_every_service_and_only_flower_publishes_a_port() -> None:
    services = _compose(MAIN)["services"]
    assert set(services) == {
        "postgres",
        "redis",
        "rabbitmq",
        "migrate",
        "worker-digits",
        "worker-screening",
        "aggregator",
        "flower",
    }
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert all("profiles" not in spec for name, spec in services.items() if name != "rabbitmq")
    # Scalable: no fixed container name; no host port but Flower's, on loopback.
    assert all("container_name" not in spec for spec in services.values())
    assert [name for name, spec in services.items() if "ports" in spec] == ["flower"]
    assert all(port.startswith("127.0.0.1:") for port in services["flower"]["ports"])


def test_postgres_and_redis_persist_and_report_health() -> None:
    services = _compose(MAIN)["services"]
    for name in ("postgres", "redis", "rabbitmq"):
        assert services[name]["volumes"], name
        assert services[name]["healthcheck"]["test"], name
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis[redis.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")


def test_migrate_runs_once_before_every_long_running_role() -> None:
    services = _pipeline_services(MAIN)
    assert services["migrate"]["command"] == ["pipeline", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("worker-digits", "worker-screening", "aggregator"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name


def test_no_secret_has_a_default() -> None:
    """Compose refuses to start (`${NAME:?message}`) while a password is unset or empty."""
    secrets = [(var, op) for var, op in INTERPOLATION.findall((ROOT / MAIN).read_text()) if "PASSWORD" in var]
    assert {var for var, _ in secrets} == {
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "RABBITMQ_PASSWORD",
        "PIPELINE_FLOWER_PASSWORD",
    }
    assert all(op == ":?" for _, op in secrets), secrets


def test_worker_hosts_must_name_both_services() -> None:
    """A worker host has no PostgreSQL or broker of its own to default to."""
    used = INTERPOLATION.findall((ROOT / WORKERS).read_text())
    urls = [(var, op) for var, op in used if var.endswith("_URL")]
    assert {var for var, _ in urls} == {"PIPELINE_DATABASE_URL", "PIPELINE_BROKER_URL"}
    assert all(op == ":?" for _, op in urls), urls


@pytest.mark.parametrize(
    ("name", "service"),
    [(name, service) for name in (MAIN, WORKERS) for service in _pipeline_services(name)],
)
@pytest.mark.services  # runs each command in a process of its own
def test_service_command_is_a_real_entry_point(name: str, service: str) -> None:
    """The command, run with `--help` through the installed console script, is known."""
    command = _pipeline_services(name)[service]["command"]
    assert command[0] in {"pipeline", "celery"}, command
    # URLs nothing answers on: `--help` must reach no service, and must not start embedded ones.
    # Compose refuses to start without the Flower password, and pipeline.flower refuses to load without it.
    env = {
        **os.environ,
        "PIPELINE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "PIPELINE_BROKER_URL": "redis://127.0.0.1:1/0",
        "PIPELINE_FLOWER_PASSWORD": "set-by-compose",
    }
    argv = [str(BIN / command[0]), *command[1:], "--help"]
    ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    # `celery --app APP flower`: the sub-command follows the app.
    subcommand = command[3] if command[1] == "--app" else command[1]
    assert ran.stdout.startswith(f"Usage: {command[0]} {subcommand}"), ran.stdout
    if command[0] == "pipeline":
        # `pipeline worker` passes unknown options on, so `--help` alone would not catch a typo.
        from pipeline.cli import main

        known = {option for param in main.commands[command[1]].params for option in param.opts}
        assert {arg.split("=")[0] for arg in command[2:] if arg.startswith("-")} <= known, command


def test_flower_options_are_flower_options() -> None:
    """`celery flower --help` accepts any argument (they pass to Tornado), so check the names here."""
    from flower.options import options

    flower = _pipeline_services(MAIN)["flower"]
    # The pipeline.flower app reads the broker URL and key prefix as the workers do.
    assert flower["command"][:4] == ["celery", "--app", "pipeline.flower", "flower"]
    for argument in flower["command"][4:]:
        assert argument.lstrip("-").split("=")[0] in options, argument
    # Basic auth through the environment (pipeline.flower hands it to Flower), never the command line.
    assert not any("auth" in argument for argument in flower["command"])
    assert flower["environment"]["PIPELINE_FLOWER_PASSWORD"].startswith("${PIPELINE_FLOWER_PASSWORD:?")
    assert "PIPELINE_BROKER_URL" in flower["environment"]


def test_metrics_endpoint_binds_every_interface_only_inside_compose() -> None:
    """The setting's default keeps /metrics on the host's loopback; the compose aggregator
    binds 0.0.0.0 for Prometheus inside the network, and still publishes no port."""
    assert Settings.model_fields["metrics_address"].default == "127.0.0.1"
    aggregator = _pipeline_services(MAIN)["aggregator"]
    assert aggregator["environment"]["PIPELINE_METRICS_ADDRESS"] == "0.0.0.0"
    # The service's own environment replaces the shared one: the URLs must still be there.
    assert {"PIPELINE_DATABASE_URL", "PIPELINE_BROKER_URL"} <= set(aggregator["environment"])
    assert "ports" not in aggregator


def test_env_example_names_every_setting_and_no_other() -> None:
    named = {var for var in ENV_NAME.findall(ENV_EXAMPLE.read_text()) if var.startswith("PIPELINE_")}
    assert SETTINGS_VARIABLES - named == set(), "settings missing from .env.example"
    assert named - SETTINGS_VARIABLES == set(), ".env.example names PIPELINE_* variables no setting reads"


@pytest.mark.parametrize("name", [MAIN, WORKERS])
def test_compose_variables_are_settings_or_in_env_example(name: str) -> None:
    compose = _compose(name)
    used = {var for var, _ in INTERPOLATION.findall((ROOT / name).read_text())}
    for spec in compose["services"].values():
        environment = spec.get("environment", {})
        used |= {var for var in environment if var.startswith("PIPELINE_")}
    assert {var for var in used if var.startswith("PIPELINE_")} - SETTINGS_VARIABLES == set()
    assert used - set(ENV_NAME.findall(ENV_EXAMPLE.read_text())) == set(), "variables missing from .env.example"


@pytest.mark.services  # asks each worker command in a process of its own
@pytest.mark.parametrize("name", [MAIN, WORKERS])
def test_worker_services_cover_every_registered_model(name: str) -> None:
    workers = {
        service: _models_of(spec["command"])
        for service, spec in _pipeline_services(name).items()
        if spec["command"][:2] == ["pipeline", "worker"]
    }
    assert set(workers) == {"worker-digits", "worker-screening"}
    served = [model for models in workers.values() for model in models]
    assert sorted(served) == _registered_models()


def test_dockerfile_installs_every_package_and_runs_as_a_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert bases and all(base.startswith("python:") and "-slim" in base for base in bases)
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.MULTILINE))
    assert {package.rstrip("*") for package in packages} == copied
    assert "pipeline models train" in dockerfile


def _docker_compose() -> list[str] | None:
    """A Compose v2 command line, where one is installed (no engine needed for `config`)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True).stdout
        if version.lstrip("v").startswith("2"):
            return [standalone]
    return None


@pytest.mark.parametrize(
    "arguments",
    [["-f", MAIN], ["-f", MAIN, "--profile", "rabbitmq"], ["-f", WORKERS]],
    ids=["main", "rabbitmq", "workers"],
)
def test_docker_compose_accepts_the_files(arguments: list[str], tmp_path: Path) -> None:
    """Compose's own validation of the files, with .env.example's secrets filled in."""
    compose = _docker_compose()
    if compose is None:
        pytest.skip("no Docker Compose v2 (`docker compose` or `docker-compose`) is installed")
    filled = re.sub(r"^(\w*PASSWORD)=$", r"\1=secret", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    filled += "PIPELINE_DATABASE_URL=postgresql://pipeline:secret@db:5432/pipeline\n"
    filled += "PIPELINE_BROKER_URL=redis://:secret@redis:6379/0\n"
    (tmp_path / ".env").write_text(filled)
    checked = subprocess.run(
        [*compose, "--env-file", str(tmp_path / ".env"), *arguments, "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
