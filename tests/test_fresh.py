"""fresh.py: every experiment in a new process, forked from a zygote that imported the
heavy libraries once; the task's environment, not the zygote's; nothing outlives its task.

These use a zygote that preloads nothing (the same protocol, milliseconds to start); a
preloading one runs under Ray in test_benchmarks.py's overhead smoke test.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from qlora_ray import fresh

HERE = __name__  # this module, importable in the zygote's children (the zygote gets sys.path)


def whoami() -> dict:
    import gc

    return {"pid": os.getpid(), "ppid": os.getppid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "torch_already_imported": "torch" in sys.modules, "frozen": gc.get_freeze_count()}


def die_by(signum: int) -> None:
    os.kill(os.getpid(), signum)


def fail(message: str) -> None:
    raise ValueError(message)


def sleep_forever(pidfile: str) -> None:
    Path(pidfile).write_text(str(os.getpid()))
    time.sleep(600)


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (dead, not yet reaped by its parent) counts as gone.
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def zygote(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what the first task's process had
    z = fresh.Zygote(preload=False)
    yield z
    z.close()


def test_each_run_is_a_new_process_with_the_callers_environment(zygote):
    first = zygote.run(f"{HERE}:whoami", {}, {"CUDA_VISIBLE_DEVICES": "1"})
    second = zygote.run(f"{HERE}:whoami", {}, {"CUDA_VISIBLE_DEVICES": ""})
    # Two processes, neither of them ours nor the zygote; both children of the zygote.
    assert first["pid"] != second["pid"]
    assert {first["pid"], second["pid"]}.isdisjoint({os.getpid(), zygote.proc.pid})
    assert first["ppid"] == second["ppid"] == zygote.proc.pid
    # Each took the GPU its task was given, not the one the zygote was started with.
    assert (first["cuda"], second["cuda"]) == ("1", "")
    # The zygote's objects are out of the children's collections (a child's gc.collect
    # would otherwise walk, and copy, the zygote's whole heap: ~1 s a cell with torch in it).
    assert first["frozen"] > 1000


def test_a_child_killed_by_a_signal_is_an_error_naming_it_and_the_zygote_goes_on(zygote):
    with pytest.raises(fresh.ExperimentProcessDied, match=r"killed by SIGKILL .*OOM killer"):
        zygote.run(f"{HERE}:die_by", {"signum": signal.SIGKILL}, {})
    with pytest.raises(fresh.ExperimentProcessDied, match="killed by SIGSEGV"):
        zygote.run(f"{HERE}:die_by", {"signum": signal.SIGSEGV}, {})
    assert zygote.run(f"{HERE}:whoami", {}, {})["ppid"] == zygote.proc.pid


def test_an_exception_in_the_child_comes_back_as_its_message(zygote):
    with pytest.raises(fresh.ExperimentRaised, match="ValueError: no good"):
        zygote.run(f"{HERE}:fail", {"message": "no good"}, {})
    assert zygote.run(f"{HERE}:whoami", {}, {})["pid"] > 0  # nothing left over in the socket


@pytest.mark.parametrize("how", ["task process goes", "zygote killed"])
def test_a_running_child_dies_with_its_task(zygote, tmp_path, how):
    """ray.cancel(force=True), Ray's memory monitor or a node going kill the task's process;
    the experiment it started must not train on, holding its GPU."""
    pidfile = tmp_path / "pid"
    errors: list[BaseException] = []

    def call() -> None:
        try:
            zygote.run(f"{HERE}:sleep_forever", {"pidfile": str(pidfile)}, {})
        except BaseException as exc:  # EOF or a reset socket: the caller is told, not left hanging
            errors.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    child = int(pidfile.read_text())
    if how == "task process goes":
        zygote.close()  # its socket ends, as when the kernel closes a dead task process's files
    else:
        zygote.proc.kill()
    assert gone(child), f"the experiment's process {child} outlived its {how}"
    assert zygote.proc.wait(timeout=10) is not None
    caller.join(timeout=10)
    assert errors and not caller.is_alive()


def test_run_in_fresh_process_keeps_one_zygote_and_replaces_a_dead_one(monkeypatch):
    monkeypatch.setenv(fresh.PRELOAD_ENV, "0")
    monkeypatch.setattr(fresh, "_zygote", None)
    try:
        a = fresh.run_in_fresh_process(f"{HERE}:whoami", {})
        with pytest.raises(fresh.ExperimentProcessDied):
            fresh.run_in_fresh_process(f"{HERE}:die_by", {"signum": signal.SIGKILL})
        b = fresh.run_in_fresh_process(f"{HERE}:whoami", {})
        # One zygote for all three: a child's death does not cost the next cell a new one.
        assert a["ppid"] == b["ppid"] and a["pid"] != b["pid"] and not fresh.preloaded()
        fresh._zygote.proc.kill()
        fresh._zygote.proc.wait()
        c = fresh.run_in_fresh_process(f"{HERE}:whoami", {})
        assert c["ppid"] != a["ppid"]
    finally:
        if fresh._zygote is not None:
            fresh._zygote.close()


def test_a_gpu_build_of_torch_never_preloads_bitsandbytes_importers():
    """bitsandbytes asks the cards for their compute capability at import, which starts
    CUDA; a zygote that did so would hand its children a CUDA they cannot use."""
    assert not set(fresh.preload_modules(has_gpu_backend=True)) & {"qlora_ray.modeling", "qlora_ray.train",
                                                                  "peft", "bitsandbytes"}
    assert set(fresh.preload_modules(has_gpu_backend=False)) >= {"torch", "transformers", "qlora_ray.train"}


def test_an_experiment_process_does_not_import_ray_for_its_provenance():
    """Its Ray task adds the node id; importing Ray to learn there is none took 2 s a cell."""
    import subprocess

    probe = ("import sys; from qlora_ray import provenance; "
             "print(provenance.ray_node_id(), 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]
