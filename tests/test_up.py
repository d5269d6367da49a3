"""`pipeline up`: Flower behind basic auth, no secret in its output or on any child's
command line, and every process it started stopped by SIGINT, SIGTERM or SIGHUP, or
when one of them dies."""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from sqlalchemy.engine import make_url

from pipeline.stack import FLOWER_PASSWORD_FILE
from tests.helpers import RunServices, free_port, wait_for

PIPELINE_CLI = str(Path(sys.executable).parent / "pipeline")
DATABASE_PASSWORD = "db-pw-3f9c2a71"
FLOWER_PASSWORD = "flower-pw-8e41d0b5"


def _status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _env(services: RunServices, models_dir: Path, data_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    env = services.env(models_dir, PIPELINE_DATA_DIR=str(data_dir), PIPELINE_FLOWER_PORT=str(port), **overrides)
    del env["PIPELINE_PIPELINES"]  # test-only pipelines are not importable from the console script
    if "PIPELINE_FLOWER_PASSWORD" not in overrides:
        env.pop("PIPELINE_FLOWER_PASSWORD", None)
    return env


def _start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PIPELINE_CLI, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _started(up: subprocess.Popen[bytes], port: int) -> list[psutil.Process]:
    """Every process `up` started (its children and theirs), once Flower, the last one, answers."""
    wait_for(lambda: _status(f"http://127.0.0.1:{port}/") != 0 or up.poll() is not None, 120, "Flower to answer")
    assert up.poll() is None, up.communicate()[0].decode()
    children = psutil.Process(up.pid).children(recursive=True)
    assert len(children) >= 3  # worker, aggregator, flower (and their pool processes)
    return children


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _stop(up: subprocess.Popen[bytes], how: signal.Signals) -> str:
    if up.poll() is None:
        up.send_signal(how)
    return up.communicate(timeout=120)[0].decode()


def _assert_all_stopped(processes: list[psutil.Process], port: int) -> None:
    # An orphaned pool process is reaped by init a moment after its SIGKILL.
    wait_for(lambda: not _alive(processes), 10, f"every process to stop; alive: {_alive(processes)}")
    assert _status(f"http://127.0.0.1:{port}/") == 0, f"port {port} still answers"


def test_up_serves_flower_behind_basic_auth_and_shows_no_secret(
    services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    """The database URL has a password (PostgreSQL's trust auth ignores it): neither it nor
    Flower's is printed or on any child's command line, which every local user can read."""
    port = free_port()
    url = make_url(services.database_url).set(password=DATABASE_PASSWORD).render_as_string(hide_password=False)
    env = _env(
        services,
        models_dir,
        tmp_path,
        port,
        PIPELINE_DATABASE_URL=url,
        PIPELINE_FLOWER_USER="ops",
        PIPELINE_FLOWER_PASSWORD=FLOWER_PASSWORD,
    )
    up = _start(env)
    try:
        children = _started(up, port)
        flower = f"http://127.0.0.1:{port}/"
        assert _status(flower) == 401
        assert _status(flower, "ops:wrong") == 401
        assert _status(flower, f"ops:{FLOWER_PASSWORD}") == 200
        command_lines = [" ".join(child.cmdline()) for child in children]
    finally:
        output = _stop(up, signal.SIGINT)
    assert up.returncode == 0, output
    assert "SIGINT: stopping" in output
    assert "database: postgresql://postgres:***@" in output
    for secret in (DATABASE_PASSWORD, FLOWER_PASSWORD):
        assert secret not in output
        assert not [line for line in command_lines if secret in line]
    _assert_all_stopped(children, port)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda how: how.name)
def test_a_stop_signal_stops_every_process(
    how: signal.Signals, services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    """Without PIPELINE_FLOWER_PASSWORD, `up` generates one into a file only the user can read."""
    port = free_port()
    up = _start(_env(services, models_dir, tmp_path, port))
    try:
        children = _started(up, port)
        password_file = tmp_path / FLOWER_PASSWORD_FILE
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        assert _status(f"http://127.0.0.1:{port}/", f"admin:{password}") == 200
    finally:
        output = _stop(up, how)
    assert up.returncode == 0, output
    assert f"{how.name}: stopping" in output
    assert f"password in {password_file}" in output and password not in output
    _assert_all_stopped(children, port)


def test_a_child_that_dies_stops_up_and_the_others(services: RunServices, models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    up = _start(_env(services, models_dir, tmp_path, port, PIPELINE_FLOWER_PASSWORD=FLOWER_PASSWORD))
    try:
        children = _started(up, port)
        (worker,) = [child for child in psutil.Process(up.pid).children() if "workers" in child.cmdline()]
        os.kill(worker.pid, signal.SIGKILL)
        output = up.communicate(timeout=120)[0].decode()
    finally:
        if up.poll() is None:
            _stop(up, signal.SIGINT)
    assert up.returncode == 1, output
    assert f"Error: the worker (pid {worker.pid}) was killed by SIGKILL: stopping everything" in output
    _assert_all_stopped(children, port)


@pytest.mark.parametrize(
    ("password", "refusal"),
    [
        (None, "Flower needs a password: set PIPELINE_FLOWER_PASSWORD"),
        ("a,b", "must not contain a comma"),
    ],
)
def test_flower_app_refuses_to_run_without_a_usable_password(
    password: str | None, refusal: str, services: RunServices, models_dir: Path
) -> None:
    env = services.env(models_dir)
    env.pop("PIPELINE_FLOWER_PASSWORD", None)
    if password is not None:
        env["PIPELINE_FLOWER_PASSWORD"] = password
    run = subprocess.run([sys.executable, "-c", "import pipeline.flower"], env=env, capture_output=True, text=True)
    assert run.returncode == 1
    assert refusal in run.stderr, run.stderr
