"""`pipeline up` / `pipeline demo`: the embedded services (when no URL is set),
migrations, model workers, the aggregator and Flower, as child processes that
stop together."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from pipeline import ledger
from pipeline.embedded import ServiceUrls, ensure_services, stop_services
from pipeline.settings import Settings
from pipeline.training import missing_models, train_models

STOP_TIMEOUT_S = 30


def flower_args(port: int, user: str, password: str) -> list[str]:
    """Python's arguments that run Flower on 127.0.0.1:`port` behind basic auth. It loads the
    `pipeline.flower` app, which reads the broker URL and key prefix from `PIPELINE_*`."""
    return [
        "-m",
        "celery",
        "--app",
        "pipeline.flower",
        "flower",
        "--address=127.0.0.1",
        f"--port={port}",
        f"--basic-auth={user}:{password}",
    ]


class Stack:
    """A running deployment on this machine; use as a context manager."""

    def __init__(self, settings: Settings, *, flower: bool, log_dir: Path | None = None) -> None:
        self.settings = settings
        self.flower = flower
        self.log_dir = log_dir
        self.urls: ServiceUrls | None = None
        self.flower_password: str | None = None
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    @property
    def service_urls(self) -> ServiceUrls:
        """The URLs of the running services (inside the `with` block)."""
        assert self.urls is not None, "the stack is not running"
        return self.urls

    @property
    def resolved_settings(self) -> Settings:
        """The settings with the concrete service URLs, for a client in this process."""
        urls = self.service_urls
        return self.settings.model_copy(update={"database_url": urls.database_url, "broker_url": urls.broker_url})

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.processes.append((name, subprocess.Popen(argv, env=env, stdout=output, stderr=output)))

    def __enter__(self) -> Stack:
        s = self.settings
        self.urls = ensure_services(s.database_url, s.broker_url, s.data_dir)
        try:
            ledger.migrate(self.urls.database_url)
            missing = missing_models(s.resolved_models_dir)
            if missing:
                print(f"training models: {', '.join(missing)}", flush=True)
                train_models(s.resolved_models_dir, missing)
            env = dict(
                os.environ,
                PIPELINE_DATABASE_URL=self.urls.database_url,
                PIPELINE_BROKER_URL=self.urls.broker_url,
                PIPELINE_MODELS_DIR=str(s.resolved_models_dir.resolve()),
            )
            self._spawn("worker", [sys.executable, "-m", "workers"], env)
            self._spawn("aggregator", [sys.executable, "-m", "aggregator"], env)
            if self.flower:
                self.flower_password = s.flower_password or secrets.token_urlsafe(12)
                self._spawn(
                    "flower", [sys.executable, *flower_args(s.flower_port, s.flower_user, self.flower_password)], env
                )
        except BaseException:
            self.stop()
            raise
        return self

    def wait(self) -> None:
        """Block until a child process exits (or Ctrl-C)."""
        os.wait()

    def stop(self) -> None:
        """Stop the child processes (SIGTERM: workers finish their current sub-task),
        then the embedded services if this stack started them."""
        for _, process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in self.processes:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self.urls is not None and self.urls.started:
            stop_services(self.settings.data_dir)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
