"""The MLflow side of versions: runs, dataset inputs, registered model versions, aliases.

Each collection is the registered model ``embray.<collection>``; each committed
version is one model version whose source is the version's URI and whose tag
``embray.version`` names it. Alias ``active`` is what Serve answers from,
``candidate`` a shadow build waiting for its gates.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from embray.config import Config, MlflowConfig, is_remote
from embray.errors import RegistryError, VersionError, one_line
from embray.lifecycle.versions import Manifest

log = logging.getLogger("embray")

ACTIVE = "active"
CANDIDATE = "candidate"
VERSION_TAG = "embray.version"


def _mlflow_error(uri: str, e: Exception) -> RegistryError:
    return RegistryError(f"MLflow at {uri} failed ({one_line(e)}); check mlflow.tracking_uri and that the server is up")


# MLflow's HTTP retries and timeout per client, not per process. MLflow takes them from the environment
# (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _TIMEOUT) at every request unless the call passes them,
# and its clients have no setting of their own; so a Registry's calls run with its config's budget in a
# context variable (per thread and task), which one wrapper of MLflow's http_request reads. A Serve replica's
# short budget then stays with its own calls, and a build in the same process keeps its long one.
_BUDGET: ContextVar[MlflowConfig | None] = ContextVar("embray_mlflow_budget", default=None)
_hook_lock = threading.Lock()


def _install_budget_hook() -> None:
    """Once per process: MLflow's http_request, taking its retries and timeout from :data:`_BUDGET` when set
    (its REST stores call it through ``rest_utils.call_endpoint``, which looks it up in that module)."""
    from mlflow.utils import rest_utils

    with _hook_lock:
        if getattr(rest_utils.http_request, "embray_budget", False):
            return
        original = rest_utils.http_request

        @functools.wraps(original)
        def http_request(*args: Any, **kwargs: Any):
            m = _BUDGET.get()
            if m is not None:
                for key, value in (("max_retries", m.max_retries), ("backoff_factor", m.backoff_s)):
                    if kwargs.get(key) is None:
                        kwargs[key] = value
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = m.timeout_s
            return original(*args, **kwargs)

        http_request.embray_budget = True  # type: ignore[attr-defined]
        rest_utils.http_request = http_request


@contextlib.contextmanager
def _budget(m: MlflowConfig):
    token = _BUDGET.set(m)
    try:
        yield
    finally:
        _BUDGET.reset(token)


class Registry:
    """A thin wrapper over ``MlflowClient`` bound to one collection."""

    def __init__(self, cfg: Config):
        from mlflow import MlflowClient

        _install_budget_hook()
        self.cfg = cfg
        self.uri = cfg.tracking_uri()
        self.name = cfg.registered_model
        if self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.uri[len("sqlite:///") :]) or ".", exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._experiment_id: str | None = None
        self._model_ready = False

    def _call(self, fn, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            with _budget(self.cfg.mlflow):
                return fn(*args, **kwargs)
        except MlflowException as e:
            raise _mlflow_error(self.uri, e) from e
        except OSError as e:
            raise _mlflow_error(self.uri, e) from e

    # --- runs ----------------------------------------------------------------
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        name = self.cfg.experiment_name()
        exp = self._call(self.client.get_experiment_by_name, name)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if not self.cfg.mlflow.tracking_uri and not is_remote(self.cfg.store.uri):
            artifacts = Path(self.cfg.store.uri, "mlflow-artifacts").as_uri()
        return self._call(self.client.create_experiment, name, artifact_location=artifacts)

    def start_run(self, version: str, kind: str, params: dict[str, Any]) -> str:
        from embray.lifecycle.versions import who

        parent = params.get("parent")
        run = self._call(
            self.client.create_run,
            self.experiment_id(),
            run_name=f"{kind}-{version}",
            tags={
                "embray.collection": self.cfg.collection,
                VERSION_TAG: version,
                "embray.job": kind,
                "mlflow.user": who(),
                "mlflow.source.name": f"embray {kind}",
                "mlflow.note.content": f"embray {kind} of collection {self.cfg.collection} into version {version}"
                + (f", from {parent}" if parent else ""),
            },
        )
        from mlflow.entities import Param

        params = {"kind": kind, **params}
        self._call(self.client.log_batch, run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id

    def log_corpus(self, run_id: str, source_uri: str, digest: str, schema: dict, rows: int | None = None) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(
            name=f"{self.cfg.collection}-corpus",
            digest=digest[:36],
            source_type="s3" if source_uri.startswith("s3://") else "local",
            source=json.dumps({"uri": source_uri}),
            schema=json.dumps({"mlflow_colspec": schema}),
            profile=json.dumps({"num_rows": rows}) if rows is not None else None,
        )
        self._call(
            self.client.log_inputs,
            run_id,
            datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", "corpus")])],
        )

    def start_job_run(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        """A run for work that is not a build (the monitor): its metrics are a time series by step."""
        from mlflow.entities import Param

        run = self._call(
            self.client.create_run,
            self.experiment_id(),
            run_name=name,
            tags={"embray.collection": self.cfg.collection, **tags},
        )
        self._call(self.client.log_batch, run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._call(self.client.log_batch, run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call(self.client.log_batch, run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finished_build_runs(self, fingerprint: str, limit: int = 20) -> list[tuple[str, dict[str, float]]]:
        """(run id, latest metrics) of this collection's finished builds with model ``fingerprint``, newest first."""
        runs = self._call(
            self.client.search_runs,
            [self.experiment_id()],
            filter_string=f"params.fingerprint = '{fingerprint}' and attributes.status = 'FINISHED'",
            max_results=limit,
            order_by=["attributes.start_time DESC"],
        )
        return [(r.info.run_id, dict(r.data.metrics)) for r in runs]

    def end_run(self, run_id: str, ok: bool, error: str | None = None) -> None:
        if error:
            self._call(self.client.set_tag, run_id, "embray.error", error[:5000])
        self._call(self.client.set_terminated, run_id, "FINISHED" if ok else "FAILED")

    # --- registered model versions --------------------------------------------
    def ensure_model(self) -> None:
        """Create the registered model ``embray.<collection>`` if it does not exist (checked once per Registry)."""
        from mlflow.exceptions import MlflowException

        if self._model_ready:
            return
        try:
            with _budget(self.cfg.mlflow):
                self.client.get_registered_model(self.name)
        except MlflowException:
            self._call(
                self.client.create_registered_model,
                self.name,
                tags={"embray.collection": self.cfg.collection},
                description=f"embray collection {self.cfg.collection}: one model version per index version.",
            )
        self._model_ready = True

    def register(self, manifest: Manifest, uri: str) -> str:
        """Register a committed version; idempotent (returns the existing model version)."""
        self.ensure_model()
        existing = self.versions_of(manifest.version)
        if existing:
            return str(self.one_version(manifest.version, existing).version)
        tags = {
            VERSION_TAG: manifest.version,
            "embray.fingerprint": manifest.fingerprint,
            "embray.model": manifest.model.label,
            "embray.dims": str(manifest.dims),
            "embray.rows": str(manifest.rows),
            "embray.shards": str(len(manifest.shards)),
            "embray.rejected": str(manifest.counts.rejected),
            "embray.parent": manifest.parent or "none",
            "embray.kind": str(manifest.counts.kind or ""),
        }
        tags["embray.uri"] = uri
        source = uri
        if not is_remote(uri) and self.uri.startswith(("http://", "https://")) and manifest.mlflow_run_id:
            # An MLflow server accepts a local path as a source only inside the run's artifacts: name the run
            # (its params and the tag embray.uri hold where the version is).
            source = f"runs:/{manifest.mlflow_run_id}/embray-version"
        mv = self._call(
            self.client.create_model_version,
            self.name,
            source=source,
            run_id=manifest.mlflow_run_id,
            tags=tags,
            description=f"{manifest.model.label}: {manifest.rows} rows of {manifest.source.uri}",
        )
        return str(self.one_version(manifest.version, self.versions_of(manifest.version) or [mv]).version)

    def versions_of(self, version: str) -> list:
        """The model versions tagged with embray ``version`` (one, unless a create was applied twice)."""
        return [mv for mv in self.model_versions() if mv.tags.get(VERSION_TAG) == version]

    def one_version(self, version: str, mvs: list):
        """Keep one model version of ``version``: MLflow's client retries a create whose reply was lost (a
        server restart), which can register it twice. The one an alias names stays, else the first."""
        if len(mvs) == 1:
            return mvs[0]
        rm = self._call(self.client.get_registered_model, self.name)
        aliased = {str(n) for n in (rm.aliases or {}).values()}
        keep = min(mvs, key=lambda mv: (str(mv.version) not in aliased, int(mv.version)))
        for mv in mvs:
            if mv is not keep:
                log.warning("deleting model version %s, a duplicate of %s for %s", mv.version, keep.version, version)
                try:
                    self._call(self.client.delete_model_version, self.name, str(mv.version))
                except RegistryError as e:  # another command removed it first
                    log.info("model version %s is gone already: %s", mv.version, e)
        return keep

    def model_versions(self) -> list:
        self.ensure_model()
        return self._call(self.client.search_model_versions, f"name='{self.name}'")

    def registered_versions(self) -> set[str]:
        """embray version ids that have a model version."""
        return {mv.tags.get(VERSION_TAG) for mv in self.model_versions()}

    def model_version(self, version: str):
        mvs = self.versions_of(version)
        return min(mvs, key=lambda mv: int(mv.version)) if mvs else None

    def finish_run(self, run_id: str | None) -> None:
        """Mark a build's run finished if it was left running (its build committed, then MLflow went away)."""
        if not run_id:
            return
        run = self._call(self.client.get_run, run_id)
        if run.info.status == "RUNNING":
            self._call(self.client.set_tag, run_id, "embray.recorded_late", "true")
            self._call(self.client.set_terminated, run_id, "FINISHED")

    def aliases(self) -> dict[str, str]:
        """alias -> embray version id."""
        by_number = {str(mv.version): mv.tags.get(VERSION_TAG) for mv in self.model_versions()}
        rm = self._call(self.client.get_registered_model, self.name)
        return {alias: by_number.get(str(num)) for alias, num in (rm.aliases or {}).items()}

    def set_alias(self, alias: str, version: str) -> None:
        mv = self.model_version(version)
        if mv is None:
            raise VersionError(f"version {version} is not registered in MLflow model {self.name}")
        self._call(self.client.set_registered_model_alias, self.name, alias, str(mv.version))

    def delete_alias(self, alias: str) -> None:
        self._call(self.client.delete_registered_model_alias, self.name, alias)

    def tag_version(self, version: str, tags: dict[str, str]) -> None:
        mv = self.model_version(version)
        if mv is None:
            raise VersionError(f"version {version} is not registered in MLflow model {self.name}")
        for k, v in tags.items():
            self._call(self.client.set_model_version_tag, self.name, str(mv.version), k, str(v)[:5000])

    def model_tag(self, key: str) -> str | None:
        self.ensure_model()
        return (self._call(self.client.get_registered_model, self.name).tags or {}).get(key)

    def set_model_tag(self, key: str, value: str) -> None:
        self.ensure_model()
        self._call(self.client.set_registered_model_tag, self.name, key, value)

    def delete_version(self, version: str) -> bool:
        """Remove the model version of a deleted index version (its run, and so its lineage, stays)."""
        mv = self.model_version(version)
        if mv is None:
            return False
        self._call(self.client.delete_model_version, self.name, str(mv.version))
        return True
