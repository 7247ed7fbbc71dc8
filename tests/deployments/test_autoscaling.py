"""The backlog autoscaling policy: the pure rule, the class with Serve's context, and Serve itself.

The contexts are ray's own AutoscalingContext; the last tests run the policy inside Serve's
controller-side AutoscalingStateManager, fed the replica reports a replica pushes, to pin both the
shape of ``aggregated_metrics`` and the delays Serve applies around the policy.
"""

from __future__ import annotations

import math
import time

import pytest
import yaml
from ray.serve._private.autoscaling_state import AutoscalingStateManager
from ray.serve._private.common import (
    DeploymentID,
    ReplicaID,
    ReplicaMetricReport,
    TimeStampedValue,
)
from ray.serve._private.config import DeploymentConfig, ReplicaConfig
from ray.serve._private.deployment_info import DeploymentInfo
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy
from ray.serve.schema import ServeDeploySchema

from ourvidz_serve.deployments.autoscaling import (
    BACKLOG_METRIC,
    RUNNING_METRIC,
    BacklogAutoscalingPolicy,
    desired_replicas,
)

POLICY_PATH = "ourvidz_serve.deployments.autoscaling:BacklogAutoscalingPolicy"
SDXL = DeploymentID(name="SDXL", app_name="ourvidz")
BAD_UNITS = [0, -6, "6", True, None, math.nan, math.inf]


def rule(backlog: float, running: float = 0.0, **overrides: object) -> int:
    """desired_replicas with SDXL-like defaults: 6 images a replica, 1 to 4 replicas."""
    args: dict[str, object] = dict(
        backlog=backlog,
        running=running,
        units_per_replica=6.0,
        current=1,
        min_replicas=1,
        max_replicas=4,
        have_metrics=True,
    )
    args.update(overrides)
    return desired_replicas(**args)  # type: ignore[arg-type]


def replicas(n: int) -> list[ReplicaID]:
    return [ReplicaID(unique_id=f"r{i}", deployment_id=SDXL) for i in range(n)]


def context(
    metrics: dict[str, dict[ReplicaID, float]] | None,
    running: list[ReplicaID],
    target: int | None = None,
    min_replicas: int = 1,
    max_replicas: int = 4,
) -> AutoscalingContext:
    """Ray's context as the controller builds it, with the metrics already aggregated."""
    config = AutoscalingConfig(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        policy=AutoscalingPolicy(
            policy_function=POLICY_PATH, policy_kwargs={"units_per_replica": 6}
        ),
    )
    return AutoscalingContext(
        deployment_id=SDXL,
        deployment_name=SDXL.name,
        app_name=SDXL.app_name,
        current_num_replicas=len(running),
        target_num_replicas=len(running) if target is None else target,
        running_replicas=running,
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=min_replicas,
        capacity_adjusted_max_replicas=max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=config,
    )


# The rule.


def test_a_backlog_of_twelve_images_asks_for_two_replicas():
    assert rule(backlog=12) == 2


def test_one_image_more_than_the_replicas_hold_asks_for_another():
    assert rule(backlog=13) == 3


def test_running_units_count_as_well_as_the_backlog():
    assert rule(backlog=1, running=6) == 2


def test_float_noise_from_averaging_does_not_add_a_replica():
    assert rule(backlog=12.000000001) == 2


def test_an_idle_queue_falls_to_min_replicas():
    assert rule(backlog=0, current=3) == 1
    assert rule(backlog=0, min_replicas=0, current=3) == 0


def test_never_exceeds_max_replicas():
    assert rule(backlog=600) == 4


def test_missing_metrics_keep_the_current_count():
    assert rule(backlog=0, current=3, have_metrics=False) == 3
    # Not even with min_replicas 0 does silence scale to zero.
    assert rule(backlog=0, current=1, min_replicas=0, have_metrics=False) == 1


def test_missing_metrics_still_respect_the_bounds():
    assert rule(backlog=0, current=9, have_metrics=False) == 4


