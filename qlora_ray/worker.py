"""One experiment, start to finish, in this process: the function a Ray task runs.

    setup (device, dtype) -> load (model, adapters, data) -> eval before -> train -> eval after

It never raises for a per-experiment failure: an out-of-memory error becomes a row with
status `oom`, anything else `failed`, each with the phase it happened in and the memory
figures measured so far. Memory is freed before returning.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import math
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any

from qlora_ray.config import ExperimentConfig, flatten
from qlora_ray.profiles import GpuProfile, get_profile, resolve_compute_dtype
from qlora_ray.results import empty_row

log = logging.getLogger(__name__)


@dataclass
class RunOutput:
    row: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM (torch.cuda.OutOfMemoryError), host OOM (MemoryError), or a backend's text."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def describe_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}"[:4000] + where


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def run_experiment(
    cfg: ExperimentConfig,
    *,
    spec_name: str = "adhoc",
    experiment_id: str | None = None,
    batch_size: int | None = None,
    profile: GpuProfile | None = None,
    predicted_peak_bytes: int | None = None,
    results: str | None = None,
    allow_cpu_fallback: bool = False,
    num_threads: int | None = None,
    attempt: int = 1,
) -> RunOutput:
    """Run one resolved experiment and return its result row (and per-sample rows).

    `experiment_id` defaults to `cfg.experiment_id`; the driver passes the id of the cell as
    spec'd so that resolving `auto` values does not change it. `batch_size` is the resolved
    micro-batch when the spec says `auto`.
    """
    from qlora_ray import provenance

    eid = experiment_id or cfg.experiment_id
    row = empty_row()
    row.update(flatten(cfg))
    row.update(experiment_id=eid, spec_name=spec_name, attempt=attempt,
               predicted_peak_bytes=predicted_peak_bytes, started_at=_now())
    samples: list[dict[str, Any]] = []
    state: dict[str, Any] = {"phase": "setup", "probe": None}
    try:
        _run_phases(cfg, row, samples, state, batch_size=batch_size, profile=profile,
                    results=results, spec_name=spec_name, experiment_id=eid,
                    allow_cpu_fallback=allow_cpu_fallback, num_threads=num_threads)
        row.update(status="ok", error=None, error_phase=None)
    except Exception as exc:
        row.update(status="oom" if is_oom(exc) else "failed", error=describe_error(exc),
                   error_phase=state["phase"])
        if state["probe"] is not None:
            try:
                row.update(state["probe"].read().as_row())  # figures so far, for the post-mortem
            except Exception:
                log.debug("could not read memory after failure", exc_info=True)
    # The model, trainer and data lived in _run_phases' frame, gone now; hand the memory back.
    _free()
    row.update(provenance.collect(cuda_version=row.get("cuda_version")))
    row["finished_at"] = _now()
    for s in samples:
        s.update(experiment_id=eid, name=cfg.name)
    return RunOutput(row, samples)


def _run_phases(
    cfg: ExperimentConfig,
    row: dict[str, Any],
    samples: list[dict[str, Any]],
    state: dict[str, Any],
    *,
    batch_size: int | None,
    profile: GpuProfile | None,
    results: str | None,
    spec_name: str,
    experiment_id: str,
    allow_cpu_fallback: bool,
    num_threads: int | None,
) -> None:
    """The phases, top to bottom; `state["phase"]` says where a failure happened."""
    import torch

    from qlora_ray import device as devices
    from qlora_ray import evaluate as ev
    from qlora_ray import modeling, provenance
    from qlora_ray import train as training
    from qlora_ray.data import make_collator, prepare_data
    from qlora_ray.measure import MemoryProbe

    _quiet_libraries()
    if num_threads:
        # Two experiments sharing a node's cores must not each spawn a thread per core.
        torch.set_num_threads(num_threads)
    row["num_threads"] = torch.get_num_threads()
    if profile is None and cfg.gpu not in (None, "cpu"):
        profile = get_profile(cfg.gpu)
    device = devices.resolve_device(cfg, torch.cuda, allow_cpu_fallback=allow_cpu_fallback)
    row.update(device=device.torch_device, device_name=device.name,
               device_total_memory_bytes=device.total_memory_bytes,
               cpu_fallback=device.cpu_fallback, cuda_version=torch.version.cuda)
    compute_dtype = resolve_compute_dtype(cfg.quant.compute_dtype, profile if device.kind == "cuda" else None)
    if cfg.quant.compute_dtype == "auto" and device.kind == "cuda" and not device.bf16:
        compute_dtype = "float16"
    row["compute_dtype"] = compute_dtype
    devices.check_dtype(compute_dtype, device)
    if cfg.emulate_profile and profile is not None:
        devices.emulate_profile(profile, device, torch.cuda)
    probe = state["probe"] = MemoryProbe(torch.cuda if device.kind == "cuda" else None)

    bs = batch_size if batch_size is not None else cfg.train.batch_size
    if not isinstance(bs, int):
        raise ValueError("train.batch_size is `auto` but no resolved batch size was passed; "
                         "run through `qlora-ray run`, which plans it, or give an integer")
    run_cfg = cfg if bs == cfg.train.batch_size else cfg.replace(**{"train.batch_size": bs})
    embedder = ev.Embedder(cfg.eval.similarity.embedder, device.torch_device,
                           revision=cfg.eval.similarity.revision, use_safetensors=cfg.model.use_safetensors)
    evaluated_before = False

    while True:  # more than once only when OOM back-off halves the micro-batch
        state["phase"] = "load"
        loaded = modeling.load(run_cfg, device, compute_dtype)
        data = prepare_data(run_cfg, loaded.tokenizer)
        trainer = training.make_trainer(
            loaded.model, loaded.tokenizer, data.train, data.eval, make_collator(loaded.tokenizer),
            run_cfg, device, compute_dtype, run_cfg.train.batch_size, run_cfg.train.grad_accum,
        )
        # The hub commit the weights came from (a branch name like `main` moves).
        row["model_revision"] = provenance.hub_commit(loaded.path, cfg.model.revision) or cfg.model.revision
        # The kernel actually used (`auto` resolved by transformers).
        row["attn_implementation"] = getattr(loaded.model.config, "_attn_implementation", None) \
            or cfg.model.attn_implementation
        row.update(trainable_params=loaded.trainable_params, total_params=loaded.total_params,
                   optim_effective=str(trainer.args.optim.value),
                   labels=",".join(data.labels or []) or None, labels_note=data.labels_note,
                   eval_samples=len(data.eval_prompts),
                   train_examples=data.stats["train_examples"],
                   train_sequences=data.stats["train_sequences"])
        if cfg.eval.before and not evaluated_before:
            # LoRA's B matrices start at zero, so this is the base model's own behaviour.
            state["phase"] = "eval"
            before = _evaluate(ev, loaded, data, cfg, embedder, "before", device, compute_dtype)
            samples.extend(before.samples)
            row.update(similarity_score_before=before.similarity_score,
                       accuracy_before=before.accuracy, f1_before=before.f1,
                       eval_loss_before=_finite(before.eval_loss))
            evaluated_before = True
        state["phase"] = "train"
        probe.reset()
        smaller = None
        try:
            result = training.train(trainer)
        except Exception as exc:
            smaller = _backoff(run_cfg) if is_oom(exc) and cfg.train.oom_backoff else None
            if smaller is None:
                raise
        if smaller is None:
            break
        log.warning("OOM at micro-batch %d; retrying with %d x %d accumulation",
                    run_cfg.train.batch_size, smaller.train.batch_size, smaller.train.grad_accum)
        run_cfg = smaller
        del loaded, data, trainer
        _free()

    row.update(probe.read().as_row())
    row.update(batch_size=run_cfg.train.batch_size, grad_accum=run_cfg.train.grad_accum,
               train_seconds=result.seconds, train_steps=result.steps, train_tokens=result.tokens,
               tokens_per_second=result.tokens_per_second, train_loss=_finite(result.loss),
               train_loss_first=result.loss_first, train_loss_last=result.loss_last)

    state["phase"] = "eval"
    after = _evaluate(ev, loaded, data, cfg, embedder, "after", device, compute_dtype)
    row["embedder_revision"] = embedder.commit  # the commit a fixed embedder's files came from
    samples.extend(after.samples)
    row.update(similarity_score=after.similarity_score, accuracy=after.accuracy, f1=after.f1,
               accuracy_majority=after.majority_accuracy, eval_loss=_finite(after.eval_loss),
               eval_seconds=after.seconds)
    if cfg.train.save_adapter and results:
        state["phase"] = "save"
        row["adapter_path"] = save_adapter(loaded.model, results, spec_name, experiment_id)


def _evaluate(ev: Any, loaded: Any, data: Any, cfg: ExperimentConfig, embedder: Any, phase: str,
              device: Any, compute_dtype: str) -> Any:
    return ev.evaluate(
        loaded.model, loaded.tokenizer, data,
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
        embedder=embedder, phase=phase,
        # The autocast training ran under (mixed precision on CUDA), in both phases alike.
        autocast_dtype=compute_dtype if device.kind == "cuda" else None,
    )


def _quiet_libraries() -> None:
    """Keep a grid's output readable: no progress bars or v6-rename notices from every worker."""
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # transformers 5 renamed gradient_* to activation_* and warns on each old name, which peft
    # and the Trainer still use internally; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"torch.utils.checkpoint: the use_reentrant parameter")


