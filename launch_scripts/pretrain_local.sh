#!/usr/bin/env bash
# Single-node training without SLURM, through the DeepSpeed launcher (one process per GPU):
#
#   launch_scripts/pretrain_local.sh [--num-gpus N] --config configs/quickstart.yaml --run-dir runs/NAME \
#       [--resume auto] [--max-steps N] [--set a.b=c ...]
#
# N defaults to $NUM_GPUS, else the GPUs nvidia-smi lists, else 1 (a CPU run; on CPU each of N processes
# is one gloo rank). The other arguments go to pretrain/main.py unchanged. On Ctrl-C or SIGTERM (e.g.
# `timeout -s TERM 3600 launch_scripts/pretrain_local.sh ...`) every rank gets SIGTERM and checkpoints
# at the next step boundary (DeepSpeed's launcher kills ranks still running after 30 s), and this
# script returns only when they have all exited (128 + the signal's number); rerunning with
# --resume auto continues. Rendezvous port: $MASTER_PORT (default 29500).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
num_gpus="${NUM_GPUS:-}"
if [ "${1:-}" = "--num-gpus" ]; then
    num_gpus="${2:?--num-gpus needs a number}"
    shift 2
fi
if [ -z "$num_gpus" ]; then
    num_gpus="$( (nvidia-smi -L 2> /dev/null || true) | grep -c '^GPU' || true)"
    [ "$num_gpus" -gt 0 ] || num_gpus=1
fi
case "$num_gpus" in
    ''|*[!0-9]*|0) echo "pretrain_local.sh: error: --num-gpus/NUM_GPUS: expected a positive integer, got '$num_gpus'" >&2; exit 2 ;;
esac

source "$ROOT/launch_scripts/slurm/job_env.sh"
# The `deepspeed` command forwards no signal and exits before its ranks do, so it runs in a process
# group of its own (job control), a signal goes to that whole group, and the script waits until the
# group is empty: whoever signalled us sees the exit only once the stop checkpoint is complete.
set -m
deepspeed --num_gpus "$num_gpus" --master_port "${MASTER_PORT:-29500}" "$ROOT/pretrain/main.py" "$@" &
launcher=$!
stop() {
    trap '' TERM INT
    kill -TERM -- "-$launcher" 2> /dev/null || true
    wait "$launcher" 2> /dev/null || true
    while kill -0 -- "-$launcher" 2> /dev/null; do sleep 0.5; done
    exit "$1"
}
trap 'stop 143' TERM
trap 'stop 130' INT
wait "$launcher"
