"""`doctor`'s checks of the cluster and of a spec against it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qlora_ray.config import ConfigError
from qlora_ray.doctor_machine import Check


def cluster_checks(embedded: bool, where: str) -> tuple[list[Check], list[dict[str, Any]], Any]:
    import ray

    from qlora_ray.cluster import AutoscalerView, autoscaler_view, node_summary

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    out = [Check("ok", "ray", f"{ray.__version__}, {where}, {len(nodes)} node(s)")]
    out += [Check("ok", "node", node_summary(n)) for n in nodes]
    view = (AutoscalerView("none", detail="embedded Ray") if embedded
            else autoscaler_view(ray.get_runtime_context().gcs_address))
    if view.kind == "unknown":
        out.append(Check("warn", "autoscaler", f"cannot tell whether nodes can be added: {view.detail}",
                         "`ray status` on the head shows the autoscaler; `run` waits as if one runs"))
    elif view.can_add_nodes:
        launching = ", ".join(f"{t} x{n}" for t, n in view.launching.items()) or "nothing"
        out.append(Check("ok", "autoscaler", f"{view.kind}: can add nodes; launching {launching}"))
        for node_type, why in sorted(view.failing.items()):
            out.append(Check("warn", "autoscaler", f"the last launch of {node_type} failed: {why}",
                             "a GPU quota of 0 (new AWS accounts) or no capacity in the region: see "
                             "docs/cluster.md, GPU quotas; `ray status` on the head shows more"))
    else:
        out.append(Check("ok", "autoscaler", f"none: a fixed cluster ({view.detail}); cells for a GPU "
                         "type no node has become unschedulable at once"))
    out.append(_auth_check(embedded, where))
    return out, nodes, view


def _auth_check(embedded: bool, where: str) -> Check:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    if get_authentication_mode() == AuthenticationMode.TOKEN:
        return Check("ok", "auth", "token (RAY_AUTH_MODE=token): every request carries the cluster's token")
    if embedded:
        return Check("ok", "auth", "none; the embedded Ray listens on this machine only")
    host = where.split("://")[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        return Check("ok", "auth", "none; reached on loopback (a tunnel, or this machine)")
    return Check("warn", "auth", f"none: anyone who reaches {where} can run code on the cluster",
                 "turn on token authentication: RAY_AUTH_MODE=token (docs/cluster.md, The token)")



def spec_checks(spec: Any, model_configs: list[str], nodes: list[dict[str, Any]], view: Any) -> list[Check]:
    from qlora_ray.planner import load_model_config, plan_spec
    from qlora_ray.profiles import get_profile

    out: list[Check] = []
    models = {(c.model.name, c.model.revision) for c in spec.cells}
    unreadable = False
    for name, revision in sorted(models, key=str):
        try:
            load_model_config(name, revision, model_configs)
            out.append(Check("ok", "config.json", f"{name}: readable"))
        except ConfigError as e:
            unreadable = True
            text = str(e).replace("\n", " ")
            gated = any(s in text for s in ("Gated", "gated", "401", "403", "Unauthorized"))
            if gated or not os.environ.get("HF_TOKEN"):
                fix = ("a gated model (Llama) needs its licence accepted on the hub and your token: "
                       "HF_TOKEN=hf_... (under `ray job submit`, in the env_vars of --runtime-env FILE, "
                       "docs/cluster.md); "
                       "offline: --model-configs DIR")
            else:
                fix = "a folder holding config.json as model.name, or --model-configs DIR"
            out.append(Check("fail", "config.json", text[:400], fix))
    data = _dataset_checks(spec)
    out += data
    # Planning reads the data too (token counts); a broken file is already reported above.
    if not unreadable and all(c.status != "fail" for c in data):
        plans = plan_spec(spec, model_configs=model_configs)
        bad = [p for p in plans if p.problems]
        if bad:
            shown = "; ".join(f"{p.name}: {p.problems[0]}" for p in bad[:3])
            shown += " ..." if len(bad) > 3 else ""
            out.append(Check("fail", "plan", f"{len(bad)} of {len(plans)} cells cannot run as specified: "
                             f"{shown}",
                             "`qlora-ray plan SPEC` shows every problem; fix the spec, or run with "
                             "--skip-unfit"))
        else:
            out.append(Check("ok", "plan", f"{len(plans)} cells, all fit their GPU profile"))
    # As the scheduler asks: an `emulate_profile` cell wants any GPU, not its profile's type.
    for gpu, emulate in sorted({(c.gpu, c.emulate_profile) for c in spec.cells if c.gpu and c.gpu != "cpu"}):
        out.append(_gpu_type_check(gpu, get_profile(gpu, spec.profiles), spec, nodes, view, emulate))
    return out


def _gpu_type_check(gpu: str, profile: Any, spec: Any, nodes: list[dict[str, Any]], view: Any,
                    emulate: bool = False) -> Check:
    from qlora_ray.cluster import describe_request
    from qlora_ray.tasks import feasible, requirement

    request = requirement(profile, 1, emulate)
    cells = sum(1 for c in spec.cells if c.gpu == gpu and c.emulate_profile == emulate)
    if emulate:
        gpu += f" (emulate_profile: any GPU; the worker refuses one smaller than {gpu})"
    offering = [n for n in nodes if feasible(request, [n])]
    if offering:
        return Check("ok", "gpu type", f"{gpu}: {len(offering)} node(s) offer {describe_request(request)}")
    if view.can_add_nodes:
        if any(all(abs(b.get(k, 0) - v) < 1e-9 for k, v in request.items()) for b in view.infeasible):
            return Check("fail", "gpu type", f"{gpu}: the autoscaler says no node type offers "
                         f"{describe_request(request)}",
                         "add a node type with this resource, or drop the cells")
        return Check("warn", "gpu type", f"{gpu}: no node offers {describe_request(request)} yet; the "
                     f"autoscaler can add nodes, and {cells} cell(s) will wait for one",
                     "make sure a node type advertises it (ray_cluster.yaml `resources`, k8s "
                     "rayStartParams) and the GPU quota allows it")
    return Check("fail", "gpu type", f"{gpu}: no node offers {describe_request(request)} and this cluster "
                 f"cannot add one: {cells} cell(s) would be unschedulable",
                 "run on a cluster with this card (or an autoscaler that has it), or exclude it from "
                 "the spec")


def _dataset_checks(spec: Any) -> list[Check]:
    from qlora_ray.datacheck import check_dataset

    out = []
    for path in sorted({c.dataset.path for c in spec.cells}):
        local = Path(path).expanduser()
        if local.is_file():
            # The check `plan` and `run` make: every line parsed, fields and template checked.
            problems: list[str] = []
            usable = set()
            for d in dict.fromkeys(c.dataset for c in spec.cells if c.dataset.path == path):
                try:
                    usable.add(check_dataset(d).usable)
                except ConfigError as e:
                    problems += [p for p in e.problems if p not in problems]
            if problems:
                out += [Check("fail", "dataset", p.split("; ")[0], p.split("; ", 1)[-1]) for p in problems]
            else:
                out.append(Check("ok", "dataset", f"{path}: {max(usable)} rows with an answer"))
        elif local.exists():
            try:
                with open(local, "rb") as f:
                    f.read(1)
                out.append(Check("ok", "dataset", f"{path}: readable (a folder, loaded by the workers)"))
            except OSError as e:
                out.append(Check("fail", "dataset", f"{path}: {e}", "make it readable by this user"))
        elif "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
            out.append(Check("ok", "dataset", f"{path}: a hub dataset id (loaded by the workers)"))
        else:
            out.append(Check("fail", "dataset", f"{path}: not found from {os.getcwd()}",
                             "paths in a spec are relative to the working directory (under `ray job submit`, "
                             "the --working-dir); run from the checkout, or give an absolute path"))
    return out

