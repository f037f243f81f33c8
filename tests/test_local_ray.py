"""The embedded Ray is private and leaves no trace; the README's local Ray steps then work.

One HOME for the whole test, as for a user: a run and a `doctor` on the embedded Ray
first (what the quickstart and "Check before you run" do), then the README's "On a local
Ray cluster" block, run as written in a shell of that same HOME. (A fresh folder stands in for the user's home so that a machine's
own ~/.ray cannot decide the outcome; no test here hides the embedded run's effects from
the README steps.)

While the embedded run trains, the test checks its Ray from outside: every socket it
listens on is a loopback one, token mode on (it is default only from Ray 2.59), the token
held in the environment of Ray's own processes (readable by their owner alone) and in no
file, a client without it refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from conftest import DATA, ROOT
from ray_cluster import BIN
from readme_blocks import port_is_free

pytestmark = pytest.mark.slow
MARKER = "<!-- tests/test_local_ray.py runs this block as written"


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARKER):]
    return re.search(r"```bash\n(.*?)```", after, re.S).group(1)


def checkout_copy(dest: Path) -> Path:
    """The repository's files (tracked and new, not ignored) in a folder of their own, so the
    README's `--results "$PWD/results"` writes there and not into the developer's results/."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def embedded_gcs(ray_tmp: Path, driver: subprocess.Popen, timeout: float = 300) -> tuple[psutil.Process, int]:
    """The GCS server of the Ray whose session lives under `ray_tmp`, and its port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        ports = list(ray_tmp.glob("ray/session_*/gcs_server_port_*"))
        text = ports[0].read_text().strip() if ports else ""
        if text.isdigit():
            for p in psutil.process_iter(["name"]):
                if p.info["name"] == "gcs_server" and str(ray_tmp) in " ".join(p.cmdline()):
                    return p, int(text)
        time.sleep(0.5)
    raise AssertionError(f"the embedded Ray never started: {driver.communicate(timeout=60)[0][-3000:]}")


def listening_on(port: int) -> list[str]:
    """Who listens on `port` (for a failure message)."""
    return [f"{c.laddr.ip}:{port} pid {c.pid}" for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def listening(pid: int) -> list[tuple[str, str, int]]:
    """(process, address, port) of each TCP socket that `pid` or a descendant listens on."""
    root = psutil.Process(pid)
    found = []
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            found += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
    return found


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def test_the_embedded_ray_is_private_and_the_readme_local_ray_steps_work_after_it(tmp_path, ray_tmp):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # QLORA_RAY_CACHE (the tests' own, tests/conftest.py) comes along with os.environ.
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")

    # 1. A run on the embedded Ray, long enough to look at its Ray from outside.
    spec = tmp_path / "embedded.yaml"
    spec.write_text(yaml.safe_dump({"name": "embedded", "base": {
        "model": "builtin:tiny-llama",
        "dataset": {"path": str(DATA), "eval_size": 8},
        "quant": {"compute_dtype": "float32"},
        "train": {"max_steps": 40, "batch_size": 2, "optim": "adamw_torch", "gradient_checkpointing": False},
        "eval": {"max_new_tokens": 2, "before": False, "max_samples": 2}}}))
    driver = subprocess.Popen([str(BIN / "qlora-ray"), "run", str(spec), "--results", str(tmp_path / "emb"),
                               "--num-cpus", "1"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        gcs, port = embedded_gcs(ray_tmp, driver)
        environ = Path(f"/proc/{gcs.pid}/environ")
        assert environ.stat().st_mode & 0o077 == 0  # the token's only copy outside the driver
        token = dict(kv.split("=", 1) for kv in environ.read_text().split("\0") if "=" in kv)
        assert token.get("RAY_AUTH_MODE") == "token" and len(token.get("RAY_AUTH_TOKEN", "")) >= 32
        # A client without the token (as any other user or host would be) is refused by the GCS.
        # On Linux Ray's client turns 127.0.0.1 into the host's address (services.py
        # resolve_ip_for_localhost), where this GCS does not listen; the client is put in the
        # same single-node mode so that it reaches the GCS and meets its token check.
        anonymous = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{port}"],
                                   env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                                   capture_output=True, text=True, timeout=120)
        assert anonymous.returncode != 0
        assert "uthentication" in anonymous.stdout + anonymous.stderr, anonymous.stdout + anonymous.stderr
        # Nothing listens beyond this machine: the GCS, raylet, agents and the cell's worker
        # (the driver starts them all) are on loopback only.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None and not any(
                "ray::qlora-ray:" in " ".join(p.cmdline()) for p in psutil.Process(driver.pid).children(True)):
            time.sleep(0.5)
        sockets = listening(driver.pid)
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in sockets}, sockets
        assert all(loopback(ip) for _, ip, _ in sockets), sockets
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output
    # `doctor` without --address checks the same embedded Ray.
    doctor = subprocess.run([str(BIN / "qlora-ray"), "doctor"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert re.search(r"^ok +auth +token", doctor.stdout, re.M), doctor.stdout + doctor.stderr
    assert not (home / ".ray").exists(), "the embedded Ray left ~/.ray behind"
    secret = token["RAY_AUTH_TOKEN"]
    for path in [*home.rglob("*"), *ray_tmp.rglob("*")]:
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), f"the embedded Ray's token is in {path}"

    # 2. The README's local Ray block, as written, in the same HOME.
    # `ray start --head` starts its dashboard on 8265 only if the port is free (else it goes
    # on without one, and the block's `ray job submit` talks to whatever holds the port).
    for port in (6379, 8265):
        if not port_is_free(port):
            pytest.fail(f"127.0.0.1:{port} is taken before the README block runs: {listening_on(port)}")
    checkout = checkout_copy(tmp_path / "checkout")
    shell_env = {**env, "PATH": f"{BIN}:{env['PATH']}", "VIRTUAL_ENV": str(BIN.parent)}
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=checkout, env=shell_env,
                              capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=shell_env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout.lower()
    token_file = home / ".ray" / "auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600 and secret not in token_file.read_text()

    from qlora_ray.grid import load_spec

    cells = load_spec(ROOT / "experiments" / "quickstart.yaml").cells
    df = pd.read_parquet(checkout / "results" / "quickstart" / "runs")
    assert len(df) == len(cells) and (df.status == "ok").all()
    assert df["ray_node_id"].notna().all() and df["started_at"].dt.tz is not None
    assert str(df["status"].dtype) in ("object", "str", "string") and df["peak_memory_bytes"].dtype == "int64"
    # The planner counted the very tokens and steps the Trainer saw, and said how long.
    assert (df["predicted_train_tokens"] == df["train_tokens"]).all()
    assert (df["predicted_steps"] == df["train_steps"]).all()
    assert (df["predicted_seconds"] > 0).all() and (df["predicted_gpu_seconds"] > df["predicted_seconds"]).all()
    assert (checkout / "results" / "quickstart" / "samples").is_dir()
