"""The processes a benchmark run starts: long-lived workers, and one-shot commands whose
run is watched so that a worker dying does not leave the harness waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.2


class ProcessDied(RuntimeError):
    """A process of the run exited when it should not have."""


class Processes:
    """Child processes in their own sessions, each logging to `<log_dir>/<name>.log`."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.services: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, argv: list[str], stdout: int | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (the child holds it)
        process = subprocess.Popen(
            argv,
            env=self.env,
            cwd=ROOT,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        return process

    def start(self, name: str, *module_args: str) -> subprocess.Popen[bytes]:
        """Start `python -m *module_args` as a long-lived process of the run."""
        process = self._spawn(name, [sys.executable, "-m", *module_args])
        self.services[name] = process
        return process

    def launch(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start a one-shot command; its stdout is piped, its stderr goes to the log."""
        return self._spawn(name, argv, stdout=subprocess.PIPE)

    def finish(self, name: str, process: subprocess.Popen[bytes], timeout: float) -> str:
        """Wait for a one-shot command; return its stdout.

        Raises:
            ProcessDied: it failed, a long-lived process died meanwhile, or it ran past `timeout`.
        """
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            dead = [n for n, p in self.services.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                why = f"{', '.join(dead)} exited" if dead else f"still running after {timeout:.0f} s"
                raise ProcessDied(f"{name}: {why}; see the logs in {self.log_dir}")
            time.sleep(POLL_S)
        assert process.stdout is not None
        output = process.stdout.read().decode()
        process.stdout.close()
        if process.returncode:
            raise ProcessDied(f"{name} exited with {process.returncode}; see {self.log_dir / (name + '.log')}")
        return output

    def stop_all(self, timeout: float = 30) -> None:
        """SIGTERM every long-lived process, SIGKILL its session after `timeout` s."""
        for process in self.services.values():
            if process.poll() is None:
                process.terminate()
        for process in self.services.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.services.clear()
