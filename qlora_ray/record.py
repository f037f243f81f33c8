"""What one experiment learned, phase by phase, and the row it becomes.

The worker stores each phase's result here as it gets it; `Record.phase` says which phase
is running (a failure's `error_phase`) and, for the measured phases, opens and closes that
phase's memory window, so a failure in one phase never changes another phase's figures.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from qlora_ray.config import ExperimentConfig
from qlora_ray.measure import Peaks, cuda_context_bytes
from qlora_ray.results import make_row

log = logging.getLogger(__name__)

# Allocation failures that do not say "out of memory": cuBLAS/cuDNN report their own status
# (aten/src/ATen/cuda/Exceptions.h TORCH_CUDABLAS_CHECK: "CUDA error: <status> when calling
# `<call>`"; cuDNN: "cuDNN error: <status>"). NOT_INITIALIZED is an allocation failure only
# at handle creation, where cuBLAS allocates its device resources.
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM (torch.cuda.OutOfMemoryError), host OOM (MemoryError), a library's
    allocation failure, or a backend's "out of memory" text."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(m in text for m in OOM_MARKERS) or (
        "cublas_status_not_initialized" in text and "cublascreate" in text)


def describe_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}"[:4000] + where


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class BackoffInFreshProcess(Exception):
    """An OOM back-off that cannot run in this process (its paged optimizer state stays)."""

    def __init__(self, cfg: ExperimentConfig, steps: int):
        super().__init__(f"retry at batch_size {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum}")
        self.cfg = cfg
        self.steps = steps


@dataclass
class Evaluation:
    result: Any  # evaluate.EvalResult
    eval_loss: float | None
    embedder_commit: str | None = None  # the hub commit a fixed embedder's files came from


@dataclass
class Trained:
    result: Any  # train.TrainResult
    loaded: Any  # worker.Loaded the result came from (a back-off reloads)
    cfg: ExperimentConfig  # the config it settled on (batch size and accumulation)
    backoff_steps: int


class Record:
    """One experiment's outcome so far. Phase results are set by the worker as it goes."""

    def __init__(self, cfg: ExperimentConfig, experiment_id: str, spec_name: str, attempt: int,
                 predicted_peak_bytes: int | None):
        self.cfg = cfg
        self.experiment_id = experiment_id
        self.spec_name = spec_name
        self.attempt = attempt
        self.predicted_peak_bytes = predicted_peak_bytes
        self.started_at = _now()
        self.current_phase = "setup"
        self.status, self.error, self.error_phase = "ok", None, None
        self.retry_backoff_steps: int | None = None
        self.run: Any = None  # worker.Run
        self.data: tuple[Any, Any] | None = None  # (tokenizer, data.PreparedData)
        self.loaded: Any = None  # worker.Loaded
        self.before: Evaluation | None = None
        self.trained: Trained | None = None
        self.after: Evaluation | None = None
        self.adapter_path: str | None = None
        self.memory: dict[str, Peaks] = {}  # window ("eval_before", "train", "eval") -> peaks
        self.context_bytes: int | None = None
        self.paged_bytes: int | None = None
        self.seconds: dict[str, float] = {}  # wall seconds per phase (window name for eval_before)

    @contextmanager
    def phase(self, name: str, window: str | None = None) -> Iterator[None]:
        """Run a phase; with `window`, measure its peak memory, whether it ends well or not."""
        self.current_phase = name
        probe = self.run.probe if window and self.run is not None else None
        if probe is not None:
            probe.start()
        started = time.perf_counter()
        try:
            yield
        finally:
            key = window or name
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started
            if probe is not None:
                self._close_window(window, probe)

    def _close_window(self, window: str, probe: Any) -> None:
        try:
            self.memory[window] = probe.read()
            if probe.cuda is not None:
                from qlora_ray.modeling import paged_optimizer_bytes

                # Both only grow: the context as libraries load kernels and handles, the paged
                # state as the optimizer meets parameters. Keep the largest seen.
                self.paged_bytes = paged_optimizer_bytes()
                context = cuda_context_bytes(probe.cuda, self.paged_bytes)
                if context is not None:
                    self.context_bytes = max(context, self.context_bytes or 0)
        except Exception:
            log.warning("could not read memory after the %s phase", window, exc_info=True)

    def fail(self, exc: BaseException) -> None:
        self.status = "oom" if is_oom(exc) else "failed"
        self.error, self.error_phase = describe_error(exc), self.current_phase

    def retry_in_fresh_process(self, retry: BackoffInFreshProcess) -> None:
        cause = retry.__cause__ or retry
        self.status, self.error_phase = "oom", self.current_phase
        self.error = (f"{describe_error(cause)}; {retry} in a fresh process "
                      "(bitsandbytes' paged optimizer state cannot be freed in this one)")
        self.retry_backoff_steps = retry.steps

    def samples(self) -> list[dict[str, Any]]:
        out = [s for ev in (self.before, self.after) if ev is not None for s in ev.result.samples]
        for s in out:
            s.update(experiment_id=self.experiment_id, name=self.cfg.name)
        return out

    def row(self) -> dict[str, Any]:
        cols: dict[str, Any] = dict(status=self.status, error=self.error, error_phase=self.error_phase,
                                    started_at=self.started_at)
        if self.run is not None:
            run, device = self.run, self.run.device
            cols.update(device=device.torch_device, device_name=device.name,
                        device_total_memory_bytes=device.total_memory_bytes,
                        cpu_fallback=device.cpu_fallback, compute_dtype=run.compute_dtype,
                        num_threads=run.num_threads, emulated_cap_bytes=run.emulated_cap_bytes,
                        batch_size=run.cfg.train.batch_size, grad_accum=run.cfg.train.grad_accum,
                        backoff_steps=run.backoff_steps, cuda_version=run.cuda_version)
        if self.data is not None:
            data = self.data[1]
            cols.update(labels=",".join(data.labels or []) or None, labels_note=data.labels_note,
                        eval_samples=len(data.eval_prompts), train_examples=data.stats["train_examples"],
                        train_sequences=data.stats["train_sequences"], data_cached=data.cached)
        if self.loaded is not None:
            cols.update(trainable_params=self.loaded.trainable_params, total_params=self.loaded.total_params,
                        model_revision=self.loaded.revision, optim_effective=self.loaded.optim_effective,
                        attn_implementation=self.loaded.attn_implementation)
        if self.before is not None:
            r = self.before.result
            cols.update(similarity_score_before=r.similarity_score, accuracy_before=r.accuracy,
                        f1_before=r.f1, eval_loss_before=self.before.eval_loss)
        if self.trained is not None:
            t = self.trained
            cols.update(batch_size=t.cfg.train.batch_size, grad_accum=t.cfg.train.grad_accum,
                        backoff_steps=t.backoff_steps, train_seconds=t.result.seconds,
                        train_steps=t.result.steps, train_tokens=t.result.tokens,
                        tokens_per_second=t.result.tokens_per_second, train_loss=finite(t.result.loss),
                        train_loss_first=t.result.loss_first, train_loss_last=t.result.loss_last)
        if self.after is not None:
            r = self.after.result
            cols.update(similarity_score=r.similarity_score, accuracy=r.accuracy, f1=r.f1,
                        accuracy_majority=r.majority_accuracy,
                        eval_loss=self.after.eval_loss, eval_seconds=r.seconds,
                        embedder_revision=self.after.embedder_commit)
        cols.update({f"{phase}_seconds": self.seconds.get(phase)
                     for phase in ("setup", "data", "load", "eval_before")})
        cols.update(self._memory_columns(), adapter_path=self.adapter_path, finished_at=_now())
        return make_row(self.cfg, self.experiment_id, self.spec_name, self.attempt,
                        self.predicted_peak_bytes, **cols)

    def _memory_columns(self) -> dict[str, Any]:
        # The context as last seen (it grows as kernels load), else as setup measured it.
        context = self.context_bytes or (self.run.cuda_context_bytes if self.run is not None else None)
        cols: dict[str, Any] = dict(cuda_context_bytes=context, paged_optimizer_bytes=self.paged_bytes)
        train = self.memory.get("train")
        if train is not None:
            cols.update(peak_memory_bytes=train.bytes, peak_cuda_allocated_bytes=train.cuda_allocated,
                        peak_cuda_reserved_bytes=train.cuda_reserved, peak_nvml_bytes=train.nvml,
                        nvml_memory_scope=train.nvml_scope, peak_rss_bytes=train.rss)
        sources = {p.source for p in self.memory.values()}
        cols["memory_source"] = train.source if train is not None else (sources.pop() if sources else None)
        # Each phase as the card saw it, comparable with the planner's predictions: the
        # allocator's peak plus what it does not see. The paged optimizer state counts in
        # training only: in an eval pass the driver may page it out to make room.
        for window, column in (("train", "peak_train_bytes"), ("eval", "peak_eval_bytes"),
                               ("eval_before", "peak_eval_before_bytes")):
            peaks = self.memory.get(window)
            if peaks is None or peaks.bytes is None:
                continue
            extra = 0
            if peaks.source in ("cuda_reserved", "cuda_allocated"):
                extra = (context or 0) + ((self.paged_bytes or 0) if window == "train" else 0)
            cols[column] = peaks.bytes + extra
        return cols


def driver_row(
    cfg: ExperimentConfig, experiment_id: str, spec_name: str, status: str, error: str,
    attempt: int, predicted_peak_bytes: int | None, predicted: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A row for a cell whose task never produced one (skipped, unschedulable, crashed)."""
    now = dt.datetime.now(dt.timezone.utc)
    row = make_row(cfg, experiment_id, spec_name, attempt, predicted_peak_bytes, status=status,
                   error=error, started_at=now, finished_at=now)
    row.update(predicted or {})  # the planner's columns (predicted_peak_bytes among them)
    return row
