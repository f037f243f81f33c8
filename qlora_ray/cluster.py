"""What a Ray cluster offers and whether it can grow; used by `run` (driver.py) and `doctor`.

Read from Ray's own reports (the autoscaler's status), never from a cluster config file;
docs/cluster.md ("How `run` uses Ray") says which report and what it means.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

# ray/_private/ray_constants.py: DEBUG_AUTOSCALING_STATUS
AUTOSCALING_STATUS_KEY = b"__autoscaling_status"
_READONLY_TYPE = re.compile(r"node_[0-9a-f]{56}")

Kind = Literal["none", "readonly", "v1", "v2", "unknown"]


@dataclass(frozen=True)
class AutoscalerView:
    """The autoscaler's latest report, reduced to what `run` and `doctor` need."""

    kind: Kind
    # Node type -> nodes being launched or set up.
    launching: dict[str, int] = field(default_factory=dict)
    # v1: the resources those nodes will bring, summed; None where the report does not say (v2).
    launching_resources: dict[str, float] | None = None
    # Node type -> its last launch error, for types whose last launch failed.
    failing: dict[str, str] = field(default_factory=dict)
    # v2: resource requests that no node type can satisfy.
    infeasible: tuple[dict[str, float], ...] = ()
    detail: str = ""

    @property
    def can_add_nodes(self) -> bool:
        # "unknown" (the report could not be read) counts as able: better to wait than to
        # give up on a cell a node may be coming for.
        return self.kind in ("v1", "v2", "unknown")

    def coming_for(self, request: dict[str, float]) -> bool:
        """Is a node that would fit `request` being launched or set up right now?

        v1 reports the summed resources of all nodes under way, so a request counts as
        fitting when that sum covers it (types whose launches keep failing are left out
        when they are the only ones under way). v2 does not report what pending nodes
        offer; there, anything under way counts unless the autoscaler called the request
        infeasible.
        """
        if self.kind not in ("v1", "v2"):
            return False
        if not {t for t, n in self.launching.items() if n and t not in self.failing}:
            return False
        if any(_same_request(bundle, request) for bundle in self.infeasible):
            return False
        if self.launching_resources is None:
            return True
        return all(self.launching_resources.get(k, 0) >= v for k, v in request.items())


def _same_request(a: dict[str, float], b: dict[str, float]) -> bool:
    keys = {k for k, v in {**a, **b}.items() if v}
    return all(abs(a.get(k, 0) - b.get(k, 0)) < 1e-9 for k in keys)


def parse_v1_status(raw: bytes | str | None) -> AutoscalerView:
    """The v1 monitor's `__autoscaling_status` JSON (None: no monitor has written one)."""
    # No report (yet): the monitor may be starting, or waiting for its first load report.
    # Only a report that shows a read-only monitor proves the cluster cannot grow.
    if not raw:
        return AutoscalerView("unknown", detail="no autoscaler report in the GCS yet")
    status = json.loads(raw)
    report = status.get("autoscaler_report")
    if not report:
        return AutoscalerView("unknown", detail="the autoscaler has not reported yet")
    launching: dict[str, int] = {}
    for node_type, count in (report.get("pending_launches") or {}).items():
        launching[node_type] = launching.get(node_type, 0) + int(count)
    for _ip, node_type, _status in report.get("pending_nodes") or []:
        launching[node_type] = launching.get(node_type, 0) + 1
    types = set(report.get("active_nodes") or {}) | set(launching)
    if types and all(_READONLY_TYPE.fullmatch(t) for t in types):
        return AutoscalerView("readonly", detail="read-only monitor: nodes started by hand, none launched")
    failing = {}
    availabilities = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
    for node_type, record in availabilities.items():
        if not record.get("is_available", True):
            info = record.get("unavailable_node_information") or {}
            failing[node_type] = f"{info.get('category', 'error')}: {info.get('description', '')}".strip()
    pending = {k: float(v) for k, v in (report.get("pending_resources") or {}).items()}
    return AutoscalerView("v1", launching=launching, launching_resources=pending, failing=failing)


