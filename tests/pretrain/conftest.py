"""Helpers to launch real training runs (through the `deepspeed` launcher or as one process) and read them back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TORCHRUN = Path(sys.executable).parent / "torchrun"
MAIN = REPO_ROOT / "pretrain" / "main.py"


def tiny_overrides(data_dir: Path) -> list[str]:
    """The quickstart config shrunk to 8 steps: 4 x 512 tokens at seq_len 64, then 4 at 128 (constant tokens)."""
    return [f"data.path={data_dir}",
            "curriculum.stages=[{tokens: 0, seq_len: 64}, {tokens: 2048, seq_len: 128}]",
            "train.max_tokens=4096", "optimizer.warmup_tokens=512", "logging.every_steps=1",
            "logging.progress_bar=false", "eval.seq_lens=[64]", "eval.samples=4", "eval.every_steps=4",
            "checkpoint.every_steps=3", "checkpoint.keep_last=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(run_dir: Path, overrides: list[str], nproc: int, extra: list[str] = (),
                  launcher: str = "deepspeed") -> list[str]:
    args = ["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--run-dir", str(run_dir), *extra]
    for override in overrides:
        args += ["--set", override]
    if nproc == 1:
        return [sys.executable, str(MAIN), *args]
    if launcher == "torchrun":
        return [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master-port", str(free_port()), str(MAIN), *args]
    return [str(DEEPSPEED), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(MAIN), *args]


def child_env() -> dict[str, str]:
    # One thread per rank: the two ranks share this machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


_started: list[subprocess.Popen] = []


def start(run_dir: Path, overrides: list[str], nproc: int = 2, extra: list[str] = (),
          launcher: str = "deepspeed") -> subprocess.Popen:
    """Launch in its own process group: `deepspeed` keeps its ranks in it, so a test can SIGKILL them all at once."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    process = subprocess.Popen(train_command(run_dir, overrides, nproc, extra, launcher), cwd=REPO_ROOT,
                               env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    _started.append(process)
    return process


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A failed test must not leave its launcher and ranks running (torchrun's ranks have their own sessions)."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 400) -> tuple[int, str]:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return code, (run_dir.parent / f"{run_dir.name}.log").read_text()


def train(run_dir: Path, overrides: list[str], nproc: int = 2, extra: list[str] = (),
          launcher: str = "deepspeed") -> str:
    """Run to completion; fail with the log unless it exits 0."""
    code, log = finish(start(run_dir, overrides, nproc, extra, launcher), run_dir)
    assert code == 0, f"training exited {code}:\n{log[-6000:]}"
    return log


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def wait_for(condition, timeout: float = 300, interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        time.sleep(interval)


def consolidated_weights(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights gathered from a ZeRO checkpoint's shards, without any process group."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def client_state(checkpoint_dir: Path, tag: str) -> dict:
    """Our trainer state as DeepSpeed stored it in the checkpoint (rank 0's model-states file)."""
    files = sorted((checkpoint_dir / tag).glob("*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False)["trainer"]


@pytest.fixture(scope="session")
def tiny_data(synthetic_data) -> Path:
    return synthetic_data["data"]
