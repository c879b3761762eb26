#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the sbatch scripts
# (DESIGN.md §10; checked with Debian's slurm-wlm 22.05).
#
#   local_cluster.sh install   apt-get install slurmctld slurmd slurm-client munge (if missing)
#   local_cluster.sh start     start munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   local_cluster.sh stop      cancel its jobs, stop the daemons it started (by pid file)
#   local_cluster.sh status    daemon pids and `sinfo`
#
# All state (slurm.conf, spool, logs, pid files, a private munge socket) lives under
# $MEMMAMBA_SLURM_DIR (default: ${TMPDIR:-/tmp}/memmamba-slurm), so the cluster touches
# no system configuration and `stop` ends only daemons whose pid files are there.
# Every command is idempotent. Use it from a shell with: eval "$(local_cluster.sh start)".
# Only messages go to stderr; `start` prints the one export line on stdout.
set -euo pipefail

STATE="${MEMMAMBA_SLURM_DIR:-${TMPDIR:-/tmp}/memmamba-slurm}"
CONF="$STATE/slurm.conf"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
NODE="$(hostname -s)"
PARTITION="debug"
READY_TIMEOUT_S=60

say() { echo "[local_cluster] $*" >&2; }
die() { echo "[local_cluster] error: $*" >&2; exit 1; }

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# pid from a pid file if that process is alive and is the named program, else nothing.
# Checking the program name keeps a recycled pid from being mistaken for our daemon.
live_pid() {
    local pid_file="$1" program="$2" pid
    [ -s "$pid_file" ] || return 0
    pid="$(tr -dc '0-9' < "$pid_file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 0
    case "$(cat "/proc/$pid/comm")" in "$program"*) echo "$pid" ;; esac
}

do_install() {
    local missing=()
    for tool in slurmctld slurmd sbatch srun scontrol munged; do
        command -v "$tool" > /dev/null || missing+=("$tool")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "SLURM and munge are installed ($(slurmctld -V))"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; run 'install' as root (it uses apt-get)"
    command -v apt-get > /dev/null || die "missing ${missing[*]} and no apt-get: install slurmctld slurmd slurm-client munge by hand"
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge > /dev/null
    say "installed $(slurmctld -V)"
}

write_conf() {
    local cpus mem_mb
    cpus="$(nproc)"
    # Leave a tenth of the memory to the system; slurmd refuses a node claiming more than it has.
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    cat > "$CONF.tmp" <<EOF
# Written by launch_scripts/slurm/local_cluster.sh: a one-node test cluster.
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${MEMMAMBA_SLURMCTLD_PORT:-6817}
SlurmdPort=${MEMMAMBA_SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
# No cgroups in containers: track processes by parent pid, bind no CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Preempted jobs requeue themselves (scontrol requeue); a node that was down comes back by itself.
JobRequeue=1
ReturnToService=2
# Keep finished jobs visible to 'scontrol show job' (there is no accounting database).
MinJobAge=3600
KillWait=30
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munged() {
    if [ -n "$(live_pid "$MUNGE_DIR/munged.pid" munged)" ]; then return; fi
    id munge > /dev/null 2>&1 || die "no 'munge' user: run '$0 install' first"
    # munged runs as its own user, refuses directories others can write to, and clients need
    # search permission on the socket's directory.
    install -d -m 0755 -o munge -g munge "$MUNGE_DIR"
    runuser -u munge -- munged \
        --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    say "munged started (socket $MUNGE_SOCKET)"
}

start_daemon() {
    local program="$1"
    if [ -n "$(live_pid "$STATE/$program.pid" "$program")" ]; then return; fi
    "$program" -f "$CONF"
    say "$program started"
}

# Waits until the node accepts jobs; a node left down or drained by an earlier run is resumed.
wait_until_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT_S)) state
    while [ "$SECONDS" -lt "$deadline" ]; do
        state="$(SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %t 2> /dev/null || true)"
        case "$state" in
            idle*|mix*|alloc*) return ;;
            down*|drain*|drng*)
                SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume 2> /dev/null || true ;;
        esac
        sleep 1
    done
    die "node $NODE not ready after ${READY_TIMEOUT_S}s (state '${state:-none}'); see $STATE/log/"
}

do_start() {
    command -v slurmctld > /dev/null || die "SLURM is not installed: run '$0 install' first"
    [ "$(id -u)" -eq 0 ] || die "'start' needs root (slurmd launches jobs as their owner)"
    mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
    # The config is rewritten only while no daemon reads it, so 'start' on a running cluster is a no-op.
    if [ -z "$(live_pid "$STATE/slurmctld.pid" slurmctld)$(live_pid "$STATE/slurmd.pid" slurmd)" ]; then
        write_conf
    fi
    start_munged
    start_daemon slurmctld
    start_daemon slurmd
    wait_until_ready
    say "cluster up: node $NODE, partition $PARTITION, state in $STATE"
    echo "export SLURM_CONF=$CONF"
}

stop_pid_file() {
    local pid_file="$1" program="$2" pid
    pid="$(live_pid "$pid_file" "$program")"
    rm -f "$pid_file"
    [ -n "$pid" ] || return 0
    kill -TERM "$pid"
    for _ in $(seq 100); do
        [ -d "/proc/$pid" ] || { say "$program stopped"; return; }
        sleep 0.1
    done
    kill -KILL "$pid" 2> /dev/null || true
    say "$program killed (did not exit on SIGTERM within 10 s)"
}

do_stop() {
    if [ -n "$(live_pid "$STATE/slurmctld.pid" slurmctld)" ]; then
        # Cancel this cluster's jobs first, so no job step outlives its slurmd.
        local jobs
        jobs="$(SLURM_CONF="$CONF" squeue -h -o %A 2> /dev/null || true)"
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086  # one argument per job id
            SLURM_CONF="$CONF" scancel $jobs || true
            for _ in $(seq 30); do
                [ -z "$(SLURM_CONF="$CONF" squeue -h -o %A 2> /dev/null)" ] && break
                sleep 1
            done
        fi
    fi
    stop_pid_file "$STATE/slurmd.pid" slurmd
    stop_pid_file "$STATE/slurmctld.pid" slurmctld
    stop_pid_file "$MUNGE_DIR/munged.pid" munged
}

do_status() {
    local running=0 pid
    for entry in "$MUNGE_DIR/munged.pid:munged" "$STATE/slurmctld.pid:slurmctld" "$STATE/slurmd.pid:slurmd"; do
        pid="$(live_pid "${entry%%:*}" "${entry##*:}")"
        say "${entry##*:}: ${pid:-not running}"
        [ -n "$pid" ] && running=$((running + 1))
    done
    say "SLURM_CONF=$CONF"
    [ "$running" -eq 3 ] || return 1
    SLURM_CONF="$CONF" sinfo
}

case "${1:-}" in
    install) do_install ;;
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    -h|--help|help) usage ;;
    *) usage >&2; echo "[local_cluster] error: expected one of install|start|stop|status, got '${1:-}'" >&2; exit 2 ;;
esac
