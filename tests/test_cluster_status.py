"""cluster.py reads the autoscaler's report the way Ray writes it, and decides when a cell gives up.

The v1 reports are built with Ray's own classes and serialized as its monitor does
(`status["autoscaler_report"] = asdict(autoscaler_summary)`, then json.dumps; see
ray/autoscaler/_private/monitor.py), the v2 ones with Ray's protobuf messages. The same
parser reads a real cluster's report in tests/test_scheduler_ray.py and
tests/test_autoscaler_wait.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from qlora_ray.cluster import AutoscalerView, parse_v1_status, parse_v2_reply, unschedulable_reason

H100 = {"GPU": 1.0, "CPU": 1.0, "accelerator_type:H100": 0.001}
T4 = {"GPU": 1.0, "CPU": 1.0, "accelerator_type:T4": 0.001}


def v1_report(*, active: dict[str, int], pending_launches: dict[str, int] | None = None,
              pending_nodes: list[tuple[str, str, str]] | None = None,
              pending_resources: dict[str, float] | None = None,
              unavailable: dict[str, tuple[str, str]] | None = None) -> str:
    from ray.autoscaler._private.autoscaler import AutoscalerSummary
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilityRecord,
        NodeAvailabilitySummary,
        UnavailableNodeInformation,
    )

    records = {
        t: NodeAvailabilityRecord(node_type=t, is_available=False, last_checked_timestamp=time.time(),
                                  unavailable_node_information=UnavailableNodeInformation(category=c, description=d))
        for t, (c, d) in (unavailable or {}).items()
    }
    summary = AutoscalerSummary(
        active_nodes=active, idle_nodes=None, pending_nodes=pending_nodes or [],
        pending_launches=pending_launches or {}, failed_nodes=[],
        node_availability_summary=NodeAvailabilitySummary(records),
        pending_resources=pending_resources or {}, legacy=True)
    return json.dumps({"time": time.time(), "autoscaler_report": asdict(summary), "load_metrics_report": {}})


def test_a_head_started_by_hand_is_a_fixed_cluster() -> None:
    from ray.autoscaler._private.util import format_readonly_node_type

    ids = ["891fb8e442d003b57c712687528c8339ef65e7889e2e96a3141153df", "0a139c025d776bb343f2a85858f1477d23c9232b98868c0ea7036916"]
    view = parse_v1_status(v1_report(active={format_readonly_node_type(i): 1 for i in ids}))
    assert view.kind == "readonly" and not view.can_add_nodes
    assert not view.coming_for(H100)
    # No report at all (a monitor starting up) proves nothing: wait as if it could grow.
    assert parse_v1_status(None).kind == "unknown" and parse_v1_status(None).can_add_nodes


def test_a_launching_node_that_fits_keeps_the_cell_waiting() -> None:
    view = parse_v1_status(v1_report(
        active={"head": 1}, pending_launches={"gpu_h100": 1},
        pending_resources={"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}))
    assert view.kind == "v1" and view.can_add_nodes
    assert view.coming_for(H100)
    assert not view.coming_for(T4)  # an H100 node does not help a T4 cell

    # A node past launch, waiting for SSH / setting up, counts too.
    setting_up = parse_v1_status(v1_report(
        active={"head": 1}, pending_nodes=[("10.0.0.7", "gpu_h100", "setting-up")],
        pending_resources={"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}))
    assert setting_up.coming_for(H100)


def test_a_type_whose_launches_keep_failing_is_not_coming() -> None:
    failing = parse_v1_status(v1_report(
        active={"head": 1}, pending_launches={"gpu_h100": 1},
        pending_resources={"CPU": 192, "GPU": 8, "accelerator_type:H100": 1},
        unavailable={"gpu_h100": ("VcpuLimitExceeded", "You have requested more vCPU capacity than your current vCPU limit of 0")}))
    assert not failing.coming_for(H100)
    reason = unschedulable_reason(failing, H100, "H100", 600)
    assert "accelerator_type:H100=0.001" in reason and "VcpuLimitExceeded" in reason and "quota" in reason


def test_the_reason_says_when_the_cluster_cannot_grow_at_all() -> None:
    view = AutoscalerView("readonly", detail="read-only monitor: nodes started by hand, none launched")
    reason = unschedulable_reason(view, H100, "H100", 0)
    assert reason.startswith("no node offers GPU=1, CPU=1, accelerator_type:H100=0.001 (gpu 'H100')")
    assert "cannot add one" in reason and "--unschedulable-timeout" in reason


def test_v2_reports_pending_infeasible_and_failed_requests() -> None:
    from ray.core.generated import autoscaler_pb2 as pb

    reply = pb.GetClusterStatusReply()
    state: Any = reply.autoscaling_state
    state.autoscaler_state_version = 3
    state.pending_instance_requests.add(ray_node_type_name="gpu_h100", count=1)
    infeasible = state.infeasible_resource_requests.add()
    infeasible.resources_bundle.update(T4)
    reply.cluster_resource_state.node_states.add(ray_node_type_name="head")
    view = parse_v2_reply(reply)
    assert view.kind == "v2" and view.coming_for(H100)
    assert not view.coming_for(T4)  # the autoscaler said no node type has it

    state.failed_instance_requests.add(ray_node_type_name="gpu_h100", reason="InsufficientInstanceCapacity")
    assert not parse_v2_reply(reply).coming_for(H100)
    assert parse_v2_reply(pb.GetClusterStatusReply()).kind == "unknown"
