"""SIGTERM to the launcher, not to the ranks: the run still ends in a stop checkpoint that resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from pretrain.checkpoint import read_latest

from ..pretrain.conftest import REPO_ROOT, child_env, free_port, start, tiny_overrides, train, train_losses, wait_for

pytestmark = pytest.mark.slow
LONG = ["train.max_tokens=1000000", "checkpoint.every_steps=100000"]
"""A run far longer than the test: only the signal ends it."""


def ranks_of(process: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(process.pid).children(recursive=True)
            if any(arg.startswith("--local_rank=") for arg in p.cmdline())]


def test_sigterm_to_the_deepspeed_command_alone_stops_the_ranks_with_a_checkpoint(tmp_path: Path, synthetic_data):
    overrides = [*tiny_overrides(synthetic_data["data"]), *LONG]
    run = tmp_path / "run"
    process = start(run, overrides)
    try:
        wait_for(lambda: len(train_losses(run)) >= 2 or process.poll() is not None, interval=0.05)
        ranks = ranks_of(process)
        assert len(ranks) == 2
        process.send_signal(signal.SIGTERM)  # the launcher's pid only, as `kill PID` or a job manager does
        process.wait(timeout=60)
        _, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive  # (their exit codes went to the node launcher, not to this test)
    finally:
        for rank in psutil.Process().children(recursive=True):
            rank.kill()
    log = (run.parent / f"{run.name}.log").read_text()
    assert "stop signal (the deepspeed command exited)" in log, log[-3000:]
    stopped = max(train_losses(run))
    assert read_latest(run / "checkpoints") == f"global_step{stopped}"

    train(run, overrides, extra=["--max-steps", str(stopped + 2)])
    reference = tmp_path / "reference"
    train(reference, overrides, extra=["--max-steps", str(stopped + 2)])
    expected = train_losses(reference)
    assert train_losses(run) == expected  # steps before the stop, and the two after the resume


def test_timeout_of_the_local_launch_script_returns_after_the_stop_checkpoint(tmp_path: Path, synthetic_data):
    run = tmp_path / "run"
    args = [f"--set={o}" for o in [*tiny_overrides(synthetic_data["data"]), *LONG]]
    result = subprocess.run(["timeout", "-s", "TERM", "45", "bash", str(REPO_ROOT / "launch_scripts" / "pretrain_local.sh"),
                             "--num-gpus", "2", "--config", "configs/quickstart.yaml", "--run-dir", str(run), *args],
                            cwd=REPO_ROOT, env={**child_env(), "MASTER_PORT": str(free_port())}, capture_output=True,
                            text=True, timeout=300)
    still_running = [p.pid for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])]
    for pid in still_running:
        os.kill(pid, signal.SIGKILL)
    assert result.returncode == 124, result.stderr[-3000:]  # timeout's code: it did stop the run
    assert not still_running  # every rank had exited when the command returned
    assert "exiting so the job can be requeued" in result.stdout + result.stderr
    stopped = max(train_losses(run))
    assert read_latest(run / "checkpoints") == f"global_step{stopped}"  # resuming from it: the test above
