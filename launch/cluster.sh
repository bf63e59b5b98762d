#!/usr/bin/env bash
# Multi-node training over ssh with the deepspeed launcher: from one node, checks the hostfile and that
# every host resolves and answers passwordless ssh, then runs
#   deepspeed --hostfile HOSTFILE --master_addr ... --master_port ... --no_local_rank --module gptds JOB ...
# which starts one gptds rank per slot on every host through pdsh. Under SLURM use launch/slurm.sbatch (no ssh).
#
# Usage: launch/cluster.sh HOSTFILE pretrain|finetune --data_dir DIR --deepspeed_config CONFIG [gptds flags...]
#   e.g. launch/cluster.sh hostfile pretrain --data_dir /shared/data/fineweb --deepspeed_config zero2 \
#            --model gpt2 --auto_resume
# HOSTFILE: "hostname slots=N" lines (launch/hostfile.example). --data_dir and --deepspeed_config are required
# here (the demo defaults are for one machine); the other flags are `gptds pretrain --help`'s.
# Needs: pdsh on this node, passwordless ssh to every host, and the repository, the virtualenv, the data and
# the run folder at the same paths on every node (a shared filesystem: every rank writes checkpoint shards).
#
# Environment:
#   RUN_NAME     names the run (default: the job); the run folder is LOG_DIR
#   LOG_DIR      gptds --log_dir: TensorBoard, metrics, checkpoints and launcher.log (default: runs/$RUN_NAME);
#                set this instead of passing --log_dir
#   MASTER_ADDR  an address of node 0 that every node reaches (default: the first host of HOSTFILE)
#   MASTER_PORT  a free TCP port on node 0 for the rendezvous (default: 29500)
#   SSH_PORT     ssh port of the hosts, if not 22
#   DS_ACCELERATOR  deepspeed's accelerator on this node (default: cuda). It decides which variables deepspeed
#                exports to the nodes (cuda: NCCL_*; its CPU backend, picked on a node without a GPU, exports none)
# NCCL (set in your shell; deepspeed exports every NCCL_* variable to all nodes):
#   NCCL_SOCKET_IFNAME=eth0  the interface for NCCL's bootstrap and TCP traffic; set it when nodes have several
#                            (docker0, lo, ib0, ...): a wrong pick hangs the first collective
#   NCCL_IB_DISABLE=1        no InfiniBand/RoCE, TCP sockets only (cloud VMs without IB); leave unset on IB clusters
#   NCCL_DEBUG=INFO          NCCL's transport choices at start-up (default here: WARN)
# Other variables the ranks need on every node (HF_HOME, CUDA_*, ...): list them as KEY=VALUE lines, no blank
# lines or comments, in ./.deepspeed_env or ~/.deepspeed_env; deepspeed exports those over pdsh too.
set -euo pipefail

die() { echo "cluster.sh: error: $*" >&2; exit 2; }
has_flag() { local flag=$1 arg; shift; for arg in "$@"; do [[ $arg == "$flag" || $arg == "$flag="* ]] && return 0; done; return 1; }
usage="usage: launch/cluster.sh HOSTFILE pretrain|finetune --data_dir DIR --deepspeed_config CONFIG [gptds flags...]"

(( $# >= 2 )) || die "$usage"
hostfile=$1 job=$2
shift 2
[[ -f $hostfile && -r $hostfile ]] || die "hostfile '$hostfile' is not a readable file (deepspeed would silently run on this machine alone); $usage"
[[ $job == pretrain || $job == finetune ]] || die "the job must be pretrain or finetune, not '$job'; $usage"
has_flag --data_dir "$@" || die "--data_dir DIR is required: a prepared dataset on a filesystem every node sees"
has_flag --deepspeed_config "$@" || die "--deepspeed_config is required: a ds_configs/ name (zero1, zero2, zero3, ...) or a JSON path"
has_flag --log_dir "$@" && die "set LOG_DIR=... instead of --log_dir: this script writes its launcher.log there"

# The hostfile, stricter than deepspeed's parser (which accepts trailing junk): every line "hostname slots=N".
hosts=()
lineno=0
while IFS= read -r line || [[ -n $line ]]; do
    lineno=$((lineno + 1))
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    [[ $line =~ ^([^[:space:]#]+)[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]] \
        || die "$hostfile line $lineno: '$line' is not 'hostname slots=N' (N >= 1)"
    host=${BASH_REMATCH[1]}
    for seen in "${hosts[@]}"; do [[ $seen == "$host" ]] && die "$hostfile line $lineno: $host is listed twice"; done
    hosts+=("$host")
done < "$hostfile"
(( ${#hosts[@]} > 0 )) || die "$hostfile lists no hosts"

command -v deepspeed >/dev/null || die "deepspeed not found on PATH: activate the virtualenv gptds is installed in"
command -v pdsh >/dev/null || die "pdsh not found: deepspeed starts the other nodes with it (apt-get install pdsh); under SLURM use launch/slurm.sbatch"

# A node that is down or unreachable would leave the others waiting at the rendezvous: find it now, in seconds.
ssh_opts=(-o BatchMode=yes -o ConnectTimeout=5)
[[ -n ${SSH_PORT:-} ]] && ssh_opts+=(-p "$SSH_PORT")
for host in "${hosts[@]}"; do
    timeout 5 getent hosts "$host" >/dev/null || die "host $host (in $hostfile) does not resolve"
done
for host in "${hosts[@]}"; do
    timeout 15 ssh "${ssh_opts[@]}" "$host" true </dev/null \
        || die "host $host (in $hostfile) does not answer passwordless ssh within 5 s (ssh ${ssh_opts[*]} $host true)"
done

RUN_NAME=${RUN_NAME:-$job}
LOG_DIR=${LOG_DIR:-runs/$RUN_NAME}
MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
MASTER_PORT=${MASTER_PORT:-29500}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A login node without a GPU would make deepspeed pick its CPU backend, which exports no NCCL_* to the nodes.
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
ds_opts=(--hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[[ -n ${SSH_PORT:-} ]] && ds_opts+=(--ssh_port "$SSH_PORT")

mkdir -p "$LOG_DIR"
echo "cluster.sh: ${#hosts[@]} nodes (${hosts[*]}), rendezvous at $MASTER_ADDR:$MASTER_PORT, run folder $LOG_DIR" >&2
deepspeed "${ds_opts[@]}" --no_local_rank --module gptds "$job" --log_dir "$LOG_DIR" "$@" 2>&1 \
    | tee -a "$LOG_DIR/launcher.log"