def test_a_wan_replica_takes_one_job_at_a_time():
    assert rule(backlog=2, running=1, units_per_replica=1.0) == 3


@pytest.mark.parametrize("bad", BAD_UNITS)
def test_bad_units_per_replica_is_refused(bad):
    with pytest.raises(ValueError, match="units_per_replica must be a finite number > 0"):
        BacklogAutoscalingPolicy(units_per_replica=bad)
    with pytest.raises(ValueError, match="units_per_replica"):
        rule(backlog=12, units_per_replica=bad)


def test_an_integer_units_per_replica_from_yaml_is_accepted():
    assert BacklogAutoscalingPolicy(units_per_replica=6).units_per_replica == 6.0


# The class, called with ray's AutoscalingContext.


def test_the_policy_sums_running_units_over_replicas_and_counts_the_backlog_once():
    three = replicas(3)
    metrics = {
        BACKLOG_METRIC: {r: 12.0 for r in three},
        RUNNING_METRIC: {three[0]: 6.0, three[1]: 6.0, three[2]: 0.0},
    }
    policy = BacklogAutoscalingPolicy(units_per_replica=6)
    assert policy(context(metrics, three)) == (4, {})


def test_a_replica_that_has_not_read_the_queue_yet_does_not_hide_the_backlog():
    two = replicas(2)
    metrics = {
        BACKLOG_METRIC: {two[0]: 18.0, two[1]: 0.0},
        RUNNING_METRIC: {two[0]: 0.0, two[1]: 0.0},
    }
    assert BacklogAutoscalingPolicy(units_per_replica=6)(context(metrics, two))[0] == 3


@pytest.mark.parametrize("metrics", [None, {}, {RUNNING_METRIC: {}}])
def test_the_policy_keeps_the_target_when_no_replica_has_reported(metrics):
    # Mid scale-up: Serve targets 2 while 1 runs; keeping 2 is "no change" to Serve's delays.
    ctx = context(metrics, replicas(1), target=2)
    assert BacklogAutoscalingPolicy(units_per_replica=6)(ctx)[0] == 2


def test_the_policy_stays_within_the_capacity_adjusted_bounds():
    one = replicas(1)
    ctx = context({BACKLOG_METRIC: {one[0]: 600.0}}, one, min_replicas=1, max_replicas=2)
    assert BacklogAutoscalingPolicy(units_per_replica=6)(ctx)[0] == 2


# The policy inside Serve's own autoscaler.


def serve_autoscaler(
    units_per_replica: object = 6,
    target: int = 1,
    upscale_delay_s: float = 0.0,
    downscale_delay_s: float = 600.0,
) -> AutoscalingStateManager:
    """The controller's autoscaling state for SDXL, with the policy as a config file names it."""

    class SDXLStandIn:
        pass

    config = DeploymentConfig(
        autoscaling_config=AutoscalingConfig(
            min_replicas=1,
            max_replicas=4,
            upscale_delay_s=upscale_delay_s,
            downscale_delay_s=downscale_delay_s,
            policy=AutoscalingPolicy(
                policy_function=POLICY_PATH,
                policy_kwargs={"units_per_replica": units_per_replica},
            ),
        )
    )
    info = DeploymentInfo(
        deployment_config=config,
        replica_config=ReplicaConfig.create(SDXLStandIn),
        start_time_ms=0,
        deployer_job_id="",
    )
    manager = AutoscalingStateManager()
    manager.register_deployment(SDXL, info, target)
    return manager


def report(
    manager: AutoscalingStateManager, replica: ReplicaID, backlog: float, running: float
) -> None:
    """What a replica pushes: each metric's samples over the look-back period."""
    now = time.time()
    samples = {
        BACKLOG_METRIC: [TimeStampedValue(now - 2, backlog), TimeStampedValue(now - 1, backlog)],
        RUNNING_METRIC: [TimeStampedValue(now - 2, running), TimeStampedValue(now - 1, running)],
    }
    manager.record_request_metrics_for_replica(
        ReplicaMetricReport(replica_id=replica, timestamp=now, metrics=samples)
    )


