# qlora-ray: the image Ray cluster nodes run (ray_cluster.yaml, k8s/) and the single-GPU
# `docker run` path (docs/docker.md).
#
#   docker build -t qlora-ray:0.1.0 .                      # GPU image (CUDA 13 torch from PyPI)
#   docker/build-cpu-image.sh                              # CPU smoke image (podman, debootstrap base)
#
# Build arguments:
#   BASE_IMAGE        a CUDA *runtime* image matching the torch build pip installs: torch 2.13.0
#                     from PyPI is built against CUDA 13.0 (hosts need an NVIDIA driver >= 580).
#                     Any Debian/Ubuntu image with python3 >= 3.11 works (the CPU smoke image
#                     uses a debootstrapped Debian bookworm).
#   TORCH_INDEX_URL   an extra index for another torch build, e.g. .../whl/cu128 with an
#                     nvidia/cuda:12.8.x base for hosts with an older driver.
#   WHEELHOUSE        a folder in the build context whose wheels pip prefers (the CPU torch
#                     build for the smoke image); NO_INDEX=1 installs from it alone.
#   QLORA_RAY_IMAGE, QLORA_RAY_GIT_COMMIT   recorded in every result row (qlora_ray/provenance.py).
#
# Layer order is for the cache: system packages, then the Python dependencies (which change
# only with pyproject's dependency list or constraints.txt), then the project's own source.
# Nothing secret is baked in: HF_TOKEN, AWS credentials and the Ray auth token come from
# the environment or mounts at run time.

ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3-venv: the dependencies live in /opt/venv, apart from the distribution's Python
# packages. rsync + openssh-client: Ray's cluster launcher copies files into the container
# with `rsync -e "docker exec"` and the head node's autoscaler reaches workers over SSH.
# wget: KubeRay (1.5.x, and later ones for this Ray version) injects liveness/readiness
# probes that run `wget ... http://localhost:PORT/api/..._healthz | grep success` in the
# Ray container; without wget no Ray pod ever becomes Ready.
# tini: see ENTRYPOINT. Versions are not pinned: they follow the base image's release, and
# pinned Debian/Ubuntu versions disappear from the mirrors; the Python side is what the
# lock pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv rsync openssh-client tini wget \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------
# The dependency list alone, so that editing anything else in pyproject.toml (version,
# ruff settings) leaves the expensive dependency layer below cached: COPY --from compares
# this file's content, not pyproject.toml's. Extras: `gpu` (NVML) and `aws` (boto3, which
# Ray's AWS node provider imports: the head's autoscaler runs in this image).
FROM base AS requirements
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["gpu"] + p["optional-dependencies"]["aws"]))' \
    > /src/requirements.txt

