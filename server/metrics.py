"""Prometheus metrics of the aggregation function (``GET /metrics``)."""

from prometheus_client import CollectorRegistry, Counter, Histogram

registry = CollectorRegistry()
updates_accepted = Counter("fedge_updates_accepted", "Updates stored and folded", registry=registry)
updates_rejected = Counter("fedge_updates_rejected", "Updates refused", ["code"], registry=registry)
skips_accepted = Counter("fedge_skips_accepted", "Skip notices stored", registry=registry)
skips_rejected = Counter("fedge_skips_rejected", "Skip notices refused", ["code"], registry=registry)
update_seconds = Histogram(
    "fedge_update_seconds", "Time to validate, store and fold one update", registry=registry
)
model_downloads = Counter(
    "fedge_model_downloads", "Global model bodies served", ["cached"], registry=registry
)
