"""One experiment, start to finish, in this process: the function a Ray task runs.

    setup -> data -> load -> eval before -> train -> eval after (-> save)

Each phase returns what the next needs; `Record` (record.py) keeps what was learned and
the phase it is in, and becomes the row. A failure never raises: it is a row, `oom` or
`failed`, naming its phase.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from qlora_ray.config import ExperimentConfig
from qlora_ray.device import Device
from qlora_ray.measure import MemoryProbe, cuda_context_bytes, free_device_memory
from qlora_ray.profiles import GpuProfile, get_profile, resolve_compute_dtype
from qlora_ray.record import BackoffInFreshProcess, Evaluation, Record, Trained, finite, is_oom

log = logging.getLogger(__name__)


@dataclass
class RunOutput:
    row: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    # Set when the run must be retried in a fresh process after this many OOM back-off
    # steps (the driver does it); the row then says `oom` and why.
    retry_backoff_steps: int | None = None


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
    backoff_steps: int = 0,
) -> RunOutput:
    """Run one experiment and return its row (and per-sample rows).

    `experiment_id` defaults to `cfg.experiment_id`; the driver passes the id of the cell as
    spec'd so that resolving `auto` values does not change it. `batch_size` is the resolved
    micro-batch when the spec says `auto`; `backoff_steps` OOM back-off steps are applied
    to it before anything runs.
    """
    record = Record(cfg, experiment_id or cfg.experiment_id, spec_name, attempt, predicted_peak_bytes)
    try:
        with record.phase("setup"):
            run = record.run = setup(cfg, profile, batch_size, backoff_steps, allow_cpu_fallback, num_threads)
        with record.phase("data"):
            tokenizer, data = record.data = prepare(run)
        with record.phase("load"):
            loaded = record.loaded = load(run, tokenizer, data)
        if cfg.eval.before:
            with record.phase("eval", window="eval_before"):
                record.before = evaluate(run, loaded, data, "before")
        with record.phase("train", window="train"):
            trained = record.trained = train_with_backoff(run, tokenizer, data, loaded)
        with record.phase("eval", window="eval"):
            record.after = evaluate(run, trained.loaded, data, "after")
        if cfg.train.save_adapter and results:
            with record.phase("save"):
                record.adapter_path = save_adapter(trained.loaded.model.model, results, spec_name,
                                                   record.experiment_id)
    except BackoffInFreshProcess as retry:
        record.retry_in_fresh_process(retry)
    except Exception as exc:
        record.fail(exc)
    output = RunOutput(record.row(), record.samples(), record.retry_backoff_steps)
    # The model, trainer and data go before the memory is handed back (it never raises).
    cuda = record.run.cuda if record.run is not None else None
    del record
    loaded = trained = data = None
    free_device_memory(cuda)
    return output


# --------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class Run:
    """What setup settled: the config as it will run, the device, the dtype, the probe."""

    cfg: ExperimentConfig  # batch size resolved, back-off steps applied
    device: Device
    compute_dtype: str
    cuda: Any  # torch.cuda on a GPU, None on the CPU (which then never touches CUDA)
    probe: MemoryProbe
    num_threads: int
    backoff_steps: int = 0
    emulated_cap_bytes: int | None = None
    cuda_context_bytes: int | None = None
    cuda_version: str | None = None  # the CUDA torch was built with (None: a CPU build)

    def backed_off(self) -> Run | None:
        from qlora_ray.planner import backoff

        smaller = backoff(self.cfg)
        return None if smaller is None else replace(self, cfg=smaller, backoff_steps=self.backoff_steps + 1)


def setup(
    cfg: ExperimentConfig, profile: GpuProfile | None, batch_size: int | None, backoff_steps: int,
    allow_cpu_fallback: bool, num_threads: int | None,
) -> Run:
    """Device, dtype, kernels, memory cap and probe, and the config as it will run."""
    import torch

    from qlora_ray import device as devices

    _quiet_libraries()
    if num_threads:
        # Two experiments sharing a node's cores must not each spawn a thread per core.
        torch.set_num_threads(num_threads)
    if profile is None and devices.wants_gpu(cfg):
        profile = get_profile(cfg.gpu)
    device = devices.resolve_device(cfg, torch.cuda, allow_cpu_fallback=allow_cpu_fallback)
    cuda = torch.cuda if device.kind == "cuda" else None
    dtype = compute_dtype(cfg, profile, device)
    devices.check_dtype(dtype, device)
    cap = context = None
    if cuda is not None:
        devices.check_kernels(device, cuda.get_arch_list())
        cuda.init()
    probe = MemoryProbe(cuda)
    if cuda is not None:
        context = cuda_context_bytes(cuda)  # the context exists now; nothing is allocated yet
        if cfg.emulate_profile and profile is not None and profile.is_gpu:
            nvml_total = probe.nvml_device.total() if probe.nvml_device else None
            cap = devices.emulate_profile(profile, device, cuda, context_bytes=context or 0,
                                          nvml_total=nvml_total)
    run = Run(resolved_config(cfg, batch_size), device, dtype, cuda, probe, torch.get_num_threads(),
              emulated_cap_bytes=cap, cuda_context_bytes=context, cuda_version=torch.version.cuda)
    for _ in range(backoff_steps):
        run = run.backed_off() or run
    return run


def compute_dtype(cfg: ExperimentConfig, profile: GpuProfile | None, device: Device) -> str:
    """`auto`: bfloat16 where both the profile and the card have it natively, else float16."""
    dtype = resolve_compute_dtype(cfg.quant.compute_dtype, profile if device.kind == "cuda" else None)
    if cfg.quant.compute_dtype == "auto" and not device.bf16:
        return "float16"
    return dtype


def resolved_config(cfg: ExperimentConfig, batch_size: int | None) -> ExperimentConfig:
    bs = batch_size if batch_size is not None else cfg.train.batch_size
    if not isinstance(bs, int):
        raise ValueError("train.batch_size is `auto` but no resolved batch size was passed; "
                         "run through `qlora-ray run`, which plans it, or give an integer")
    return cfg if bs == cfg.train.batch_size else cfg.replace(**{"train.batch_size": bs})


def prepare(run: Run) -> tuple[Any, Any]:
    """Tokenizer, then the data: a bad dataset fails here, before the model is loaded.

    The tokenized data comes from the cache when an earlier cell built the same (datacache.py).
    """
    from qlora_ray import modeling
    from qlora_ray.data import prepare_data
    from qlora_ray.datacache import prepared

    tokenizer = modeling.load_tokenizer(run.cfg, modeling.resolve_model_path(run.cfg.model.name))
    return tokenizer, prepared(run.cfg, tokenizer, prepare_data)


@dataclass
class Loaded:
    """The model with its adapters and the Trainer around it, and what the row says of them.

    `release` drops the model and Trainer (an in-process back-off reloads them) and keeps
    the facts.
    """

    model: Any  # modeling.LoadedModel
    trainer: Any  # transformers.Trainer
    trainable_params: int
    total_params: int
    revision: str | None  # the hub commit the weights came from (a branch name like `main` moves)
    optim_effective: str
    attn_implementation: str  # the kernel actually used (`auto` resolved by transformers)

    def release(self) -> None:
        self.model = self.trainer = None


def load(run: Run, tokenizer: Any, data: Any) -> Loaded:
    from qlora_ray import modeling
    from qlora_ray import train as training
    from qlora_ray.data import make_collator

    model = modeling.load(run.cfg, run.device, run.compute_dtype, tokenizer=tokenizer)
    trainer = training.make_trainer(
        model.model, tokenizer, data.train, data.eval, make_collator(tokenizer, run.cfg.train.padding_free),
        run.cfg, run.device,
        run.compute_dtype, run.cfg.train.batch_size, run.cfg.train.grad_accum,
    )
    from qlora_ray import provenance

    config = model.model.config
    revision = provenance.hub_commit(model.path, run.cfg.model.revision) or run.cfg.model.revision
    attn = getattr(config, "_attn_implementation", None) or run.cfg.model.attn_implementation
    return Loaded(model, trainer, model.trainable_params, model.total_params, revision,
                  str(trainer.args.optim.value), attn)


def evaluate(run: Run, loaded: Loaded, data: Any, phase: str) -> Evaluation:
    from qlora_ray import evaluate as ev

    # A fixed embedder is loaded for each eval pass and dropped after it, so it never sits
    # on the GPU through training.
    embedder = ev.Embedder(run.cfg.eval.similarity.embedder, run.device.torch_device,
                           revision=run.cfg.eval.similarity.revision,
                           use_safetensors=run.cfg.model.use_safetensors)
    result = ev.evaluate(
        loaded.model.model, loaded.model.tokenizer, data,
        max_new_tokens=run.cfg.eval.max_new_tokens, batch_size=run.cfg.eval.batch_size,
        embedder=embedder, phase=phase,
        # The autocast training ran under (mixed precision on CUDA), in both phases alike.
        autocast_dtype=run.compute_dtype if run.device.kind == "cuda" else None,
    )
    return Evaluation(result, finite(result.eval_loss), embedder.commit)


def train_with_backoff(run: Run, tokenizer: Any, data: Any, loaded: Loaded) -> Trained:
    """Train; on an OOM with `train.oom_backoff`, retry at the next smaller micro-batch.

    The retry runs in this process only when nothing here outlives the failed attempt:
    bitsandbytes' paged optimizer state cannot be freed, so once there is any (there is
    only ever on CUDA), the retry goes to a fresh process (`BackoffInFreshProcess`, which
    the driver turns into a new task).
    """
    from qlora_ray import modeling
    from qlora_ray import train as training

    try:
        return Trained(training.train(loaded.trainer), loaded, run.cfg, run.backoff_steps)
    except Exception as exc:
        smaller = run.backed_off() if is_oom(exc) and run.cfg.train.oom_backoff else None
        if smaller is None:
            raise
        if modeling.paged_optimizer_bytes():
            raise BackoffInFreshProcess(smaller.cfg, smaller.backoff_steps) from exc
    log.warning("OOM at micro-batch %d; retrying with %d x %d accumulation", run.cfg.train.batch_size,
                smaller.cfg.train.batch_size, smaller.cfg.train.grad_accum)
    loaded.release()
    run.probe.start()  # the failed attempt's memory goes, and the window restarts
    return train_with_backoff(smaller, tokenizer, data, load(smaller, tokenizer, data))


def save_adapter(model: Any, results: str, spec_name: str, experiment_id: str) -> str:
    """Save the adapter to RESULTS/<spec>/adapters/<id> (path or URI), whole or not at all.

    On a local disk it is written to a new hidden folder beside its destination and renamed
    into place (a retry's older folder is moved aside first, then deleted), so a reader never
    sees half an adapter; a symbolic link at `adapters` or `adapters/<id>` (a shared
    results folder) is refused instead of written through. Object stores have no links:
    the files are saved to a local temporary folder and copied there.
    """
    import pyarrow.fs as pafs

    from qlora_ray.results_io import redact, resolve

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
