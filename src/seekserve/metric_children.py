"""`child(metric, *labels)`: a Prometheus metric's labelled child, memoised. `metric.labels()` checks its
arguments and takes a lock on every call (about 5 µs); a request asks for the same few children a dozen
times. Only for label values from bounded sets (models, routes, rules, statuses), as Prometheus wants anyway."""

from __future__ import annotations

import weakref
from typing import Any

_CHILDREN: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], Any]] = weakref.WeakKeyDictionary()


def child(metric: Any, *labels: str) -> Any:
    try:
        return _CHILDREN[metric][labels]
    except KeyError:
        made = metric.labels(*labels)
        _CHILDREN.setdefault(metric, {})[labels] = made
        return made
