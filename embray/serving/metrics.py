"""Prometheus metrics of the Serve app, and the monitor's last status exported as gauges."""

from __future__ import annotations

import datetime as dt
from typing import Any


class ServeMetrics:
    """The Serve app's Prometheus metrics (Ray prefixes them with ``ray_`` on its metrics endpoint)."""

    def __init__(self, collection: str):
        from ray.serve import metrics

        self.collection = collection
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
            "embray_served_rows", description="Rows in the served version.", tag_keys=("collection", "version")
        )
        # From the monitor's last status (<collection>/_status/status.json), re-read on every poll.
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

    def status(self, st: dict[str, Any]) -> None:
        tags = {"collection": self.collection}
        stale = st.get("staleness") or {}
        if stale:
            self.stale_fraction.set(stale["fraction"], tags=tags)
            for kind in ("new", "changed", "deleted"):
                self.stale_rows.set(stale[kind], tags={**tags, "kind": kind})
        self.status_ok.set(1.0 if st.get("ok") else 0.0, tags=tags)
        checked = st.get("checked_at")
        if checked:
            age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(checked)).total_seconds()
            self.status_age.set(age, tags=tags)

    def served(self, old: str | None, version: str, load_seconds: float, rows: int) -> None:
        if old:
            gone = {"collection": self.collection, "version": old}
            for gauge in (self.active, self.rows, self.load_seconds):
                gauge.set(0, tags=gone)
        tags = {"collection": self.collection, "version": version}
        self.active.set(1, tags=tags)
        self.load_seconds.set(load_seconds, tags=tags)
        self.rows.set(rows, tags=tags)

    def record(self, endpoint: str, version: str | None, outcome: str, ms: float) -> None:
        self.requests.inc(
            tags={"collection": self.collection, "endpoint": endpoint, "version": version or "none", "outcome": outcome}
        )
        self.latency.observe(ms, tags={"collection": self.collection, "endpoint": endpoint})
