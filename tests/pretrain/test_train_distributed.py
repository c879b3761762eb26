"""End-to-end training through the real launchers (`deepspeed`, `torchrun`): 2 CPU processes, ZeRO-3, gloo.

One uninterrupted DP=2 run (8 steps, seq_len 64 -> 128 after 4 steps) is the reference that the
other runs are compared with: TP=2, a run SIGKILLed while it writes a checkpoint and resumed, a
resume at DP=1, and a SIGTERM'd run.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.checkpoint import LATEST, read_latest, step_of_tag
from pretrain.config import RunConfig, load_config
from pretrain.flops import model_flops_per_token
from pretrain.schedule import learning_rate, step_shape

from .conftest import (REPO_ROOT, client_state, consolidated_weights, finish, metrics, start, tiny_overrides, train,
                       train_losses, wait_for)

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    log = train(run_dir, tiny_overrides(tiny_data))
    return run_dir, log


def test_dp2_zero3_trains_through_a_curriculum_change(full_run, tiny_data):
    run_dir, log = full_run
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[7] + losses[8] < losses[1] + losses[2] - 0.2, losses  # loss falls on the synthetic corpus
    assert "world 2 = tp 1 x dp 2" in log and f"done: step {STEPS}, 4,096 tokens, final loss" in log
    saved = load_config(RunConfig, run_dir / "config.yaml")
    assert saved == load_config(RunConfig, REPO_ROOT / "configs" / "quickstart.yaml", tiny_overrides(tiny_data))
    assert saved.deepspeed.zero_stage == 3
    assert read_latest(run_dir / "checkpoints") == f"global_step{STEPS}"
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if step_of_tag(p.name))
    assert tags == ["global_step3", "global_step6", "global_step8"]  # every 3 steps and at the end, keep 3


def test_run_files_follow_the_umask(full_run):
    """Colleagues on a shared cluster can read a run: atomic writes give what a plain open() would."""
    run_dir, _ = full_run
    umask = os.umask(0)
    os.umask(umask)
    wrong = {str(path.relative_to(run_dir)): oct(stat.S_IMODE(path.stat().st_mode)) for path in run_dir.rglob("*")
             if path.is_file() and path.stat().st_mode & 0o666 != 0o666 & ~umask}  # DeepSpeed's scripts are +x
    assert not wrong, f"expected {oct(0o666 & ~umask)} under umask {oct(umask)}: {wrong}"

def test_metrics_follow_the_curriculum_and_the_token_schedule(full_run):
    run_dir, _ = full_run
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    records = [r for r in metrics(run_dir) if "loss" in r]
    tokens_before = 0
    for record in records:
        assert {"step", "tokens", "loss", "lr", "seq_len", "grad_norm", "tokens_per_s"} <= set(record)
        shape = step_shape(cfg.curriculum, cfg.train, tokens_before, dp_size=2)
        assert record["seq_len"] == shape.seq_len == (64 if tokens_before < 2048 else 128)
        assert record["tokens"] == tokens_before + shape.tokens == tokens_before + 512
        assert record["lr"] == learning_rate(cfg.optimizer, tokens_before, cfg.train.max_tokens)
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0 and record["skipped_steps"] == 0
        flops = model_flops_per_token(cfg.model, record["seq_len"]).train
        assert record["tflops_per_device"] == pytest.approx(record["tokens_per_s"] * flops / 2 / 1e12)
        assert 0 < record["mfu"] < 1.5  # against a matmul measured on this CPU at start-up
        tokens_before = record["tokens"]
    validations = [r for r in metrics(run_dir) if "valid/loss@64" in r]
    assert [r["step"] for r in validations] == [4, 8, 8]  # every 4 steps, and at the end


def test_tensorboard_holds_the_scalars(full_run):
    run_dir, _ = full_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/seq_len", "train/tokens_seen", "perf/tokens_per_s", "perf/step_time_s",
            "train/grad_norm", "train/skipped_steps", "perf/memory_gb", "perf/tflops_per_device", "perf/mfu",
            "valid/loss@64"} <= tags
    mfu = {r["step"]: r["mfu"] for r in metrics(run_dir) if "mfu" in r}
    assert {e.step: e.value for e in events.Scalars("perf/mfu")} == pytest.approx(mfu, rel=1e-6)
    losses = train_losses(run_dir)
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(losses, rel=1e-6)
    assert [e.value for e in events.Scalars("train/seq_len")] == [64] * 4 + [128] * 4


def test_tp2_trains_like_dp2(full_run, tiny_data, tmp_path):
    """DP=1/TP=2 (launched by torchrun) sees the same global batches (2 micro-batches per step) from the
    same initial weights, sharded."""
    reference, _ = full_run
    run_dir = tmp_path / "tp2"
    log = train(run_dir, tiny_overrides(tiny_data) + ["parallel.tp=2"], launcher="torchrun")
    assert "world 2 = tp 2 x dp 1" in log
    losses, expected = train_losses(run_dir), train_losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(expected, rel=1e-4)
    assert losses[7] + losses[8] < losses[1] + losses[2] - 0.2

    # Its TP-sharded checkpoint resumes in one process (TP=1): ds_to_universal merges the shards
    # with the partition info (per-component in_proj, conv1d) saved in the client state.
    merged = tmp_path / "tp2_to_tp1"
    train(merged, tiny_overrides(tiny_data), nproc=1,
          extra=["--resume", str(run_dir / "checkpoints" / "global_step3"), "--max-steps", "5"])
    resumed = train_losses(merged)
    assert sorted(resumed) == [4, 5]
    assert [resumed[4], resumed[5]] == pytest.approx([losses[4], losses[5]], rel=1e-4)


@pytest.mark.parametrize("layout, launcher", [("parallel.tp=1", "deepspeed"), ("parallel.tp=2", "torchrun")])
def test_zero_stage_0_trains_like_zero3_and_reports_the_same_gradient_norm(full_run, tiny_data, tmp_path, layout,
                                                                         launcher):
    """ZeRO stage 0 (DeepSpeed's plain data parallelism), at DP=2 and at TP=2: the same steps as the
    ZeRO-3 reference, with the gradient norm that DeepSpeed does not keep at stage 0 computed by the
    trainer (each weight replicated over the TP ranks counted once), so no step is taken as non-finite."""
    reference, _ = full_run
    run_dir = tmp_path / "zero0"
    train(run_dir, tiny_overrides(tiny_data) + ["deepspeed.zero_stage=0", layout], launcher=launcher)
    records, expected = ([r for r in metrics(d) if "loss" in r] for d in (run_dir, reference))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["skipped_steps"] for r in records] == [0] * STEPS
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in expected], rel=1e-4)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4)


def test_sigkill_during_a_checkpoint_then_exact_resume(full_run, tiny_data, tmp_path):
    """Kill every process while checkpoint N is being written: `latest` still names the one before, the
    partial one is removed on resume, and the resumed run equals the uninterrupted one bit for bit,
    through the curriculum change (data position included)."""
    reference, _ = full_run
    run_dir = tmp_path / "killed"
    checkpoints = run_dir / "checkpoints"
    overrides = tiny_overrides(tiny_data) + ["checkpoint.every_steps=1"]
    process = start(run_dir, overrides)

    def partial_checkpoint() -> str | None:
        """A tag directory newer than `latest` (a save in progress), once a complete checkpoint exists."""
        try:
            latest = (checkpoints / LATEST).read_text().strip()
            names = os.listdir(checkpoints)
        except (FileNotFoundError, NotADirectoryError):
            return None
        newer = [n for n in names if (step_of_tag(n) or 0) > (step_of_tag(latest) or 10**9)]
        return newer[0] if newer and step_of_tag(latest) >= 2 else None

    wait_for(lambda: partial_checkpoint() is not None or process.poll() is not None)
    os.killpg(process.pid, signal.SIGKILL)
    finish(process, run_dir)
    partial, latest = partial_checkpoint(), read_latest(checkpoints)
    assert partial is not None, "the kill came after the save completed"
    assert not (checkpoints / partial / "meta.json").exists()
    assert step_of_tag(latest) == step_of_tag(partial) - 1 and step_of_tag(latest) <= 4  # before the length change

    log = train(run_dir, overrides)
    assert f"removed {checkpoints / partial}" in log and f"resuming from {checkpoints / latest}" in log
    losses, expected = train_losses(run_dir), train_losses(reference)
    assert losses == expected  # bitwise, including the steps after the resume point
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))  # one trajectory
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))  # the killed steps purged
    final = f"global_step{STEPS}"
    ours, theirs = consolidated_weights(checkpoints, final), consolidated_weights(reference / "checkpoints", final)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    state, expected_state = client_state(checkpoints, final), client_state(reference / "checkpoints", final)
    assert state["progress"] == expected_state["progress"] and state["loader"] == expected_state["loader"]
    cursor = state["loader"]["sources"][0]
    assert cursor["epoch"] == 0 and cursor["cursor"] == state["progress"]["tokens_seen"] == 4096


def test_resume_at_a_smaller_data_parallel_size(full_run, tiny_data, tmp_path):
    """A DP=2 checkpoint resumed by one process goes through DeepSpeed's universal checkpoint conversion."""
    reference, _ = full_run
    run_dir = tmp_path / "dp1"
    log = train(run_dir, tiny_overrides(tiny_data), nproc=1,
                extra=["--resume", str(reference / "checkpoints" / "global_step6")])
    assert "world 1 = tp 1 x dp 1, resuming from" in log
    assert (reference / "checkpoints" / "global_step6_universal").is_dir()
    losses, expected = train_losses(run_dir), train_losses(reference)
    assert sorted(losses) == [7, 8]
    assert [losses[7], losses[8]] == pytest.approx([expected[7], expected[8]], rel=1e-4)


def test_sigterm_saves_a_checkpoint_and_exits_0(tiny_data, tmp_path):
    """The signal reaches one rank only (as a scheduler may deliver it); both stop at the same step boundary."""
    run_dir = tmp_path / "sigterm"
    process = start(run_dir, tiny_overrides(tiny_data) + ["train.max_tokens=1000000", "checkpoint.every_steps=1000"])
    wait_for(lambda: len(train_losses(run_dir)) >= 2 or process.poll() is not None, interval=0.05)
    ranks = [p for p in psutil.Process(process.pid).children(recursive=True)
             if any(arg.startswith("--local_rank=") for arg in p.cmdline())]
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGTERM)
    code, log = finish(process, run_dir)
    assert code == 0, log[-4000:]
    assert "exiting so the job can be requeued" in log
    step = max(train_losses(run_dir))
    assert read_latest(run_dir / "checkpoints") == f"global_step{step}"
    assert (run_dir / "checkpoints" / f"global_step{step}" / "meta.json").is_file()


