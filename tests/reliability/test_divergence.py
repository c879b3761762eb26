"""A run that diverges keeps its healthy checkpoint, and `--resume auto` continues from it exactly."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from pretrain.checkpoint import LATEST, read_latest

from ..pretrain.conftest import finish, metrics, start, tiny_overrides, train, train_losses

pytestmark = pytest.mark.slow


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_divergence_keeps_the_healthy_checkpoint_and_resume_auto_continues_from_it(tmp_path: Path, synthetic_data):
    overrides = [*tiny_overrides(synthetic_data["data"]), "checkpoint.every_steps=2", "checkpoint.keep_last=1"]
    reference = tmp_path / "reference"
    train(reference, overrides, nproc=1)

    run = tmp_path / "run"
    train(run, overrides, nproc=1, extra=["--max-steps", "4"])
    healthy = digests(run / "checkpoints" / "global_step4")

    code, log = finish(start(run, [*overrides, "optimizer.lr=1e6"], nproc=1), run)
    diverged = [r for r in metrics(run) if "loss" in r and r["step"] > 4]
    assert any(not math.isfinite(r["loss"]) for r in diverged), log[-3000:]  # the fault really happened
    assert read_latest(run / "checkpoints") != "global_step4"  # unhealthy checkpoints were saved after it ...
    assert digests(run / "checkpoints" / "global_step4") == healthy  # ... and keep_last=1 did not delete it

    log = train(run, overrides, nproc=1)
    assert "--resume auto: passing over" in log and "resuming from global_step4, the newest healthy checkpoint" in log
    resumed = [r for r in metrics(run) if "loss" in r][-4:]  # the last run's steps 5..8
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    expected = train_losses(reference)
    assert {r["step"]: r["loss"] for r in resumed} == {step: expected[step] for step in (5, 6, 7, 8)}
    assert (run / "checkpoints" / LATEST).read_text().strip() == "global_step8"
