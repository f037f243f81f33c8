"""Ray worker setup hooks that make a real run meet what only a GPU would produce.

A hook runs in every worker process of a job before its task (Ray's
`runtime_env={"worker_process_setup_hook": "ray_hooks.<name>"}`); the tests hand it to
`qlora-ray run` through RAY_JOB_CONFIG_JSON_ENV_VAR, the variable `ray job submit` uses to
give a driver its job's runtime environment.
"""

from __future__ import annotations

import os


def paged_oom_at_batch_4() -> None:
    """Training at micro-batch 4 first creates paged optimizer state, then runs out of
    memory, as a paged optimizer's first step on a too-small GPU does. bitsandbytes only
    pages on CUDA (optim/optimizer.py get_state_buffer falls back to plain tensors on the
    CPU), so the state is registered the way get_state_buffer registers it on a GPU. The
    process ids that hit it are written to $QLORA_RAY_TEST_PIDS."""
    import bitsandbytes.functional as F
    import torch
    from fake_cuda import paged_tensor

    import qlora_ray.train as training

    real_train = training.train

    def train(trainer):
        if trainer.args.per_device_train_batch_size == 4:
            F.GlobalPageManager.get_instance().paged_tensors.append(paged_tensor(4 * 2**20))
            open(os.path.join(os.environ["QLORA_RAY_TEST_PIDS"], str(os.getpid())), "w").close()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_train(trainer)

    training.train = train