def test_bad_layout_fails_before_training_through_the_launcher(tiny_data, tmp_path):
    run_dir = tmp_path / "bad"
    code, log = finish(start(run_dir, tiny_overrides(tiny_data) + ["parallel.tp=3"]), run_dir)
    assert code != 0
    assert "error: " in log and "parallel.tp: must divide the world size (2), got 3" in log
    assert not run_dir.exists()


def test_init_from_starts_a_fresh_run_from_trained_weights(full_run, tiny_data, tmp_path):
    reference, _ = full_run
    weights = reference / "checkpoints" / f"global_step{STEPS}"
    run_dir = tmp_path / "init_from"
    train(run_dir, tiny_overrides(tiny_data), nproc=1, extra=["--init-from", str(weights), "--max-steps", "1"])
    first = train_losses(run_dir)[1]
    expected = train_losses(reference)
    assert first < expected[1] - 0.5  # step 1 starts from the trained weights, not a fresh init


def test_resume_from_another_model_config_is_refused_before_training(full_run, tiny_data, tmp_path, capsys):
    from pretrain.main import main

    reference, _ = full_run
    args = ["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--run-dir", str(tmp_path / "run"),
            "--resume", str(reference)]
    for override in tiny_overrides(tiny_data) + ["model.d_model=32"]:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: checkpoint ") and err.count("\n") == 1
    assert f"{reference / 'checkpoints' / 'global_step8'} was saved with a different model config " \
           f"(model.d_model: 64 -> 32)" in err
    assert not (tmp_path / "run").exists()
