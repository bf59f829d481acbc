"""Prometheus metrics of the aggregation function (``GET /metrics``)."""

from prometheus_client import CollectorRegistry, Counter, Histogram

registry = CollectorRegistry()
updates_accepted = Counter("fedge_updates_accepted", "Updates stored and folded", registry=registry)
updates_rejected = Counter("fedge_updates_rejected", "Updates refused", ["code"], registry=registry)
update_seconds = Histogram(
    "fedge_update_seconds", "Time to validate, store and fold one update", registry=registry
)
model_downloads = Counter(
    "fedge_model_downloads", "Global model bodies served", ["cached"], registry=registry
)
