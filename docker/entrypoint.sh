#!/usr/bin/env bash
# Entrypoint of the gptds image: checks that torch sees a GPU and was built for the image's CUDA (CUDA_VERSION,
# set by the nvidia/cuda base image; DeepSpeed's and flash-attn's ops were compiled for it), failing at once with
# both versions if not, then runs the command:
#   docker run IMAGE pretrain ...                     gptds pretrain ... (any gptds subcommand or flag)
#   docker run IMAGE deepspeed ... | ds_report | tensorboard ... | python ... | bash     that program as given
# Usage: entrypoint.sh [COMMAND] [ARGS...]   (no arguments: gptds --help)
# The GPU check is skipped for ds_report (it reports the GPU itself), tensorboard, bash/sh, `gptds prepare`
# (tokenising needs no GPU), --help/-h, and whenever GPTDS_SKIP_GPU_CHECK=1 (e.g. CPU-only use of the image).
set -euo pipefail

if (( $# == 0 )); then set -- --help; fi

check_gpu=1
case $1 in ds_report|tensorboard|bash|sh|prepare) check_gpu=0 ;; esac
for arg in "$@"; do
    if [[ $arg == --help || $arg == -h ]]; then check_gpu=0; fi
done
if [[ ${GPTDS_SKIP_GPU_CHECK:-0} == 1 ]]; then check_gpu=0; fi

if (( check_gpu )); then
    python3 - <<'EOF' || exit 1
import os
import sys

import torch

image_cuda = os.environ.get("CUDA_VERSION", "unset")
versions = f"torch {torch.__version__} built for CUDA {torch.version.cuda}; image CUDA {image_cuda}"
hint = "set GPTDS_SKIP_GPU_CHECK=1 to run without this check"
if not torch.cuda.is_available():
    sys.exit(f"gptds entrypoint: error: no GPU visible to torch ({versions}). Start the container with "
             f"--gpus all (NVIDIA Container Toolkit), as launch/docker_run.sh does, on a host whose driver "
             f"supports CUDA {image_cuda}; {hint}")
if torch.version.cuda is None or image_cuda.split(".")[:2] != torch.version.cuda.split(".")[:2]:
    sys.exit(f"gptds entrypoint: error: CUDA mismatch ({versions}): ops compiled in this image would not load. "
             f"Rebuild the image with a base tag of torch's CUDA version; {hint}")
EOF
fi

# Training stops cleanly on `docker stop` (or Ctrl-C): this shell, PID 1 of the container, receives the SIGTERM
# (the kernel drops signals PID 1 has no handler for, so a training command exec'd here would never see it, and
# deepspeed's local launcher has none) and turns it into SIGUSR1 for every process of the container: the
# launchers ignore it (started with it ignored), the gptds ranks checkpoint at the next step boundary and exit 0.
# docker stop waits --stop-timeout seconds (launch/docker_run.sh: 300) before its SIGKILL.
run_stoppable() {
    trap '' USR1
    "$@" &
    local child=$! status=0
    # shellcheck disable=SC2317  # runs from the trap
    trap 'echo "gptds entrypoint: stop requested: asking the ranks to checkpoint and exit" >&2; kill -USR1 0' TERM INT
    while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done  # a trapped signal ends `wait` early
    wait "$child" || status=$?
    exit "$status"
}

case $1 in
    deepspeed) run_stoppable "$@" ;;
    pretrain|finetune) run_stoppable gptds "$@" ;;
    ds_report|tensorboard|python|python3|bash|sh|nvidia-smi) exec "$@" ;;
    *) exec gptds "$@" ;;
esac
