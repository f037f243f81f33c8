"""A fresh process per experiment that does not pay torch's imports on the critical path.

Every experiment must run in a process of its own: a CUDA context, bitsandbytes' paged
optimizer state or an allocator's cache from one cell must never reach the next. Starting
a Python process and importing torch, transformers, peft and bitsandbytes takes 5-20 s,
which used to be paid by every cell, on its GPU, before its first step.

Instead, the process Ray runs the task in (reused across tasks: it never touches CUDA)
keeps one *zygote*: a Python process it started once, which imported the heavy libraries
and then only forks. Each experiment runs in a new child of the zygote: a new process
whose memory holds the imported modules and nothing else (the zygote never runs an
experiment), forked in milliseconds.

Why not the alternatives:

* Python's `multiprocessing` forkserver does the same, but its children re-run the parent's
  `__main__` (here Ray's default_worker.py, which imports Ray) and inherit the server's
  environment, while each child must take CUDA_VISIBLE_DEVICES from its own Ray task.
* Ray's `worker_process_setup_hook` runs when a worker process starts, which with one
  process per task is on the critical path again; Ray 2.60 has no API to start the next
  process while the current task runs (`enable_worker_prestart` only fills free CPUs).

CUDA: a process that initialized the CUDA driver cannot hand it to a forked child (torch
refuses: "Cannot re-initialize CUDA in forked subprocess"). So the zygote never touches
it: torch's availability check goes through NVML (PYTORCH_NVML_BASED_CUDA_CHECK, torch's
documented fork-safe check), and with a CUDA build of torch the zygote leaves out
bitsandbytes (and peft and the Trainer, which import it), whose import asks the cards for
their compute capability; each child imports those itself, with its own
CUDA_VISIBLE_DEVICES already set. With a CPU build of torch everything is preloaded.
Each child gets the environment of the Ray task that asked for it (Ray sets
CUDA_VISIBLE_DEVICES per task), not the zygote's.

Lifetimes: the zygote exits when the task's process goes (its end of the socket closes),
killing a child still running; a child dies with the zygote (PR_SET_PDEATHSIG). So
`ray.cancel(force=True)`, Ray's memory monitor and a killed worker stop the experiment as
before. A child that dies without a result (killed by the kernel's OOM killer, a crash in
native code) raises `ExperimentProcessDied` in the task, which the driver makes a
`failed` row.

`QLORA_RAY_PRELOAD=0` turns the preloading off (the zygote imports nothing; each child
imports everything itself, as a cold process would): the benchmarks' comparison, and a
way out should some library start CUDA at import.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

PRELOAD_ENV = "QLORA_RAY_PRELOAD"
# Safe to import in a process that forks CUDA users: none of these touches the CUDA driver
# at import (the availability check goes through NVML, see above).
PRELOAD = ("torch", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.llama.modeling_llama", "datasets", "pyarrow.parquet",
           "qlora_ray.worker", "qlora_ray.data", "qlora_ray.evaluate", "qlora_ray.results")
# bitsandbytes asks every visible card for its compute capability at import
# (bitsandbytes/cuda_specs.py get_compute_capabilities -> torch.cuda.get_device_capability,
# which initializes CUDA); peft (peft/helpers.py) and transformers' Trainer import it. Only
# preloaded when torch has no GPU backend at all.
PRELOAD_WITHOUT_GPU_BACKEND = ("qlora_ray.modeling", "qlora_ray.train")

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ExperimentProcessDied(RuntimeError):
    """The experiment's process ended without returning its result."""


class ExperimentRaised(RuntimeError):
    """The function run in the experiment's process raised (its type and message)."""


def preload_enabled() -> bool:
    return os.environ.get(PRELOAD_ENV, "1") != "0"


def preload_modules(has_gpu_backend: bool) -> tuple[str, ...]:
    return PRELOAD if has_gpu_backend else PRELOAD + PRELOAD_WITHOUT_GPU_BACKEND


class Zygote:
    """A started zygote process and the socket to it (one experiment at a time)."""

    def __init__(self, preload: bool = True) -> None:
        import socket
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTORCH_NVML_BASED_CUDA_CHECK="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qlora_ray.fresh", str(theirs.fileno()), "1" if preload else "0"],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(sys.path)  # the task's imports (a job's working_dir, test hooks)
        kind, self.info = self.conn.recv()  # ("ready", what it imported and how long it took)
        assert kind == "ready", kind

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, target: str, kwargs: dict[str, Any], env: dict[str, str]) -> Any:
        """`module:function`(**kwargs) in a new child with environment `env`; its return value."""
        self.conn.send((target, kwargs, env))
        result: Any = None
        got = False
        error = None
        while True:
            kind, value = self.conn.recv()
            if kind == "result":
                result, got = value, True
            elif kind == "error":  # the child's own exception, as text (it need not pickle)
                error = value
            elif kind == "exit":  # always last: the zygote sends it once the child is gone
                if error is not None:
                    raise ExperimentRaised(error)
                if not got:
                    raise ExperimentProcessDied(
                        f"the experiment's process {value['pid']} ended without a result: "
                        f"{_describe_exit(value['code'])}")
                return result

    def close(self) -> None:
        """Stop the zygote, and the child it runs (it sees its socket end: EOF)."""
        import socket

        # shutdown, not only close: a thread blocked reading the socket keeps it open.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_zygote: Zygote | None = None