def parse_v2_reply(reply: Any) -> AutoscalerView:
    """A `GetClusterStatusReply` (ray.core.generated.autoscaler_pb2)."""
    state = reply.autoscaling_state
    types = {n.ray_node_type_name for n in reply.cluster_resource_state.node_states if n.ray_node_type_name}
    if not state.autoscaler_state_version:
        return AutoscalerView("unknown", detail="the autoscaler has not reported yet")
    if types and all(_READONLY_TYPE.fullmatch(t) for t in types) and not state.pending_instance_requests:
        return AutoscalerView("readonly", detail="read-only autoscaler: nodes started by hand, none launched")
    launching: dict[str, int] = {}
    for r in state.pending_instance_requests:
        launching[r.ray_node_type_name] = launching.get(r.ray_node_type_name, 0) + int(r.count)
    for inst in state.pending_instances:
        launching[inst.ray_node_type_name] = launching.get(inst.ray_node_type_name, 0) + 1
    underway = {inst.ray_node_type_name for inst in state.pending_instances}
    failing = {r.ray_node_type_name: r.reason for r in state.failed_instance_requests
               if r.ray_node_type_name not in underway}
    infeasible = tuple(dict(r.resources_bundle) for r in state.infeasible_resource_requests)
    return AutoscalerView("v2", launching=launching, failing=failing, infeasible=infeasible)


def autoscaler_view(gcs_address: str) -> AutoscalerView:
    """Ask the running cluster (v2 if its autoscaler says so, else v1's report)."""
    try:
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        gcs = GcsClient(address=gcs_address)
        if is_autoscaler_v2(fetch_from_server=True, gcs_client=gcs):
            from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

            reply = GetClusterStatusReply()
            reply.ParseFromString(gcs.get_cluster_status(timeout_s=10))
            return parse_v2_reply(reply)
        return parse_v1_status(gcs.internal_kv_get(AUTOSCALING_STATUS_KEY))
    except Exception as e:  # a report we cannot read must not stop the grid
        detail = f"cannot read the autoscaler's report ({type(e).__name__}: {e})"
        return AutoscalerView("unknown", detail=detail[:500])


class NodeWaits:
    """How long `run` lets a cell wait for a node that no live node is (driver.py).

    `timeout` None is the default: 0 where no node can be added (the embedded Ray, a fixed
    cluster), `default` where an autoscaler can add one. A cell's clock restarts whenever
    a node that would fit it is being launched or set up, so a cold node's start-up time
    (instance, SSH, image pull, `ray start`) never counts against it.
    """

    def __init__(self, timeout: float | None, default: float, *, embedded: bool, refresh_s: float = 5.0):
        self.timeout = timeout
        self.default = default
        self.embedded = embedded
        self.refresh_s = refresh_s
        self.next_check = 0.0
        self._view = AutoscalerView("none", detail="embedded Ray")
        self._view_at: float | None = None

    def view(self) -> AutoscalerView:
        if self.embedded:
            return self._view
        if self._view_at is None or time.monotonic() - self._view_at >= self.refresh_s:
            import ray

            self._view = autoscaler_view(ray.get_runtime_context().gcs_address)
            self._view_at = time.monotonic()
        return self._view

    def limit(self, view: AutoscalerView) -> float:
        if self.timeout is not None:
            return self.timeout
        return self.default if view.can_add_nodes else 0.0


def unschedulable_reason(
    view: AutoscalerView, request: dict[str, float], gpu: str | None, waited: float
) -> str:
    """The `error` of an `unschedulable` row: what was missing, why no node came, what to do."""
    wanted = f"no node offers {describe_request(request)} (gpu {gpu!r})"
    if not view.can_add_nodes:
        return (f"{wanted} and this cluster cannot add one ({view.detail or 'no autoscaler'}); start such "
                "a node, use a cluster whose autoscaler has this node type, or drop the cell "
                "(--unschedulable-timeout S waits S seconds for nodes started by hand)")
    reason = f"{wanted} and none that would was being launched for {waited:.0f}s"
    if view.failing:
        reason += "; the autoscaler's last launches failed: " + "; ".join(
            f"{t}: {why}" for t, why in sorted(view.failing.items()))
    return reason + ("; check the cluster config's node types, the account's GPU quota and the region's "
                     "capacity (`ray status` on the head), or drop the cell")


def describe_request(request: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in request.items())


def node_summary(node: dict[str, Any]) -> str:
    """One line per `ray.nodes()` entry: GPUs, accelerator resources and labels."""
    res = node.get("Resources") or {}
    accel = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
    labels = {k: v for k, v in (node.get("Labels") or {}).items() if k != "ray.io/node-id"}
    parts = [f"{res.get('CPU', 0):g} CPU", f"{res.get('GPU', 0):g} GPU"]
    if accel:
        parts.append("accelerator_type " + "/".join(accel))
    if labels:
        parts.append("labels " + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
    return f"{node.get('NodeManagerAddress', '?')} ({node.get('NodeID', '')[:8]}): " + ", ".join(parts)
