#!/usr/bin/env bash
# Single-host runs in the gptds image (docker/Dockerfile): `docker run` with every GPU, the shared-memory and
# ulimit settings NVIDIA recommends for PyTorch, the data and run folders mounted, and TensorBoard's port published.
# The arguments go to the image's entrypoint: a gptds subcommand, or deepspeed / ds_report / tensorboard / bash.
#
# Usage: launch/docker_run.sh COMMAND [ARGS...]
#   launch/docker_run.sh ds_report                                  GPU, CUDA and DeepSpeed's prebuilt ops
#   launch/docker_run.sh deepspeed --no_local_rank --module gptds pretrain --data_dir data/fineweb \
#       --deepspeed_config zero2 --auto_resume                      every GPU of this host, one rank each
#   launch/docker_run.sh pretrain --help                            one process, the first GPU
# then TensorBoard: docker exec -d gptds tensorboard --logdir runs --bind_all, and open http://localhost:6006
#
# Inside the container the working directory is /workspace: DATA_DIR is /workspace/data and RUNS_DIR is
# /workspace/runs, so gptds's relative defaults (--log_dir runs/pretrain, checkpoints under it) land on the host.
# The container runs as your user id (HOME=/tmp, as the id has no home in the image), so the files it writes are yours.
# Environment:
#   IMAGE     the image (default: gptds, as `docker build -f docker/Dockerfile -t gptds .` tags it)
#   DATA_DIR  host folder with prepared datasets, mounted at /workspace/data (default: ./data)
#   RUNS_DIR  host folder for logs, TensorBoard events and checkpoints, at /workspace/runs (default: ./runs)
#   NAME      container name, for docker exec / docker stop (default: gptds)
#   TB_PORT   host port for TensorBoard's 6006 (default: 6006)
#   GPUS      docker's --gpus value (default: all; e.g. '"device=0,1"')
#   STOP_TIMEOUT  seconds `docker stop` waits for the checkpoint before killing (default: 300)
set -euo pipefail

die() { echo "docker_run.sh: error: $*" >&2; exit 2; }
usage="usage: launch/docker_run.sh COMMAND [ARGS...]  (e.g. ds_report, or deepspeed --no_local_rank --module gptds pretrain ...)"

(( $# >= 1 )) || die "$usage"
IMAGE=${IMAGE:-gptds}
DATA_DIR=${DATA_DIR:-$PWD/data}
RUNS_DIR=${RUNS_DIR:-$PWD/runs}
# Docker would create a missing folder as root (and an empty dataset folder trains on nothing): refuse instead.
for dir in "$DATA_DIR" "$RUNS_DIR"; do
    [[ -d $dir ]] || die "$dir is not a folder: create it (mkdir -p $dir), or point DATA_DIR / RUNS_DIR elsewhere"
done
command -v docker >/dev/null || die "docker not found on PATH"

tty=()
if [[ -t 0 && -t 1 ]]; then tty=(-it); fi
# --stop-timeout: `docker stop` makes the ranks checkpoint (docker/entrypoint.sh) and waits this long for it.
exec docker run --rm "${tty[@]}" --name "${NAME:-gptds}" --stop-timeout "${STOP_TIMEOUT:-300}" \
    --gpus "${GPUS:-all}" --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
    --user "$(id -u):$(id -g)" --env HOME=/tmp --env USER="$(id -un)" \
    --volume "$(realpath "$DATA_DIR"):/workspace/data" --volume "$(realpath "$RUNS_DIR"):/workspace/runs" \
    --publish "${TB_PORT:-6006}:6006" \
    "$IMAGE" "$@"
