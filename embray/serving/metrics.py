"""Prometheus metrics of the Serve app, and the monitor's last status exported as gauges."""

from __future__ import annotations

import datetime as dt
from typing import Any

from embray.results import StatusReport


class ServeMetrics:
    """The Serve app's Prometheus metrics (Ray prefixes them with ``ray_`` on its metrics endpoint)."""

    def __init__(self, collection: str, *, stale_threshold: float, monitor_interval_s: float):
        from ray.serve import metrics

        self.collection = collection
        # Ray drops a gauge from its metrics endpoint 20-30 s after its last set() (measured with Ray 2.60): every
        # state gauge is remembered here and set again every second by the poller (refresh), so it stays exported.
        self._sticky: dict[tuple[str, tuple], tuple[Any, float, dict[str, str]]] = {}
        self._checked_at: dt.datetime | None = None  # the monitor's last check: status age grows from it
        tags = {"collection": collection}
        self.latency = metrics.Histogram(
            "embray_request_latency_ms",
            description="Request latency by endpoint.",
            boundaries=[1, 2, 5, 10, 15, 25, 50, 100, 250, 500, 1000, 5000],
            tag_keys=("collection", "endpoint"),
        )
        self.requests = metrics.Counter(
            "embray_requests_total",
            description="Requests by endpoint, serving version and outcome.",
            tag_keys=("collection", "endpoint", "version", "outcome"),
        )
        self.searches = metrics.Counter(
            "embray_searches_total",
            description="Answered search requests by mode (vector, keyword, hybrid) and whether they had a filter.",
            tag_keys=("collection", "mode", "filtered"),
        )
        self.active = metrics.Gauge(
            "embray_active_version",
            description="1 for the version this replica serves.",
            tag_keys=("collection", "version"),
        )
        self.load_seconds = metrics.Gauge(
            "embray_version_load_seconds",
            description="Seconds to load and warm the served version.",
            tag_keys=("collection", "version"),
        )
        self.rows = metrics.Gauge(
            "embray_served_rows",
            description="Rows (vectors) in the served version: passages, in a version of chunked documents.",
            tag_keys=("collection", "version"),
        )
        self.documents = metrics.Gauge(
            "embray_served_documents",
            description="Documents in the served version (its rows, without chunking).",
            tag_keys=("collection", "version"),
        )
        self._status_gauges(metrics)
        self.serving_alias = metrics.Gauge(
            "embray_serving_alias",
            description="1 while this replica serves the version alias `active` names, 0 while it serves another "
            "(or none).",
            tag_keys=("collection",),
        )
        self.mlflow_up = metrics.Gauge(
            "embray_mlflow_up",
            description="1 while this replica's last read of the active alias from MLflow succeeded, 0 while MLflow "
            "is unreachable (the replica keeps serving the version it has).",
            tag_keys=("collection",),
        )
        self.version_created = metrics.Gauge(
            "embray_served_version_created_seconds",
            description="When the served version was built (Unix seconds); its age is time() minus this.",
            tag_keys=("collection", "version"),
        )
        # The thresholds the alert rules compare with, from the config (deploy/prometheus/embray-alerts.yaml).
        threshold = metrics.Gauge(
            "embray_staleness_threshold",
            description="monitor.max_stale_fraction: the stale fraction above which the collection is stale.",
            tag_keys=("collection",),
        )
        interval = metrics.Gauge(
            "embray_monitor_interval_seconds",
            description="monitor.interval_s: how often the monitor is meant to check.",
            tag_keys=("collection",),
        )
        self._set(threshold, stale_threshold, tags)
        self._set(interval, monitor_interval_s, tags)

    def _status_gauges(self, metrics) -> None:
        """The gauges exported from the monitor's last status (<collection>/_status/status.json), re-read on every
        poll."""
        self.truncated = metrics.Gauge(
            "embray_truncated",
            description="The active version's rows longer than the model's window (kind rows) and their tokens "
            "the model never read (kind tokens), at the monitor's last check; versions without chunking only.",
            tag_keys=("collection", "kind"),
        )
        self.stale_fraction = metrics.Gauge(
            "embray_staleness_fraction",
            description="Stale share of the active version's rows at the monitor's last check.",
            tag_keys=("collection",),
        )
        self.stale_rows = metrics.Gauge(
            "embray_stale_rows",
            description="Rows new, changed or deleted in the source since the active version was built.",
            tag_keys=("collection", "kind"),
        )
        self.status_ok = metrics.Gauge(
            "embray_status_ok", description="1 when the monitor's last status had no problem.", tag_keys=("collection",)
        )
        self.status_age = metrics.Gauge(
            "embray_status_age_seconds",
            description="Seconds since the monitor's last status check (alert when it stops).",
            tag_keys=("collection",),
        )
        self.segments = metrics.Gauge(
            "embray_active_segments",
            description="Delta segments over all shards of the active version, and its tombstoned rows (kind): "
            "what `embray compact` folds into whole shards.",
            tag_keys=("collection", "kind"),
        )

    def _set(self, gauge, value: float, tags: dict[str, str]) -> None:
        gauge.set(value, tags=tags)
        self._sticky[(gauge.info["name"], tuple(sorted(tags.items())))] = (gauge, value, tags)

    def refresh(self) -> None:
        """Set every state gauge again (the poller calls it every second), so none ages out of Ray's endpoint."""
        for gauge, value, tags in list(self._sticky.values()):
            gauge.set(value, tags=tags)
        self._status_age()

    def alias(self, serving_it: bool) -> None:
        self._set(self.serving_alias, 1.0 if serving_it else 0.0, {"collection": self.collection})

    def mlflow(self, up: bool) -> None:
        self._set(self.mlflow_up, 1.0 if up else 0.0, {"collection": self.collection})

    def status(self, st: StatusReport) -> None:
        """Export the monitor's last status (``<collection>/_status/status.json``)."""
        tags = {"collection": self.collection}
        stale = st.staleness
        if stale:
            self._set(self.stale_fraction, stale.fraction, tags)
            for kind in ("new", "changed", "deleted"):
                self._set(self.stale_rows, getattr(stale, kind), {**tags, "kind": kind})
        if st.active:
            for kind in ("segments", "dead_rows"):
                self._set(self.segments, getattr(st.active, kind), {**tags, "kind": kind})
            if st.active.truncated_rows is not None:
                self._set(self.truncated, st.active.truncated_rows, {**tags, "kind": "rows"})
                self._set(self.truncated, st.active.truncated_tokens, {**tags, "kind": "tokens"})
        self._set(self.status_ok, 1.0 if st.ok else 0.0, tags)
        if st.checked_at:
            self._checked_at = dt.datetime.fromisoformat(st.checked_at)
            self._status_age()

    def _status_age(self) -> None:
        if self._checked_at is not None:
            age = (dt.datetime.now(dt.timezone.utc) - self._checked_at).total_seconds()
            self.status_age.set(age, tags={"collection": self.collection})

    def served(
        self, old: str | None, version: str, load_seconds: float, rows: int, created: str, documents: int | None = None
    ) -> None:
        if old:  # set to 0 once, then left to age out
            gone = {"collection": self.collection, "version": old}
            for gauge in (self.active, self.rows, self.documents, self.load_seconds, self.version_created):
                gauge.set(0, tags=gone)
                self._sticky.pop((gauge.info["name"], tuple(sorted(gone.items()))), None)
        tags = {"collection": self.collection, "version": version}
        self._set(self.version_created, dt.datetime.fromisoformat(created).timestamp(), tags)
        self._set(self.active, 1, tags)
        self._set(self.load_seconds, load_seconds, tags)
        self._set(self.rows, rows, tags)
        self._set(self.documents, rows if documents is None else documents, tags)

    def searched(self, mode: str, filtered: bool) -> None:
        """One answered search, by its mode and whether it had a filter."""
        self.searches.inc(tags={"collection": self.collection, "mode": mode, "filtered": str(filtered).lower()})

    def record(self, endpoint: str, version: str | None, outcome: str, ms: float) -> None:
        self.requests.inc(
            tags={"collection": self.collection, "endpoint": endpoint, "version": version or "none", "outcome": outcome}
        )
        self.latency.observe(ms, tags={"collection": self.collection, "endpoint": endpoint})


