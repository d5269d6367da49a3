"""`pipeline up` / `pipeline demo`: the embedded services (when no URL is set),
migrations, model workers, the aggregator and Flower, as child processes that
stop together.

Each child runs in a session of its own, so a terminal's Ctrl-C or hang-up reaches
only the parent, which stops every child the same way (SIGTERM: a warm shutdown),
whichever of SIGINT, SIGTERM or SIGHUP arrived (`stop_signals`). Secrets reach the
children through their environment, never their command line: `/proc/PID/cmdline`
is readable by every local user, `/proc/PID/environ` only by the owner.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from pipeline import ledger, model_registry
from pipeline.embedded import ServiceUrls, ensure_services, stop_services
from pipeline.settings import Settings
from pipeline.training import missing_models, train_models

# A child still running this long after SIGTERM is killed.
STOP_TIMEOUT_S = 30
# How often `Stack.wait` looks whether a child has exited.
POLL_S = 0.2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The Flower password `pipeline up` generates when PIPELINE_FLOWER_PASSWORD is unset, under PIPELINE_DATA_DIR.
FLOWER_PASSWORD_FILE = "flower-password"


class StopSignal(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived (raised in the main thread by `stop_signals`).

    A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it.
    """

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, the first of SIGINT, SIGTERM or SIGHUP raises `StopSignal`; later
    ones are ignored, so a second Ctrl-C cannot interrupt the stopping it started."""

    def ignore(signum: int, frame: FrameType | None) -> None:
        """A stop is already under way."""

    def stop(signum: int, frame: FrameType | None) -> None:
        for each in STOP_SIGNALS:
            signal.signal(each, ignore)
        raise StopSignal(signum)

    previous = {each: signal.signal(each, stop) for each in STOP_SIGNALS}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


@dataclass(frozen=True)
class ExitedChild:
    """A child process that ended on its own: its role, pid and exit status (negative: killed by that signal)."""

    name: str
    pid: int
    returncode: int

    def __str__(self) -> str:
        if self.returncode < 0:
            how = f"was killed by {signal.Signals(-self.returncode).name}"
        else:
            how = f"exited with code {self.returncode}"
        return f"the {self.name} (pid {self.pid}) {how}"


def flower_args(port: int) -> list[str]:
    """Python's arguments that run Flower on 127.0.0.1:`port`. It loads the `pipeline.flower`
    app, which reads the broker URL, key prefix and basic auth from `PIPELINE_*`."""
    return ["-m", "celery", "--app", "pipeline.flower", "flower", "--address=127.0.0.1", f"--port={port}"]


def stored_flower_password(data_dir: Path) -> tuple[str, Path]:
    """The Flower password kept in `data_dir`/flower-password, generated (and the file created
    readable by this user only) on first use; returns it and the file.

    A file, not the terminal: `up`'s output often ends in logs (a CI job, `tee`, a journal),
    and the same password across restarts keeps a browser's saved login working.
    """
    path = data_dir / FLOWER_PASSWORD_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip(), path
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        password = secrets.token_urlsafe(18)
        file.write(password + "\n")
    return password, path


class Stack:
    """A running deployment on this machine; use as a context manager."""

    def __init__(self, settings: Settings, *, flower: bool, log_dir: Path | None = None) -> None:
        self.settings = settings
        self.flower = flower
        self.log_dir = log_dir
        self.urls: ServiceUrls | None = None
        # Where the generated Flower password is, when PIPELINE_FLOWER_PASSWORD is unset.
        self.flower_password_file: Path | None = None
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
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=output, start_new_session=True)
        self.processes.append((name, process))

    def _flower_env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with the Flower password: the configured one, else the one stored in the data folder."""
        password = self.settings.flower_password
        if password is None:
            password, self.flower_password_file = stored_flower_password(self.settings.data_dir)
        return dict(env, PIPELINE_FLOWER_USER=self.settings.flower_user, PIPELINE_FLOWER_PASSWORD=password)

    def __enter__(self) -> Stack:
        s = self.settings
        self.urls = ensure_services(s.database_url, s.broker_url, s.data_dir)
        try:
            ledger.migrate(self.urls.database_url)
            missing = missing_models(s.resolved_models_dir)
            if missing:
                print(f"training models: {', '.join(missing)}", flush=True)
                train_models(s.resolved_models_dir, missing)
            # Before any batch: the split pins each model's champion.
            engine = ledger.make_engine(self.urls.database_url)
            try:
                model_registry.adopt_models_dir(engine, s, created_by="pipeline up")
            finally:
                engine.dispose()
            env = dict(
                os.environ,
                PIPELINE_DATABASE_URL=self.urls.database_url,
                PIPELINE_BROKER_URL=self.urls.broker_url,
                PIPELINE_MODELS_DIR=str(s.resolved_models_dir.resolve()),
            )
            self._spawn("worker", [sys.executable, "-m", "workers"], env)
            self._spawn("aggregator", [sys.executable, "-m", "aggregator"], env)
            if self.flower:
                self._spawn("flower", [sys.executable, *flower_args(s.flower_port)], self._flower_env(env))
        except BaseException:
            self.stop()
            raise
        return self

    def wait(self) -> ExitedChild:
        """Block until a child process exits; return which and how (a stop signal interrupts
        the wait with `StopSignal` inside `stop_signals`)."""
        while True:
            for name, process in self.processes:
                if process.poll() is not None:
                    return ExitedChild(name, process.pid, process.returncode)
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Stop the child processes (SIGTERM: workers finish their current sub-task; SIGKILL
        after STOP_TIMEOUT_S), then whatever is left in their process groups (the pool of a
        worker that was killed), then the embedded services if this stack started them."""
        for _, process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in self.processes:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the group is empty (the usual case) or its id went to another user's process
        self.processes.clear()
        if self.urls is not None and self.urls.started:
            stop_services(self.settings.data_dir)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
