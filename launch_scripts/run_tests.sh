#!/usr/bin/env bash
# The README's test command: set up .venv (once), install what the tests need from the system
# (a one-node SLURM cluster's packages, jemalloc) when running as root, then run the whole suite.
# Extra arguments go to pytest (e.g. `bash launch_scripts/run_tests.sh tests/data_prep -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch_scripts/setup_env.sh
if [ -x launch_scripts/slurm/local_cluster.sh ] || [ -f launch_scripts/slurm/local_cluster.sh ]; then
    bash launch_scripts/slurm/local_cluster.sh install
fi
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "run_tests: pytest collected no tests: the setup is broken" >&2
    exit 1
fi
exit "$status"
