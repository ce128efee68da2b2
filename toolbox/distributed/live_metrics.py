"""Each epoch's row as Ray metrics (``ray.util.metrics`` gauges, tagged by sweep and trial).

Ray's metrics agent exports them on the node's Prometheus endpoint as ``ray_toolbox_<name>``;
``toolbox/distributed/grafana_dashboard.json`` charts them.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("toolbox")
TAGS = ("sweep", "trial")
PREFIX = "toolbox_"
# The row's own bookkeeping, not a curve worth a gauge.
SKIPPED = ("first_step_time", "steps_per_epoch", "global_step")
_gauges: dict = {}


def gauge_name(key: str) -> str:
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class LiveMetrics:
    """Sets one gauge per reported number; a no-op where Ray is not running."""

    def __init__(self, sweep: str, trial: str):
        self.tags = {"sweep": sweep, "trial": trial}

    def record(self, row: dict) -> None:
        try:
            import ray
            from ray.util.metrics import Gauge

            if not ray.is_initialized():
                return
            for key, value in row.items():
                if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                name = gauge_name(key)
                if name not in _gauges:
                    _gauges[name] = Gauge(name, description=f"toolbox: {key} of the latest epoch", tag_keys=TAGS)
                _gauges[name].set(float(value), tags=self.tags)
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
            log.debug("live metrics not exported: %s", exc)
