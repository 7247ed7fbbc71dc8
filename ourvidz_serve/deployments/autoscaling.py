"""Scale the SDXL and WAN deployments on their PostgreSQL queue backlog.

Each replica's ``record_autoscaling_stats`` returns ``{BACKLOG_METRIC: units queued in its queue
(one global figure), RUNNING_METRIC: units it is running now}``; Serve averages each per replica
over ``look_back_period_s`` and hands them to the policy as ``ctx.aggregated_metrics``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

BACKLOG_METRIC = "queue_backlog"
RUNNING_METRIC = "running_units"

# The averaged metrics are time-weighted means, so 12 images may arrive as 12.000000001; without
# this slack that would ask for a third replica of 6 images.
_ROUNDING_SLACK = 1e-6


def _check_units_per_replica(units_per_replica: object) -> float:
    """The value as a float, or a ValueError that names the setting."""
    # bool is an int, and YAML turns `yes` into True; a string such as "6" is a quoting mistake.
    if (
        isinstance(units_per_replica, bool)
        or not isinstance(units_per_replica, int | float)
        or not math.isfinite(units_per_replica)
        or units_per_replica <= 0
    ):
        raise ValueError(
            f"policy_kwargs.units_per_replica must be a finite number > 0, "
            f"got {units_per_replica!r}"
        )
    return float(units_per_replica)


def desired_replicas(
    backlog: float,
    running: float,
    units_per_replica: float,
    current: int,
    min_replicas: int,
    max_replicas: int,
    have_metrics: bool,
) -> int:
    """Replicas for the queued plus running units, within [min_replicas, max_replicas]."""
    units_per_replica = _check_units_per_replica(units_per_replica)
    if not have_metrics:
        # Nothing reported yet (startup, redeploy): reading that as an empty queue would scale
        # down replicas that may be busy, so keep the count.
        wanted = current
    else:
        units = max(0.0, backlog) + max(0.0, running)
        wanted = math.ceil(units / units_per_replica - _ROUNDING_SLACK)
    return max(min_replicas, min(max_replicas, wanted))


class BacklogAutoscalingPolicy:
    """Serve builds this once from ``policy_kwargs`` and calls it on every control-loop tick.

    Serve wraps the call: it applies upscale_delay_s / downscale_delay_s, the scaling factors and
    the bounds itself (ray/serve/autoscaling_policy.py ``_apply_autoscaling_config``), so this
    returns the raw count and must not count delays of its own.
    """

    def __init__(self, *, units_per_replica: float) -> None:
        self.units_per_replica = _check_units_per_replica(units_per_replica)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        backlogs = metrics.get(BACKLOG_METRIC, {})
        running = metrics.get(RUNNING_METRIC, {})
        target = desired_replicas(
            # Every replica reports the same queue; the highest keeps one that has just started
            # (and read less, or nothing, yet) from hiding the backlog.
            backlog=max(backlogs.values(), default=0.0),
            running=sum(running.values()),
            units_per_replica=self.units_per_replica,
            # Serve's delays compare against the target, so "no change" means the target, which
            # may be ahead of the running count during a scale-up.
            current=ctx.target_num_replicas,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
            have_metrics=bool(backlogs),
        )
        # Serve merges its own delay bookkeeping into this dict; the policy keeps no state.
        return target, {}