def _backoff(cfg: ExperimentConfig) -> ExperimentConfig | None:
    from qlora_ray.planner import backoff

    return backoff(cfg)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_adapter(model: Any, results: str, spec_name: str, experiment_id: str) -> str:
    """Save the adapter to RESULTS/<spec>/adapters/<id> (path or URI), whole or not at all.

    On a local disk it is written to a new hidden folder beside its destination and renamed
    into place (a retry's older folder is moved aside first, then deleted), so a reader never
    sees half an adapter; a symbolic link at `adapters` or `adapters/<id>` (a shared
    results folder) is refused instead of written through. Object stores have no links:
    the files are saved to a local temporary folder and copied there.
    """
    import pyarrow.fs as pafs

    from qlora_ray.results import redact, resolve

    fs, base = resolve(results)
    parent = f"{base}/{spec_name}/adapters"
    dest = f"{parent}/{experiment_id}"
    if isinstance(fs, pafs.LocalFileSystem):
        _save_adapter_locally(model, parent, dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="qlora-ray-adapter-") as tmp:
        model.save_pretrained(tmp)
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(tmp, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    # A URI's credentials stay out of the row: it records where, not with which keys.
    return f"{redact(results).rstrip('/')}/{spec_name}/adapters/{experiment_id}"


def _save_adapter_locally(model: Any, parent: str, dest: str) -> None:
    import os
    import shutil
    import uuid

    for path in (parent, dest):
        if os.path.islink(path):
            raise RuntimeError(f"{path} is a symbolic link (to {os.readlink(path)}); refusing to save "
                               "the adapter through it: remove the link")
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(dest)
    staging = f"{parent}/.{name}.{uuid.uuid4().hex}"
    os.mkdir(staging)  # new and exclusive; permissions from the umask, like any new folder
    try:
        model.save_pretrained(staging)
        if os.path.lexists(dest):
            old = f"{parent}/.{name}.old.{uuid.uuid4().hex}"
            os.rename(dest, old)  # renames a link planted meanwhile, never follows it
            os.rename(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
