"""The `model_name` label on every series of a registry, as vLLM puts it on all of its own.

Metrics are registered (and updated by their owners) in an inner registry; the registry that is
rendered holds one collector, ModelLabel, which yields the inner families with `model_name` added to
each sample. So no call site names the model, and a router can learn its model after it started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

UNKNOWN = "unknown"  # a router that has not heard from any instance yet


class ModelLabel(Collector):
    """Re-yields the families of `inner` with model_name=`model()` on every sample."""

    def __init__(self, inner: CollectorRegistry, model: Callable[[], str]) -> None:
        self.inner = inner
        self.model = model

    def collect(self) -> Iterator[Metric]:
        name = self.model() or UNKNOWN
        for family in self.inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, "model_name": name}) for s in family.samples]
            yield labelled


def labelled_registry(inner: CollectorRegistry, model: Callable[[], str]) -> CollectorRegistry:
    """A registry to render: `inner`'s series, each with the model_name label."""
    outer = CollectorRegistry(auto_describe=False)
    outer.register(ModelLabel(inner, model))
    return outer
