"""`pipeline up`: Flower behind basic auth, and Ctrl-C stops every process it started."""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from tests.helpers import RunServices, wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def test_up_serves_flower_behind_basic_auth_and_stops_cleanly(
    services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    port = _free_port()
    env = services.env(
        models_dir,
        PIPELINE_DATA_DIR=str(tmp_path),
        PIPELINE_FLOWER_PORT=str(port),
        PIPELINE_FLOWER_USER="ops",
        PIPELINE_FLOWER_PASSWORD="s3cret-pw",
    )
    del env["PIPELINE_PIPELINES"]  # test-only pipelines are not importable from the console script
    up = subprocess.Popen(
        [str(Path(sys.executable).parent / "pipeline"), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _status(url) != 0, 60, "Flower to answer")
        assert _status(url) == 401
        assert _status(url, "ops:wrong") == 401
        assert _status(url, "ops:s3cret-pw") == 200
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3  # worker, aggregator, flower (and their pool processes)
    finally:
        up.send_signal(signal.SIGINT)
        output = up.communicate(timeout=90)[0].decode()
    assert up.returncode == 0, output
    assert "stopping" in output
    assert not [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
