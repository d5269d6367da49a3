"""`pipeline models` (versions in the registry) and `pipeline rollout` (a challenger beside
the champion): thin commands over `pipeline.model_registry` and `pipeline.rollouts`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.states import RolloutMode

if TYPE_CHECKING:
    from pipeline.rollouts import RolloutStatus


from pipeline.cli.base import (
    JSON_OPTION,
    _actor,
    _client,
    _console,
    _writing,
)


@click.group()
def models() -> None:
    """Model artifacts."""


def _model_rows() -> list[dict[str, Any]]:
    """One row per registered model: its queue and chunk size, and its trained artifact (None when untrained)."""
    from pipeline import registry
    from pipeline.artifacts import read_manifest
    from pipeline.errors import ArtifactError
    from pipeline.settings import get_settings

    models_dir = get_settings().resolved_models_dir
    rows = []
    for pipeline in registry.all_pipelines():
        for spec in pipeline.models:
            try:
                manifest = read_manifest(models_dir, spec.name)
            except ArtifactError:
                manifest = None
            rows.append(
                {
                    "pipeline": pipeline.name,
                    "model": spec.name,
                    "queue": f"model.{spec.name}",
                    "chunk_size": spec.chunk_size,
                    "version": None if manifest is None else manifest.version,
                    "trained_at": None if manifest is None else manifest.trained_at,
                    "metrics": None if manifest is None else manifest.metrics,
                }
            )
    return rows


@models.command("list")
@JSON_OPTION
def models_list(as_json: bool) -> None:
    """List registered models and their trained artifacts."""
    from rich.table import Table

    rows = _model_rows()
    if as_json:
        click.echo(json.dumps(rows, default=lambda value: value.isoformat()))
        return
    table = Table("pipeline", "model", "queue", "chunk", "version", "trained", "metrics")
    for row in rows:
        trained = (
            ("not trained", "")
            if row["trained_at"] is None
            else (f"{row['trained_at']:%Y-%m-%d %H:%M}", json.dumps(row["metrics"]))
        )
        table.add_row(
            row["pipeline"], row["model"], row["queue"], str(row["chunk_size"]), row["version"] or "-", *trained
        )
    _console().print(table)


AS_CHALLENGER = click.option(
    "--as",
    "as_alias",
    type=click.Choice(["challenger"]),
    help="Also point the model's challenger alias at the new version (a first version becomes champion).",
)


def _print_registered(model: str, version: str, champion: str | None, metrics: dict[str, Any]) -> None:
    role = " (champion)" if version == champion else ""
    _console().print(f"{model} {version[:12]}{role} {json.dumps(metrics)}")


@models.command("train")
@click.option("--only", help="Comma-separated model names (default: all).")
@AS_CHALLENGER
def models_train(only: str | None, as_alias: str | None) -> None:
    """Train models, write their artifacts to PIPELINE_MODELS_DIR and register each as a
    version (a model's first version becomes its champion)."""
    from pipeline import model_registry
    from pipeline.states import Alias

    client = _client()
    names = [n.strip() for n in only.split(",")] if only else None
    alias = None if as_alias is None else Alias(as_alias)
    trained = model_registry.train(client.engine, client.settings, names, created_by=_actor(), as_alias=alias)
    for manifest, version in trained:
        champion = model_registry.champion(client.engine, manifest.name)
        _print_registered(manifest.name, version, champion, manifest.metrics)


@models.command("register")
@click.argument("model")
@click.argument("file", type=click.Path(path_type=Path))
@AS_CHALLENGER
def models_register(model: str, file: Path, as_alias: str | None) -> None:
    """Check FILE.skops (trusted types only, predicts on the reference rows, output
    guardrails) and register it as a version of MODEL."""
    from pipeline import model_registry
    from pipeline.states import Alias

    try:
        data = file.read_bytes()
    except OSError as error:
        raise click.ClickException(f"cannot read {file}: {error.strerror}") from None
    client = _client()
    alias = None if as_alias is None else Alias(as_alias)
    version = model_registry.register(client.engine, client.settings, model, data, created_by=_actor(), as_alias=alias)
    _print_registered(model, version, model_registry.champion(client.engine, model), {})


@models.command("versions")
@click.argument("model")
@JSON_OPTION
def models_versions(model: str, as_json: bool) -> None:
    """List MODEL's versions, oldest first, with their aliases and metrics."""
    from dataclasses import asdict

    from rich.table import Table

    from pipeline import model_registry

    records = model_registry.versions(_client().engine, model)
    if as_json:
        rows = [{k: v for k, v in asdict(record).items() if k != "manifest"} for record in records]
        click.echo(json.dumps(rows, default=lambda value: value.isoformat()))
        return
    table = Table("version", "aliases", "source", "created", "by", "size", "stored", "metrics")
    for record in records:
        table.add_row(
            record.version[:12],
            ", ".join(record.aliases),
            record.source,
            f"{record.created_at:%Y-%m-%d %H:%M}",
            record.created_by,
            f"{record.size_bytes / 1e6:.1f} MB",
            "database" if record.stored_inline else "store",
            json.dumps(record.metrics),
        )
    _console().print(table)


@models.command("rollback")
@click.argument("model")
@click.option("--to", "to", help="The version to serve (default: the previous champion); a unique prefix will do.")
@click.option("--approved-by", required=True, help="Who approved the change (recorded).")
@click.option("--reason", help="Why (recorded).")
def models_rollback(model: str, to: str | None, approved_by: str, reason: str | None) -> None:
    """Make the previous (or named) version MODEL's champion for new batches, at once."""
    from pipeline import model_registry

    version = model_registry.rollback(_client().engine, model, approved_by=approved_by, to=to, reason=reason)
    _console().print(f"{model}: champion is now {version[:12]}")


@click.group()
def rollout() -> None:
    """Try a challenger model version on live batches: shadow or canary, gate, promote."""


def _print_rollout(status: RolloutStatus) -> None:
    percent = f" {status.percent:g} %" if status.percent is not None else ""
    _console().print(
        f"{status.model}: {status.mode.value}{percent} roll-out {status.id} of {status.version[:12]} is"
        f" {status.state.value} (started by {status.started_by}, {status.batches} batches);"
        f" gate: {status.verdict}" + (f"; {status.reason}" if status.reason else "")
    )
    if status.gate_error is not None:
        error = status.gate_error
        _console().print(
            f"  the gate could not be recomputed {error.after} ({error.at:%Y-%m-%d %H:%M:%S}): {error.error}",
            markup=False,
        )
    if status.gate is not None:
        for check in status.gate.checks:
            _console().print(f"  {check.name}: {check.verdict} ({check.why})", markup=False)


@rollout.command("start")
@click.argument("model")
@click.option("--version", "version", required=True, help="The version to try (a unique prefix will do).")
@click.option("--mode", type=click.Choice([m.value for m in RolloutMode]), required=True)
@click.option("--percent", type=float, help="A canary's share of inputs served by the version (0 < P < 100).")
def rollout_start(model: str, version: str, mode: str, percent: float | None) -> None:
    """Start a roll-out of VERSION of MODEL: new batches follow it from their split on."""
    from pipeline import rollouts

    _print_rollout(
        rollouts.start(
            _client().engine, model, version=version, mode=RolloutMode(mode), percent=percent, started_by=_actor()
        )
    )


@rollout.command("status")
@click.argument("model")
@JSON_OPTION
def rollout_status(model: str, as_json: bool) -> None:
    """MODEL's active roll-out (else its last one), with its gate recomputed."""
    from pipeline import rollouts

    status = rollouts.status(_client().engine, model)
    if as_json:
        click.echo(status.model_dump_json())
        return
    _print_rollout(status)


@rollout.command("promote")
@click.argument("model")
@click.option("--approved-by", required=True, help="Who approved the promotion (recorded).")
@click.option("--reason", help="Why (recorded); required with --force.")
@click.option("--force", is_flag=True, help="Promote without a passing gate (recorded as forced).")
def rollout_promote(model: str, approved_by: str, reason: str | None, force: bool) -> None:
    """Make the roll-out's version MODEL's champion: refused unless the gate is `pass`."""
    from pipeline import rollouts

    _print_rollout(rollouts.promote(_client().engine, model, approved_by=approved_by, reason=reason, force=force))


@rollout.command("abort")
@click.argument("model")
@click.option("--reason", help="Why (recorded).")
def rollout_abort(model: str, reason: str | None) -> None:
    """End MODEL's roll-out; the champion is unchanged."""
    from pipeline import rollouts

    _print_rollout(rollouts.abort(_client().engine, model, actor=_actor(), reason=reason))


@rollout.command("report")
@click.argument("model")
@click.option("--id", "rollout_id", type=int, help="That roll-out of MODEL (ended ones too); default: its latest.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a self-contained HTML page with plots here.",
)
@JSON_OPTION
def rollout_report(model: str, rollout_id: int | None, html_path: Path | None, as_json: bool) -> None:
    """Champion vs challenger side by side: the verdict and its checks, agreement, the flip
    matrix, score differences, predict CPU per row, KPI deltas."""
    from pipeline.rollout_html import write_html
    from pipeline.rollout_report import build, print_rollout_report

    report = build(_client().engine, model, rollout_id)
    if html_path is not None:
        with _writing(html_path):
            write_html(html_path, report)
    if as_json:
        click.echo(report.model_dump_json())
        return
    print_rollout_report(_console(), report)
    if html_path is not None:
        _console().print(f"report written to {html_path}")
