"""The memoised labelled children are the metric's own: what is counted through them is what it exposes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from seekserve.metric_children import child


def test_children_are_the_metrics_own_and_kept_per_metric() -> None:
    registry = CollectorRegistry()
    a = Counter("a_total", "a", ["route", "status"], registry=registry)
    b = Histogram("b_seconds", "b", ["model"], registry=registry)
    child(a, "/v1/x", "200").inc()
    child(a, "/v1/x", "200").inc(2)
    child(a, "/v1/x", "500").inc()
    child(b, "m").observe(0.3)
    assert child(a, "/v1/x", "200") is a.labels("/v1/x", "200")
    assert child(b, "m") is b.labels("m")
    text = generate_latest(registry).decode()
    assert 'a_total{route="/v1/x",status="200"} 3.0' in text and 'a_total{route="/v1/x",status="500"} 1.0' in text
    assert 'b_seconds_count{model="m"} 1.0' in text
    other = Counter("a_total", "a", ["route", "status"], registry=CollectorRegistry())   # same name, own memo
    assert child(other, "/v1/x", "200") is not child(a, "/v1/x", "200")
