"""A real local Ray cluster for tests: `ray start --head` (+ optional extra nodes), stopped after.

Logical GPUs and `accelerator_type:*` resources make GPU scheduling testable without a GPU;
tasks then run with --allow-cpu-fallback. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    tmp: Path
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, *, num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None,
              dashboard: bool = False, extra: list[str] | None = None) -> None:
        ray_tmp = self.tmp / "r"
        ray_tmp.mkdir(parents=True, exist_ok=True)
        home = self.tmp / "home"
        home.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            # A ~/.ray/auth_token left by someone's `ray get-auth-token --generate` switches the
            # head to token auth while `ray start --address` sends none; a private HOME keeps
            # the test cluster plain. QLORA_RAY_CACHE (the run's, tests/conftest.py) stays.
            "HOME": str(home),
            "RAY_TMPDIR": str(ray_tmp),
            "TMPDIR": str(ray_tmp),
            # The job driver and workers find qlora-ray and python on PATH, as in the image.
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            "QLORA_RAY_ALLOW_CPU_FALLBACK": "",
        }
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
               f"--port={self.port}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
               f"--temp-dir={ray_tmp}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if dashboard:
            cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd.append("--include-dashboard=false")
        self._run(cmd + list(extra or []))

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def add_node(self, *, num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None,
                 labels: dict[str, str] | None = None) -> None:
        cmd = [str(BIN / "ray"), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if labels:
            cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        self._run(cmd)
        time.sleep(1)

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)

    def qlora_ray(self, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "qlora-ray"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kw)
