"""The local cluster runs real jobs: exit codes, multi-task steps, idempotent start."""

import subprocess


def test_batch_job_exit_code_is_reported(slurm, tmp_path):
    log = tmp_path / "job-%j.log"
    failing = slurm.sbatch("--job-name=exit3", f"--output={log}", "--wrap", "echo ran job $SLURM_JOB_ID; exit 3")
    passing = slurm.sbatch("--job-name=exit0", f"--output={log}", "--wrap", "echo ran job $SLURM_JOB_ID")
    (failed,) = slurm.wait_finished(failing, timeout_s=60)
    (completed,) = slurm.wait_finished(passing, timeout_s=60)
    assert (failed["JobState"], failed["ExitCode"]) == ("FAILED", "3:0")
    assert (completed["JobState"], completed["ExitCode"]) == ("COMPLETED", "0:0")
    assert (tmp_path / f"job-{failing}.log").read_text() == f"ran job {failing}\n"


def test_two_task_step_gets_distinct_ranks(slurm, tmp_path):
    log = tmp_path / "ranks.log"
    job = slurm.sbatch(
        "--ntasks=2", f"--output={log}", "--wrap",
        'srun bash -c "echo rank \\$SLURM_PROCID of \\$SLURM_NTASKS"',
    )
    (record,) = slurm.wait_finished(job, timeout_s=60, log=log)
    assert record["ExitCode"] == "0:0", log.read_text()
    assert sorted(log.read_text().splitlines()) == ["rank 0 of 2", "rank 1 of 2"]


def test_start_on_running_cluster_changes_nothing(slurm):
    local_cluster = str(slurm.scripts / "local_cluster.sh")

    def daemon_pids() -> str:
        status = subprocess.run(["bash", local_cluster, "status"], capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        return status.stderr

    before = daemon_pids()
    again = subprocess.run(["bash", local_cluster, "start"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"export SLURM_CONF={slurm.conf}"
    assert daemon_pids() == before
    assert "started" not in again.stderr
