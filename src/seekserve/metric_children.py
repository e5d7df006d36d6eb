"""`child(metric, *labels)`: a Prometheus metric's labelled child, memoised. `metric.labels()` checks its
arguments and takes a lock on every call (about 5 µs); a request asks for the same few children a dozen
times. Only for label values from bounded sets (models, routes, rules, statuses), as Prometheus wants anyway.
The memo is an attribute of the metric itself, so it lives and dies with it (a weak-keyed table cost a
weak reference per look-up)."""

from __future__ import annotations

from typing import Any

_MEMO = "_seekserve_children"


def child(metric: Any, *labels: str) -> Any:
    memo = metric.__dict__.get(_MEMO)
    if memo is None:
        memo = {}
        setattr(metric, _MEMO, memo)
    found = memo.get(labels)
    if found is None:
        found = memo[labels] = metric.labels(*labels)
    return found
