"""The model registry, every host's one view of each model's versions: register a version
(checked first), list them, find the champion, roll back, and fetch a version's artifact
verified by its SHA-256. The rows are in the ledger (`pipeline.ledger.registry`).

A version is an artifact's SHA-256 (64 hex digits; commands also take a unique prefix of
at least 8). A model's first version becomes its champion, which the split pins on every
new sub-task; a later one serves once it is made champion by `rollback` (a named approver).
Artifacts up to `registry_inline_max_bytes` live in PostgreSQL, larger ones in the
content-addressed `registry_store_dir`.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import skops.io
from sqlalchemy import Connection, Engine

from pipeline import ledger, registry
from pipeline.artifacts import Manifest, model_paths, read_verified, save_model, sha256_of
from pipeline.definition import ModelSpec
from pipeline.errors import (
    ArtifactError,
    FeatureCountError,
    GuardrailViolation,
    InvalidArgumentError,
    InvalidArtifactError,
    NoChampionError,
    RegistryConflictError,
    UnknownVersionError,
)
from pipeline.guardrails import check_output
from pipeline.ledger.connection import Bind, autocommit, connected
from pipeline.profile import ReferenceProfile
from pipeline.settings import Settings
from pipeline.states import Alias, ModelEvent, VersionSource

# The only types an artifact may need beyond skops' defaults: scikit-learn's own. A type
# from anywhere else (builtins, os, a user's module) is refused before anything is loaded.
TRUSTED_MODULE_PREFIXES = ("sklearn.",)
SHORTEST_VERSION_PREFIX = 8


def trusted_types(model: str, data: bytes) -> list[str]:
    """The types beyond skops' defaults that artifact `data` needs, all allowed.

    Raises:
        InvalidArtifactError: not a skops file, or it needs a type outside TRUSTED_MODULE_PREFIXES.
    """
    try:
        needed: list[str] = skops.io.get_untrusted_types(data=data)
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise InvalidArtifactError(f"model {model!r}: not a skops artifact ({type(error).__name__}: {error})") from None
    refused = [name for name in needed if not name.startswith(TRUSTED_MODULE_PREFIXES)]
    if refused:
        raise InvalidArtifactError(
            f"model {model!r}: the artifact needs types outside the allow-list"
            f" {list(TRUSTED_MODULE_PREFIXES)}: {refused}"
        )
    return needed


def load_artifact(model: str, data: bytes, types: Sequence[str]) -> Any:
    """The estimator in `data`, loaded trusting `types` only (after `trusted_types` allowed them).

    Raises:
        InvalidArtifactError: skops cannot load it.
    """
    try:
        return skops.io.loads(data, trusted=list(types))
    # skops raises whatever the broken file's contents lead to; the file is refused with it.
    except Exception as error:  # noqa: BLE001
        raise InvalidArtifactError(f"model {model!r}: skops cannot load the artifact: {error}") from None


def check_estimator(spec: ModelSpec, estimator: Any, reference: ReferenceProfile | None) -> None:
    """Check that `estimator` serves `spec`: its feature count, and its predictions on the
    reference profile's quantile rows (one row of zeros without a profile) pass the output
    guardrails.

    Raises:
        FeatureCountError: it was fitted on another number of features.
        InvalidArtifactError: its predict fails, or its output has the wrong shape or values.
    """
    fitted = getattr(estimator, "n_features_in_", None)
    if fitted is not None and fitted != spec.n_features:
        raise FeatureCountError(
            f"model {spec.name!r} takes {spec.n_features} features; the artifact was fitted on {fitted}"
        )
    X = reference.quantile_rows() if reference is not None else np.zeros((1, spec.n_features), dtype="<f4")
    if X.shape[1] != spec.n_features:
        raise FeatureCountError(f"model {spec.name!r} takes {spec.n_features} features; its reference has {X.shape[1]}")
    try:
        output = spec.predict(estimator, X)
    # An offered artifact may raise anything on predict: it is refused with the reason.
    except Exception as error:  # noqa: BLE001
        raise InvalidArtifactError(
            f"model {spec.name!r}: the artifact fails on the reference rows: {type(error).__name__}: {error}"
        ) from None
    try:
        check_output(spec, output, len(X))
    except GuardrailViolation as error:
        raise InvalidArtifactError(f"the artifact fails the output guardrails: {error}") from None


def store_artifact(store_dir: Path, digest: str, data: bytes) -> str:
    """Write `data` to the content-addressed store (once; atomically); return its path in it."""
    relative = f"{digest[:2]}/{digest}.skops"
    target = store_dir / relative
    if target.exists() and sha256_of(target.read_bytes()) == digest:
        return relative
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
        partial.write(data)
    os.replace(partial.name, target)
    return relative


# A registered version never changes (it is its artifact's SHA-256, registered once with its
# manifest): each process parses a version's manifest once, so an aggregate reads and
# validates none it has seen (with them, their reference profiles' derived arrays stay cached).
MANIFESTS_KEPT = 256
_manifests: OrderedDict[tuple[str, str], Manifest] = OrderedDict()


def registered_manifests(conn: Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Manifest]:
    """The manifests of the (model, version) pairs `keys` that are registered: those this
    process has not parsed yet in one query, the others from its cache."""
    wanted = set(keys)
    missing = sorted(wanted - _manifests.keys())
    for key, manifest in ledger.manifests_of(conn, missing).items():
        _manifests[key] = Manifest.model_validate(manifest)
    found = {}
    for key in wanted & _manifests.keys():
        _manifests.move_to_end(key)
        found[key] = _manifests[key]
    while len(_manifests) > MANIFESTS_KEPT:
        _manifests.popitem(last=False)
    return found


def _champion_manifest(conn: Connection, model: str) -> Manifest | None:
    champion = ledger.aliases_of(conn, [model]).get(model)
    if champion is None:
        return None
    return registered_manifests(conn, [(model, champion)])[(model, champion)]


def register(
    engine: Engine,
    settings: Settings,
    model: str,
    data: bytes,
    *,
    created_by: str,
    manifest: Manifest | None = None,
    as_alias: Alias | None = None,
    source: VersionSource = VersionSource.registered,
) -> str:
    """Check artifact `data` and register it as a version of `model`; return the version.

    Without `manifest` (an artifact trained elsewhere) it gets the champion's reference
    profile and config. The model's first version becomes its champion; `as_alias`
    (challenger only) points that alias at it. Registering an existing version again
    only sets the alias.

    Raises:
        UnknownPipelineError: no pipeline has `model`.
        InvalidArtifactError, FeatureCountError: the artifact cannot serve the model.
        InvalidArgumentError: `as_alias` is champion (that takes `rollback` and an approver).
        RegistryConflictError: the alias changed meanwhile.
    Nothing is written when any of these is raised.
    """
    spec = registry.get_model(model)
    if as_alias == Alias.champion:
        raise InvalidArgumentError("a version becomes champion through `rollback --to VERSION --approved-by NAME`")
    digest = sha256_of(data)
    types = trusted_types(model, data)
    estimator = load_artifact(model, data, types)
    if manifest is None:
        with engine.connect() as conn:
            champion = _champion_manifest(conn, model)
        manifest = Manifest(
            name=model,
            version=digest[:12],
            sha256=digest,
            file=f"{model}.skops",
            trained_at=datetime.now(UTC),
            metrics={},
            trusted_types=types,
            config={} if champion is None else champion.config,
            reference=None if champion is None else champion.reference,
        )
    elif manifest.sha256 != digest or manifest.name != model:
        raise InvalidArtifactError(
            f"model {model!r}: the manifest is for {manifest.name!r} with SHA-256 {manifest.sha256},"
            f" the artifact's is {digest}"
        )
    check_estimator(spec, estimator, manifest.reference)
    inline = len(data) <= settings.registry_inline_max_bytes
    path = None if inline else store_artifact(settings.resolved_registry_store_dir, digest, data)
    with engine.begin() as conn:
        ledger.insert_version(
            conn,
            model=model,
            version=digest,
            source=source.value,
            manifest=manifest.model_copy(update={"trusted_types": types}).model_dump(mode="json"),
            metrics=manifest.metrics,
            artifact=data if inline else None,
            artifact_path=path,
            size_bytes=len(data),
            created_by=created_by,
        )
        current = ledger.aliases_of(conn, [model], Alias.champion).get(model)
        if current is None:
            first = ledger.set_alias(
                conn,
                model=model,
                alias=Alias.champion,
                version=digest,
                expected=None,
                actor=created_by,
                reason="first version",
            )
            _moved(first, model, Alias.champion)
        elif as_alias is not None:
            named = ledger.aliases_of(conn, [model], as_alias).get(model)
            if named != digest:
                moved = ledger.set_alias(
                    conn, model=model, alias=as_alias, version=digest, expected=named, actor=created_by, reason=None
                )
                _moved(moved, model, as_alias)
    return digest


def _moved(moved: bool, model: str, alias: Alias) -> None:
    """Raise when a guarded alias change (`ledger.set_alias`) found the alias moved meanwhile."""
    if not moved:
        raise RegistryConflictError(f"model {model!r}: its {alias.value} changed meanwhile; nothing was changed")


def versions(engine: Engine, model: str) -> list[ledger.VersionRecord]:
    """Every version of `model`, oldest first, with the aliases naming each.

    Raises:
        UnknownPipelineError: no pipeline has `model`.
    """
    registry.get_model(model)
    with engine.connect() as conn:
        return ledger.versions_of(conn, model)


def events(engine: Engine, model: str) -> list[dict[str, Any]]:
    """Every registry change of `model`, oldest first (`model_events` rows)."""
    registry.get_model(model)
    with engine.connect() as conn:
        return ledger.events_of(conn, model)


def champion(bind: Bind, model: str) -> str:
    """The version new batches of `model` are pinned to (one read, on Engine `bind`'s own
    connection or on Connection `bind`).

    Raises:
        UnknownPipelineError: no pipeline has `model`.
        NoChampionError: it has no version yet.
    """
    registry.get_model(model)
    with connected(bind) as conn:
        version = ledger.aliases_of(conn, [model]).get(model)
    if version is None:
        raise NoChampionError(model)
    return version


def resolve_version(conn: Connection, model: str, version: str) -> str:
    """The version of `model` that `version` (whole, or a unique prefix of 8+ hex digits) names.

    Raises:
        UnknownVersionError: none, or several, match.
    """
    known = [record.version for record in ledger.versions_of(conn, model)]
    matches = [v for v in known if v == version or (len(version) >= SHORTEST_VERSION_PREFIX and v.startswith(version))]
    if len(matches) != 1:
        why = "is ambiguous" if matches else "is not a registered version"
        raise UnknownVersionError(f"model {model!r}: {version!r} {why} (see `pipeline models versions {model}`)")
    return matches[0]


def rollback(engine: Engine, model: str, *, approved_by: str, to: str | None = None, reason: str | None = None) -> str:
    """Make `to` (default: the previous champion) the champion of `model` for new batches,
    recorded as a `rollback` event by `approved_by`; return the new champion.

    Raises:
        UnknownPipelineError: no pipeline has `model`.
        UnknownVersionError: `to` is not one of its versions, or there is no previous champion.
        InvalidArgumentError: no approver, or the version is the champion already.
        RegistryConflictError: the champion changed meanwhile.
    """
    registry.get_model(model)
    if not approved_by.strip():
        raise InvalidArgumentError("a rollback needs a named approver (--approved-by NAME)")
    with engine.begin() as conn:
        current = ledger.aliases_of(conn, [model]).get(model)
        if current is None:
            raise NoChampionError(model)
        if to is None:
            target = ledger.previous_champion(conn, model)
            if target is None:
                raise UnknownVersionError(f"model {model!r} has no previous champion; name a version with --to")
        else:
            target = resolve_version(conn, model, to)
        if target == current:
            raise InvalidArgumentError(f"model {model!r}: {target[:12]} is the champion already")
        moved = ledger.set_alias(
            conn,
            model=model,
            alias=Alias.champion,
            version=target,
            expected=current,
            actor=approved_by,
            reason=reason,
            event=ModelEvent.rollback,
        )
        _moved(moved, model, Alias.champion)
    return target


def fetch_verified(engine: Engine, settings: Settings, model: str, version: str) -> tuple[bytes, Manifest]:
    """The artifact of `version` of `model` and its manifest, after its SHA-256 matched.

    Raises:
        ArtifactError: not registered, or the stored bytes do not hash to the version.
        OSError: the store directory's file cannot be read on this host.
    """
    with autocommit(engine) as conn:
        stored = ledger.stored_artifact(conn, model, version)
    if stored is None:
        raise ArtifactError(f"model {model!r}: version {version[:12]} is not registered")
    data = stored.data
    if data is None:
        assert stored.path is not None, "model_versions_artifact_in_one_place"
        data = (settings.resolved_registry_store_dir / stored.path).read_bytes()
    digest = sha256_of(data)
    if digest != version:
        raise ArtifactError(
            f"model {model!r}: the stored artifact of version {version[:12]} has SHA-256 {digest}; refusing to load it"
        )
    return data, Manifest.model_validate(stored.manifest)


def load_version(engine: Engine, settings: Settings, model: str, version: str) -> tuple[Any, Manifest]:
    """The estimator of `version` of `model` and its manifest, verified, loaded with the
    allowed types only. Raises as `fetch_verified`, and InvalidArtifactError."""
    data, manifest = fetch_verified(engine, settings, model, version)
    return load_artifact(model, data, trusted_types(model, data)), manifest


def adopt_models_dir(engine: Engine, settings: Settings, created_by: str) -> list[str]:
    """Register the artifacts in PIPELINE_MODELS_DIR of models that have no version yet as
    their first, champion version (an existing deployment's upgrade); return their names.
    Idempotent: a model with a version is left alone.

    Raises:
        ArtifactError: a file does not match its manifest.
        InvalidArtifactError: an artifact fails the registry's checks.
    """
    models_dir = settings.resolved_models_dir
    names = sorted(registry.all_models())
    with engine.connect() as conn:
        served = ledger.aliases_of(conn, names)
    adopted = []
    for name in names:
        _, manifest_path = model_paths(models_dir, name)
        if name in served or not manifest_path.exists():
            continue
        data, manifest = read_verified(models_dir, name)
        register(engine, settings, name, data, manifest=manifest, created_by=created_by, source=VersionSource.migrated)
        adopted.append(name)
    return adopted


def train(
    engine: Engine, settings: Settings, names: Sequence[str] | None, *, created_by: str, as_alias: Alias | None = None
) -> list[tuple[Manifest, str]]:
    """Train the named models (default: every one), write their files to PIPELINE_MODELS_DIR
    and register each as a version; return (manifest, version) per model."""
    specs = [registry.get_model(name) for name in names] if names else list(registry.all_models().values())
    trained = []
    for spec in specs:
        manifest = save_model(settings.resolved_models_dir, spec)
        artifact_path, _ = model_paths(settings.resolved_models_dir, spec.name)
        version = register(
            engine,
            settings,
            spec.name,
            artifact_path.read_bytes(),
            manifest=manifest,
            created_by=created_by,
            as_alias=as_alias,
            source=VersionSource.trained,
        )
        trained.append((manifest, version))
    return trained
