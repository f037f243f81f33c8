"""How `run` (and `doctor`) reach Ray: join a cluster, or start the embedded one.

The embedded Ray listens on loopback only and uses token auth with a token that never
touches the disk; `stop_embedded` puts the environment back as it was.
"""

from __future__ import annotations

import os
import secrets


def connect(address: str | None, *, num_cpus: int | None = None,
            log_to_driver: bool = True) -> dict[str, str | None] | None:
    """Join a cluster (--address, $RAY_ADDRESS, or the job's own) or start an embedded one.

    Returns None when joining a cluster, else what `_private_token` changed in the
    environment (for `disconnect`): the cluster is embedded and cannot grow.
    """
    import ray

    # Ray retries a task its memory monitor killed forever by default; an OOM must not be
    # retried unchanged, it becomes an `oom` row. The owner (this driver) reads this.
    os.environ.setdefault("RAY_task_oom_retries", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return None
    return start_embedded(num_cpus=num_cpus, log_to_driver=log_to_driver)


def disconnect(embedded: dict[str, str | None] | None) -> None:
    """Leave the cluster `connect` joined, or stop the embedded one it started."""
    import ray

    if embedded is None:
        ray.shutdown()
    else:
        stop_embedded(embedded)


def start_embedded(*, num_cpus: int | None = None, log_to_driver: bool = True) -> dict[str, str | None]:
    """Start the embedded Ray of `run` and `doctor`: loopback only, token auth, no trace on disk.

    Returns what `_private_token` changed in the environment; `stop_embedded` puts it back.
    """
    import ray

    saved = _private_token()
    saved.update(_loopback_only())
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    except BaseException:
        _restore(saved)
        raise
    return saved


def stop_embedded(saved: dict[str, str | None]) -> None:
    import ray

    ray.shutdown()
    _restore(saved)


AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_only() -> dict[str, str | None]:
    """Make the embedded Ray's node IP 127.0.0.1, so that every server of it listens on loopback.

    The GCS, raylet, workers and agents bind to loopback only when the node IP is exactly
    127.0.0.1 (gcs_server.cc, node_manager.cc: `node_ip_address == "127.0.0.1"`;
    dashboard/agent.py: `is_localhost(self.ip)`), but on Linux Ray turns 127.0.0.1 into the
    host's routable address (ray/_private/services.py, resolve_ip_for_localhost and
    get_node_ip_address) unless clusters are off, as Ray has them on macOS and Windows for
    the same reason. Off is what an embedded Ray is: one node that never grows.
    """
    from ray._private import ray_constants

    saved = {SINGLE_NODE: os.environ.get(SINGLE_NODE)}
    os.environ[SINGLE_NODE] = "0"  # Ray's child processes read it at import
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process has read it already (Ray 2.52-2.60)
    return saved


def _private_token() -> dict[str, str | None]:
    """Token authentication for the embedded Ray, with a token that never touches the disk.

    Left to itself, `ray.init()` turns token auth on only from Ray 2.59 and then saves its
    token to ~/.ray/auth_token, readable by everyone (default umask), where every later
    `ray start --head` finds it and turns token auth on, so the user's next plain
    `ray job submit` fails. Instead: token mode for every Ray we allow (>= 2.52, where token
    auth exists), and a fresh token in RAY_AUTH_TOKEN, which Ray reads before any file and
    which only the processes this driver starts inherit (/proc/PID/environ is readable by
    their owner alone). With the loopback node IP (`_loopback_only`) no other host reaches
    the embedded cluster; the token keeps other users of this machine out.
    """
    saved = {k: os.environ.get(k) for k in AUTH_VARIABLES}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    _reload_ray_auth()
    return saved


def _restore(saved: dict[str, str | None]) -> None:
    from ray._private import ray_constants

    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reload_ray_auth()
    if SINGLE_NODE in saved:  # what ray_constants computes at import, from the restored variable
        default = not ray_constants.IS_WINDOWS_OR_OSX
        ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(SINGLE_NODE, default)


def _reload_ray_auth() -> None:
    # Ray reads RAY_AUTH_MODE into its config and caches the token when ray is imported;
    # re-read both, as Ray's own ray/_private/authentication/authentication_token_setup.py
    # (_enable_token_auth, Ray 2.60) does after changing the mode. Both exist since 2.52.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
