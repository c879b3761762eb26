# shellcheck shell=bash
# Sourced (not run) by launch_scripts/slurm/*.sbatch and launch_scripts/pretrain_local.sh, with ROOT set
# to the repository: puts the project's virtual environment first on PATH when there is one (on a
# cluster without it, load modules or a container before submitting, see docs/slurm.md) and preloads
# jemalloc when installed (DESIGN.md §8: glibc malloc page-faults heavily on long sequences).
if [ -x "$ROOT/.venv/bin/python" ]; then
    export VIRTUAL_ENV="$ROOT/.venv"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
fi
for jemalloc in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2; do
    if [ -f "$jemalloc" ]; then
        case ":${LD_PRELOAD:-}:" in *":$jemalloc:"*) ;; *) export LD_PRELOAD="${LD_PRELOAD:+$LD_PRELOAD:}$jemalloc" ;; esac
        break
    fi
done
unset jemalloc
# Logs reach the job's output file as they are written, not when a buffer fills.
export PYTHONUNBUFFERED=1