class ShadowMetrics:
    """Shadow traffic to the candidate (serve.shadow): per candidate, queries, overlap@10 and latency."""

    def __init__(self, base: ServeMetrics):
        from ray.serve import metrics

        self.base = base
        keys = ("collection", "candidate")
        self.queries = metrics.Counter(
            "embray_shadow_queries_total",
            description="Live text queries also answered by the candidate.",
            tag_keys=keys,
        )
        self.dropped = metrics.Counter(
            "embray_shadow_dropped_total",
            description="Shadow queries dropped because the replica had serve.shadow.max_pending waiting.",
            tag_keys=("collection",),
        )
        self.overlap = metrics.Gauge(
            "embray_shadow_overlap_at_10",
            description="Mean share of the active answer's top-10 ids the candidate also returned (this replica).",
            tag_keys=keys,
        )
        self.latency = metrics.Histogram(
            "embray_shadow_latency_ms",
            description="The candidate's latency on shadow queries.",
            boundaries=[1, 2, 5, 10, 15, 25, 50, 100, 250, 500, 1000, 5000],
            tag_keys=keys,
        )

    def record(self, candidate: str, mean_overlap: float, ms: float) -> None:
        tags = {"collection": self.base.collection, "candidate": candidate}
        self.queries.inc(tags=tags)
        self.latency.observe(ms, tags=tags)
        self.base._set(self.overlap, mean_overlap, tags)

    def drop(self) -> None:
        self.dropped.inc(tags={"collection": self.base.collection})