# ---------------------------------------------------------------------------------------
FROM base AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The Python dependencies: this layer changes only with constraints.txt (the tested lock:
# exact versions of everything pip resolves) or pyproject's dependency list.
ARG WHEELHOUSE=docker/no-wheels
ARG NO_INDEX=0
ARG TORCH_INDEX_URL=
COPY constraints.txt /tmp/build/constraints.txt
COPY --from=requirements /src/requirements.txt /tmp/build/requirements.txt
# The wheelhouse is bind-mounted, not copied, so its wheels never become an image layer.
# (podman does not hash a bind mount for its layer cache; the wheelhouse is derived from
# the two files above, which it does hash.) The index switches go through pip's own
# environment variables, so the command also runs under plain sh (buildah's default OCI
# format ignores SHELL).
RUN --mount=type=bind,source=${WHEELHOUSE},target=/tmp/wheels \
    if [ "${NO_INDEX}" = 1 ]; then export PIP_NO_INDEX=1; fi \
    && if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /tmp/wheels \
        -c /tmp/build/constraints.txt -r /tmp/build/requirements.txt \
    && /opt/venv/bin/python -c 'import torch, ray, peft, transformers, bitsandbytes, pyarrow, boto3' \
    && /opt/venv/bin/python -c 'from ray.autoscaler._private.providers import _get_node_provider_cls; _get_node_provider_cls({"type": "aws"})' \
    && rm -rf /tmp/build

ARG QLORA_UID=1000
ARG QLORA_GID=1000
# uid/gid 1000: the first user on most Linux workstations (and `ubuntu` on the cluster
# AMIs), so results written to a bind mount are the host user's without --user. Ubuntu
# images already have a user 1000 (`ubuntu`); it gives way to `qlora`.
RUN if getent passwd "${QLORA_UID}" >/dev/null; then userdel --remove "$(getent passwd "${QLORA_UID}" | cut -d: -f1)"; fi \
    && if getent group "${QLORA_GID}" >/dev/null; then groupdel "$(getent group "${QLORA_GID}" | cut -d: -f1)"; fi \
    && groupadd --gid "${QLORA_GID}" qlora \
    && useradd --uid "${QLORA_UID}" --gid "${QLORA_GID}" --home-dir /home/qlora --create-home --shell /bin/bash qlora \
    && mkdir -p /workspace/results /cache/huggingface /cache/qlora-ray \
    && chown -R "${QLORA_UID}:${QLORA_GID}" /workspace /cache \
    && chmod 1777 /home/qlora /workspace /workspace/results /cache /cache/huggingface /cache/qlora-ray
# Why 1777 (writable by anyone, like /tmp): `docker run --user "$(id -u):$(id -g)"` gives
# results owned by whoever runs it, and that uid needs a writable HOME (Ray writes its auth
# token to ~/.ray), cache and results folder. The owner stays qlora for the default case.

ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/qlora \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    QLORA_RAY_CACHE=/cache/qlora-ray

# The project itself: the only layers a source change rebuilds. setuptools is already in
# the venv (torch depends on it), so no build isolation and no index are needed here.
COPY pyproject.toml README.md /tmp/src/
COPY qlora_ray /tmp/src/qlora_ray
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src

WORKDIR /workspace
# The shipped specs and data, so `IMAGE run experiments/quickstart.yaml` works as is;
# mount your own over /workspace/experiments.
COPY --chown=${QLORA_UID}:${QLORA_GID} experiments /workspace/experiments

# Results (mount a host folder or, on a cluster, pass --results s3://...) and the model
# caches (a named volume keeps downloads across runs).
VOLUME ["/workspace/results", "/cache"]

# Last, so a new commit or tag rebuilds nothing above. Pass both (docker/build-cpu-image.sh
# does): the tag users pull, and `git rev-parse HEAD`. An empty commit leaves the rows'
# git_commit null rather than wrong.
ARG QLORA_RAY_IMAGE=qlora-ray
ARG QLORA_RAY_GIT_COMMIT=
# The repository the image is built from (https://github.com/OWNER/REPO). GHCR links a new
# package to that repository through the label below; docs/cluster.md has the one-time
# visibility step a private-by-default GHCR package needs before nodes can pull it.
ARG QLORA_RAY_SOURCE=
# podman's layer cache matches ENV and LABEL on their text, not on the build-arg values in
# them (it does key RUN on those values): this RUN makes a new tag or commit rebuild the
# lines below instead of reusing stale ones. The file is the same record for humans.
RUN printf 'image=%s\ngit_commit=%s\nsource=%s\n' "${QLORA_RAY_IMAGE}" "${QLORA_RAY_GIT_COMMIT}" "${QLORA_RAY_SOURCE}" \
    > /etc/qlora-ray-build
ENV QLORA_RAY_IMAGE=${QLORA_RAY_IMAGE} \
    QLORA_RAY_GIT_COMMIT=${QLORA_RAY_GIT_COMMIT}
LABEL org.opencontainers.image.title="qlora-ray" \
      org.opencontainers.image.description="Grids of QLoRA fine-tuning experiments on Ray" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${QLORA_RAY_GIT_COMMIT}" \
      org.opencontainers.image.source="${QLORA_RAY_SOURCE}"

USER ${QLORA_UID}:${QLORA_GID}

# tini as PID 1 with qlora-ray as its child (what `docker run --init` would add). The Ray
# driver starts the raylet, GCS and workers; processes they orphan are re-parented to
# PID 1, which must reap them, and a bare PID 1 ignores the SIGTERM/SIGINT it has no
# handler for, so `docker stop` during `plan` or Ray's start-up would wait out the kill
# timeout. tini forwards the signal to qlora-ray, whose run loop cancels its tasks and
# keeps the rows already written.
ENTRYPOINT ["tini", "--", "qlora-ray"]
CMD ["--help"]