def run_in_fresh_process(target: str, kwargs: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    """Run `module:function`(**kwargs) in a fresh process forked from this process's zygote.

    The zygote is started at the first call (that call pays the imports) and kept for the
    next ones. `env`: the child's whole environment (default: this process's, now).
    """
    global _zygote
    if _zygote is None or not _zygote.alive():
        try:
            _zygote = Zygote(preload=preload_enabled())
        except EOFError:  # it refused to preload (it says why on stderr): a cold one
            _zygote = Zygote(preload=False)
    try:
        return _zygote.run(target, kwargs, dict(os.environ if env is None else env))
    except (ExperimentRaised, ExperimentProcessDied):
        raise  # that child's end; the zygote is as it was, ready for the next one
    except BaseException:
        # Interrupted or cancelled while waiting, or the zygote itself went: start over
        # next time, and take any running child down with it now.
        _zygote.close()
        _zygote = None
        raise


# Ray hands a job's `worker_process_setup_hook` to its worker processes in this variable
# (ray/_private/ray_constants.py WORKER_PROCESS_SETUP_HOOK_ENV_VAR); a callable's is a key
# into the GCS with this prefix (ray/_private/runtime_env/setup_hook.py).
RAY_SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
RAY_SETUP_HOOK_FUNC_PREFIX = "ray_runtime_env_func::"


def run_cell(payload: dict[str, Any]) -> Any:
    """One Ray task's experiment, in its fresh process: `worker.run_experiment`'s RunOutput.

    A job's setup hook given as a module path runs here first, as Ray runs it in each of
    its worker processes (Ray ran it in the task's process, which does not train); a hook
    given as a callable lives in Ray's GCS, which this process does not join.
    """
    hook = os.environ.get(RAY_SETUP_HOOK_ENV)
    if hook and not hook.startswith(RAY_SETUP_HOOK_FUNC_PREFIX):
        module, _, name = hook.rpartition(".")
        getattr(importlib.import_module(module), name)()
    cwd = payload.pop("cwd", None)
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    from qlora_ray.config import ExperimentConfig, from_dict
    from qlora_ray.worker import run_experiment

    cfg = from_dict(ExperimentConfig, payload.pop("config"))
    output = run_experiment(cfg, **payload)
    # What this process saw: the GPU its task was given (or "" for none), and its own id.
    output.row.update(worker_pid=os.getpid(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return output


def preloaded() -> bool:
    """Whether this process's zygote had the heavy libraries imported before it forked."""
    return bool(_zygote is not None and _zygote.info.get("preloaded"))


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's OOM killer sends it when the host runs out of memory)" if code == -9 else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


# --------------------------------------------------------------------------- the zygote


def _serve(fd: int, preload: bool) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    sys.path[:] = conn.recv()
    started = time.monotonic()
    imported: list[str] = []
    if preload:
        import torch

        gpu_backend = torch.version.cuda is not None or torch.version.hip is not None
        for name in preload_modules(gpu_backend):
            importlib.import_module(name)
            imported.append(name)
        _warm_caches()
        if torch.cuda.is_initialized() or (gpu_backend and "bitsandbytes" in sys.modules):
            # A library started CUDA at import: children could not use it. Import nothing
            # in this process's children's place: a new, cold zygote is the safe answer.
            raise SystemExit("qlora-ray zygote: CUDA was initialized while preloading; "
                             f"set {PRELOAD_ENV}=0")
    gc.collect()  # see below: the big freeze happens now, not when the first cell is waiting
    gc.freeze()
    conn.send(("ready", {"preloaded": imported, "seconds": time.monotonic() - started, "pid": os.getpid()}))
    while True:
        try:
            target, kwargs, env = conn.recv()
        except EOFError:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        # What the zygote holds goes to the collector's permanent generation, so a child's
        # collections never walk (nor, by writing their headers, copy) its millions of
        # objects: the child's gc.collect costs what its own objects cost. Python's gc docs
        # (gc.freeze) recommend exactly this before fork() without exec().
        gc.collect()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            _child(conn, target, kwargs, env, parent=os.getppid())
        code = _wait(pid, conn)
        if code is None:  # the task's process went away: nobody wants this child
            return
        conn.send(("exit", {"pid": pid, "code": code}))


def _warm_caches() -> None:
    """Per-process tables every cell's model load would build again: build them once here."""
    try:
        # transformers 5 compiles ~1,000 regular expressions for its checkpoint key renames at
        # the first from_pretrained of a process (conversion_mapping.py,
        # get_checkpoint_conversion_mapping: a module-level cache, deep-copied per call).
        from transformers import conversion_mapping

        conversion_mapping.get_checkpoint_conversion_mapping("llama")
    except Exception:  # another transformers: nothing to warm, nothing lost
        pass


def _wait(pid: int, conn: Any) -> int | None:
    """The child's exit code, or None after killing it when the socket closes first."""
    # A pidfd becomes readable the moment the child exits (Linux >= 5.3); else poll.
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            watch = [conn.fileno()] + ([pidfd] if pidfd is not None else [])
            readable, _, _ = select.select(watch, [], [], None if pidfd is not None else 0.05)
            if conn.fileno() in readable:
                # Only EOF can come while a child runs: the client sends nothing until "exit".
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _child(conn: Any, target: str, kwargs: dict[str, Any], env: dict[str, str], parent: int) -> None:
    code = 0
    try:
        _die_with_parent(parent)
        os.environ.clear()
        os.environ.update(env)
        module, _, function = target.partition(":")
        result = getattr(importlib.import_module(module), function)(**kwargs)
        try:
            conn.send(("result", result))
        except Exception as exc:  # a result that does not pickle
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the zygote died before the line above
        os._exit(1)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2] == "1")
