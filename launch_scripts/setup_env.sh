#!/usr/bin/env bash
# Creates .venv (once) with pinned dependencies; sourced by quickstart.sh and run_tests.sh.
# torch==2.13.0 goes in first, from the CPU wheel on disk when there is one, so that no
# dependency can pull a multi-GB CUDA build. A stamp file written last marks a complete
# install: a killed install is simply redone, a complete one is skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
PIP_EXTRA=()
[ -d /opt/wheels ] && PIP_EXTRA+=(--find-links /opt/wheels)

if [ ! -f "$STAMP" ]; then
    echo "[setup] creating $VENV (torch==2.13.0 first, then pinned dependencies)"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_EXTRA[@]}" "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_EXTRA[@]}" \
        -c "$ROOT/constraints.txt" -e "$ROOT[test,eval,wandb]"  # the suite tests the optional extras too
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
    echo "[setup] done"
else
    echo "[setup] $VENV is up to date, skipping install"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
# jemalloc avoids glibc's page-fault storms on long-sequence CPU steps (DESIGN.md §8): install it
# when we can (root with apt-get), use it when present.
if ! ls /usr/lib/*-linux-gnu/libjemalloc.so.2 >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing libjemalloc2"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2) >/dev/null 2>&1 \
        || echo "[setup] libjemalloc2 not installed; using glibc malloc"
fi
for lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2; do
    if [ -f "$lib" ]; then export LD_PRELOAD="${LD_PRELOAD:+$LD_PRELOAD:}$lib"; break; fi
done
