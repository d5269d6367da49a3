"""Deployment settings: every knob in one place, read from `PIPELINE_*` env vars."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.database import ENV_PREFIX, LedgerSettings, well_formed
from pipeline.errors import SettingsError, validation_line

REDIS_SCHEMES = ("redis://", "rediss://")
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


class Settings(BaseSettings, LedgerSettings):
    """Configuration of every role (client, worker, aggregator, CLI).

    With `database_url` / `broker_url` unset, the embedded PostgreSQL and Redis
    under `data_dir` are started (or reused) on first use. `database_url` and `data_dir`
    are `LedgerSettings`' (`pipeline.database`), which `pipeline status` reads alone.

    Raises:
        SettingsError: a value is malformed or out of range (one line naming each; a URL's
            value is never repeated, it may hold a password).
    """

    # An invalid value is not repeated in the error: a URL holds a password.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", hide_input_in_errors=True)

    broker_url: str | None = Field(
        default=None,
        description="Celery broker: a Redis (`redis://`, `rediss://`) or RabbitMQ (`amqp://`, `amqps://`) URL.",
    )
    broker_prefix: str = Field(
        default="",
        description=(
            "Prefix for every broker key, so several deployments (or test runs) share one Redis."
            " Redis only: on RabbitMQ give each deployment a vhost of its own in the URL."
        ),
    )
    visibility_timeout_s: int = Field(
        default=3600,
        description=(
            "Redis re-delivers a message not acknowledged within this time. It must exceed the"
            " longest sub-task plus any retry countdown; the ledger lease, not this, decides"
            " whether a redelivered sub-task runs again."
        ),
    )
    models_dir: Path | None = Field(
        default=None, description="Model artifacts and manifests; default `<data_dir>/models`."
    )
    registry_inline_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description=(
            "Model artifacts up to this size are stored in PostgreSQL (`model_versions.artifact`);"
            " larger ones in PIPELINE_REGISTRY_STORE_DIR, which every host must then mount."
        ),
    )
    registry_store_dir: Path | None = Field(
        default=None,
        description=(
            "Content-addressed store of the artifacts too big for PostgreSQL (`<sha256[:2]>/<sha256>.skops`),"
            " shared by every host; default `<data_dir>/registry`."
        ),
    )
    worker_model_cache: int = Field(
        default=4, ge=1, description="Model versions a worker process keeps loaded (least recently used leaves)."
    )
    pipelines: str = Field(
        default="",
        description="Extra pipelines to register, comma-separated `package.module:attr`.",
    )
    # NoDecode: read as JSON by `_chunk_sizes_json`, which names the variable when it is not JSON.
    chunk_sizes: Annotated[dict[str, Annotated[StrictInt, Field(gt=0)]], NoDecode] = Field(
        default_factory=dict,
        description=(
            'Per-model chunk size overrides, JSON: `{"digit-classifier": 2000}`; each a registered model'
            " and a size of at least 1 (checked when a worker or aggregator starts and on submit). Read by"
            " the splitter."
        ),
    )
    split_step_items: int = Field(
        default=50_000,
        ge=1,
        description=(
            "Inputs per committed step of an aggregator's split (a big batch of packed features;"
            " the client splits a batch of JSON items as it stores it): workers start on the batch"
            " once its first step is published."
        ),
    )
    bulk_chunk_ms: float = Field(
        default=40.0,
        ge=0,
        description=(
            "A bulk batch's sub-tasks are cut so that each one's predict takes about this many"
            " milliseconds of CPU at most (from what the model's recent sub-tasks took per row,"
            " never below 1,000 rows): an interactive sub-task waits at most about this long for"
            " a worker process busy with bulk work. 0: chunks of the models' chunk sizes only."
        ),
    )
    small_batch_items: int = Field(
        default=1000,
        ge=0,
        description=(
            "Batches of at most this many inputs are split by the submitting client, in the"
            " transaction that stores them, and aggregated by the model worker that finishes"
            " their last sub-task: two message hops fewer for their latency. 0: every batch"
            " goes through the aggregator's queues."
        ),
    )
    interactive_slice_ms: float = Field(
        default=5.0,
        ge=0,
        description=(
            "Without an interactive lane: while interactive work comes (10 s after a worker process last saw some), it"
            " predicts a bulk sub-task in slices of about this many milliseconds of CPU (longer"
            " for a model whose per-call cost would add over 5 %) and, between two slices, runs"
            " the interactive sub-tasks of its models submitted meanwhile (announced by a"
            " NOTIFY): an interactive sub-task waits for about one slice, not a whole bulk"
            " sub-task. 0: predicts run whole (those announced during one run right after it)."
        ),
    )
    interactive_lane: bool = Field(
        default=True,
        description=(
            "Each `pipeline worker` also runs an interactive lane: one process outside its pool"
            " that runs interactive sub-tasks of its models only, woken by their NOTIFY at the"
            " commit that stores them, so they wait neither for a message nor for a pool process"
            " busy with bulk work."
        ),
    )
    retry_base_s: float = Field(
        default=1.0, ge=0, description="First retry's backoff; doubles per attempt, with full jitter."
    )
    retry_max_s: float = Field(default=60.0, ge=0, description="Longest retry backoff.")
    db_retry_s: float = Field(
        default=600.0, ge=0, description="How long a worker retries a ledger write while PostgreSQL is unreachable."
    )
    max_batch_items: int = Field(default=5_000_000, ge=1, description="Most inputs one batch may have.")
    max_item_bytes: int = Field(default=1_000_000, ge=1, description="Largest input, as JSON bytes.")
    lease_s: float = Field(default=300.0, gt=0, description="A claimed or dispatched sub-task's lease.")
    sweep_interval_s: float = Field(default=15.0, gt=0, description="How often the sweeper reconciles the ledger.")
    wait_reread_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "How often `batch.wait()` reads its batch's status again when no notification woke it:"
            " a safety net, as every waiter is woken by its own batch's NOTIFY."
        ),
    )
    heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "How often each worker and aggregator records in the ledger (`worker_heartbeats`) the"
            " queues it consumes; a queue without a beat for 3 intervals counts as served by no one."
        ),
    )
    monitor_windows: str = Field(
        default="1h,24h",
        description=(
            "The windows alerts are judged on, comma-separated: `<n>m`, `<n>h`, `<n>d` (the last so"
            " long) or `<n>rows` (each model version's newest rows)."
        ),
    )
    monitor_evaluate_s: float = Field(
        default=60.0,
        ge=0,
        description=(
            "Alerts are judged when a batch finishes, at most once per this many seconds per"
            " pipeline (0: after every batch)."
        ),
    )
    rollout_gate_interval_s: float = Field(
        default=5.0,
        ge=0,
        description=(
            "An active roll-out's gate is recomputed after a batch at most once per this many"
            " seconds; the aggregator's sweeper recomputes what changed since (0: after every batch)."
        ),
    )
    worker_concurrency: int = Field(default=1, ge=1, description="Processes per `pipeline worker`.")
    aggregator_concurrency: int = Field(default=2, ge=1, description="Processes per `pipeline aggregator`.")
    flower_user: str = Field(default="admin", description="Flower basic-auth user.")
    flower_password: str | None = Field(
        default=None, description="Flower basic-auth password; `pipeline up` generates one when unset."
    )
    flower_port: int = Field(default=5555, description="Flower's port (bound to 127.0.0.1 by `pipeline up`).")
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prometheus `/metrics` endpoint served by `pipeline aggregator`; 0 disables it.",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description=(
            "Address the `/metrics` endpoint binds to: this host only by default; `0.0.0.0` where"
            " Prometheus scrapes from elsewhere (docker-compose.yml sets it inside its network)."
        ),
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(validation_line(error)) from None

    @field_validator("chunk_sizes", mode="before")
    @classmethod
    def _chunk_sizes_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as error:
                raise ValueError(f"PIPELINE_CHUNK_SIZES is not JSON: {error}") from None
        return value

    @field_validator("broker_url")
    @classmethod
    def _redis_or_rabbitmq(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(REDIS_SCHEMES + AMQP_SCHEMES):
            raise ValueError("PIPELINE_BROKER_URL must start with redis://, rediss://, amqp:// or amqps://")
        return well_formed("PIPELINE_BROKER_URL", url)

    @field_validator("monitor_windows")
    @classmethod
    def _windows_parse(cls, specs: str) -> str:
        from pipeline.windows import parse_windows

        try:
            parse_windows(specs)
        except ValueError as error:
            raise ValueError(f"PIPELINE_MONITOR_WINDOWS: {error}") from None
        return specs

    @model_validator(mode="after")
    def _prefix_on_redis_only(self) -> Settings:
        if self.broker_prefix and self.broker_url is not None and self.broker_url.startswith(AMQP_SCHEMES):
            raise ValueError(
                "PIPELINE_BROKER_PREFIX works on Redis only; on RabbitMQ give each deployment"
                " a vhost of its own in PIPELINE_BROKER_URL"
            )
        return self

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def resolved_registry_store_dir(self) -> Path:
        return self.registry_store_dir if self.registry_store_dir is not None else self.data_dir / "registry"

    def is_small_batch(self, items: int) -> bool:
        """Whether a batch of `items` inputs takes the small-batch path (`small_batch_items`)."""
        return items <= self.small_batch_items


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