def test_serve_hands_the_policy_one_averaged_value_per_replica_and_metric():
    manager = serve_autoscaler()
    two = replicas(2)
    manager.update_running_replica_ids(SDXL, two)
    report(manager, two[0], backlog=12, running=6)
    report(manager, two[1], backlog=12, running=0)
    ctx = (
        manager._app_autoscaling_states["ourvidz"]
        ._deployment_autoscaling_states[SDXL]
        .get_autoscaling_context(2)
    )
    assert ctx.aggregated_metrics == {
        BACKLOG_METRIC: {two[0]: 12.0, two[1]: 12.0},
        RUNNING_METRIC: {two[0]: 6.0, two[1]: 0.0},
    }


def test_serve_scales_up_on_a_reported_backlog():
    manager = serve_autoscaler()
    one = replicas(1)
    manager.update_running_replica_ids(SDXL, one)
    report(manager, one[0], backlog=12, running=0)
    assert manager.get_decision_num_replicas("ourvidz", {SDXL: 1}) == {SDXL: 2}


def test_serve_holds_a_scale_up_for_upscale_delay_s():
    manager = serve_autoscaler(upscale_delay_s=600)
    one = replicas(1)
    manager.update_running_replica_ids(SDXL, one)
    report(manager, one[0], backlog=12, running=0)
    assert manager.get_decision_num_replicas("ourvidz", {SDXL: 1}) == {SDXL: 1}


def test_serve_holds_a_scale_down_for_downscale_delay_s():
    manager = serve_autoscaler(target=3)
    three = replicas(3)
    manager.update_running_replica_ids(SDXL, three)
    for replica in three:
        report(manager, replica, backlog=0, running=0)
    assert manager.get_decision_num_replicas("ourvidz", {SDXL: 3}) == {SDXL: 3}


def test_serve_keeps_the_count_until_a_replica_reports():
    manager = serve_autoscaler(target=2)
    manager.update_running_replica_ids(SDXL, replicas(2))
    assert manager.get_decision_num_replicas("ourvidz", {SDXL: 2}) == {SDXL: 2}


@pytest.mark.parametrize("bad", BAD_UNITS)
def test_serve_refuses_to_register_a_bad_units_per_replica(bad):
    with pytest.raises(ValueError, match="units_per_replica"):
        serve_autoscaler(units_per_replica=bad)


SDXL_CONFIG = """
applications:
  - name: ourvidz
    import_path: ourvidz_serve.deployments.app:build_app
    deployments:
      - name: SDXL
        max_ongoing_requests: 16
        autoscaling_config:
          min_replicas: 1
          max_replicas: 2
          metrics_interval_s: 1.0
          look_back_period_s: 5.0
          upscale_delay_s: 2.0
          downscale_delay_s: 30.0
          policy:
            policy_function: ourvidz_serve.deployments.autoscaling:BacklogAutoscalingPolicy
            policy_kwargs:
              units_per_replica: 6
"""


def test_a_config_file_block_builds_the_policy_as_the_controller_does():
    app = ServeDeploySchema.model_validate(yaml.safe_load(SDXL_CONFIG)).applications[0]
    options = app.model_dump(exclude_unset=True)["deployments"][0]
    options.pop("name")
    # The controller's override_deployment_info does this: it imports and pickles the policy.
    autoscaling = DeploymentConfig(**options).autoscaling_config
    assert autoscaling is not None
    assert autoscaling.policy.policy_kwargs == {"units_per_replica": 6}
    assert autoscaling.metrics_interval_s == 1.0


def test_a_fixed_num_replicas_beside_autoscaling_config_is_refused():
    doc = yaml.safe_load(SDXL_CONFIG)
    doc["applications"][0]["deployments"][0]["num_replicas"] = 1
    with pytest.raises(ValueError, match="num_replicas is not allowed"):
        ServeDeploySchema.model_validate(doc)
