"""A real one-node SLURM cluster for the launch tests.

The session fixture `slurm` starts the cluster with launch_scripts/slurm/local_cluster.sh (DESIGN.md §10)
and stops it at the end, unless it was already running before the tests (then it is left as found).
There is no accounting database, so job states and exit codes are read with `scontrol show job`.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_SCRIPTS = REPO / "launch_scripts" / "slurm"
LOCAL_CLUSTER = SLURM_SCRIPTS / "local_cluster.sh"
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show -o` record -> {key: value}; a value may contain spaces (e.g. Reason)."""
    record: dict[str, str] = {}
    key = None
    for token in line.split(" "):
        name, sep, value = token.partition("=")
        if sep and name and not name.startswith("-"):
            key = name
            record[key] = value
        elif key is not None:
            record[key] += " " + token
    return record


class Cluster:
    """Submits jobs to the local cluster and waits for them; every call is a real SLURM command."""

    scripts = SLURM_SCRIPTS
    repo = REPO

    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.env = {**os.environ, "SLURM_CONF": str(conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
        """Submits from `cwd` (the job's SLURM_SUBMIT_DIR) and returns the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """All records of a job id: one for a plain job, one per task for an array job."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [parse_scontrol_record(line) for line in out.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        (record,) = self.jobs(job_id)
        return record

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.5)

    def wait_finished(self, job_id: str, timeout_s: float, log: Path | None = None) -> list[dict[str, str]]:
        """Waits until every record of the job is in a final state; the log tail goes into a timeout error."""
        def finished() -> bool:
            return all(record["JobState"] in FINISHED_STATES for record in self.jobs(job_id))

        try:
            self.wait_until(finished, timeout_s, f"job {job_id} to finish")
        except TimeoutError as error:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else "(no log)"
            self.run("scancel", job_id, check=False)
            raise TimeoutError(f"{error}; states {[r['JobState'] for r in self.jobs(job_id)]}; log:\n{tail}") from None
        return self.jobs(job_id)


@pytest.fixture(scope="session")
def slurm() -> Iterator[Cluster]:
    was_running = subprocess.run(["bash", str(LOCAL_CLUSTER), "status"], capture_output=True).returncode == 0
    started = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start: {started.stderr.strip()}")
    export_line = started.stdout.strip().splitlines()[-1]
    assert export_line.startswith("export SLURM_CONF="), started.stdout
    yield Cluster(Path(export_line.removeprefix("export SLURM_CONF=")))
    if not was_running:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], capture_output=True, timeout=120)
