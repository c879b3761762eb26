"""Checkpoint directory rules without DeepSpeed: the latest pointer, resume resolution, pruning, compatibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fileio import write_text_atomic
from pretrain import checkpoint


def make_tag(checkpoint_dir: Path, step: int, complete: bool = True, model: dict | None = None,
             healthy: bool | None = None) -> Path:
    path = checkpoint_dir / checkpoint.tag_for_step(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if complete:
        meta = {"step": step, "tokens_seen": 64 * step, "world_size": 2, "dp": 2, "tp": 1, "data_seed": 1}
        if healthy is not None:
            meta["healthy"] = healthy
        (path / "config.yaml").write_text(yaml.safe_dump({"model": model or {"d_model": 64, "mamba": {"chunk_size": 64}}}))
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def point_to(checkpoint_dir: Path, step: int) -> None:
    write_text_atomic(checkpoint_dir / checkpoint.LATEST, checkpoint.tag_for_step(step) + "\n")


def test_pointer_is_replaced_atomically_and_read_back(tmp_path: Path):
    make_tag(tmp_path, 3)
    make_tag(tmp_path, 6)
    point_to(tmp_path, 3)
    assert checkpoint.read_latest(tmp_path) == "global_step3"
    point_to(tmp_path, 6)
    assert checkpoint.read_latest(tmp_path) == "global_step6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3", "global_step6", "latest"]  # no temp left
    assert checkpoint.read_latest(tmp_path / "nothing") is None


def test_pointer_to_an_incomplete_checkpoint_is_an_error(tmp_path: Path):
    make_tag(tmp_path, 4, complete=False)
    point_to(tmp_path, 4)
    with pytest.raises(ValueError, match="names 'global_step4', which is not a complete checkpoint"):
        checkpoint.read_latest(tmp_path)


def test_resume_modes(tmp_path: Path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    assert checkpoint.find_resume_point("auto", checkpoints) is None  # fresh run
    assert checkpoint.find_resume_point("none", checkpoints) is None
    make_tag(checkpoints, 2)
    make_tag(checkpoints, 5)
    point_to(checkpoints, 5)
    assert checkpoint.find_resume_point("auto", checkpoints).tag == "global_step5"
    for path in (run, checkpoints):
        assert checkpoint.find_resume_point(str(path), tmp_path / "elsewhere").path == checkpoints / "global_step5"
    explicit = checkpoint.find_resume_point(str(checkpoints / "global_step2"), tmp_path / "elsewhere")
    assert explicit.tag == "global_step2" and explicit.meta["step"] == 2
    with pytest.raises(ValueError, match="already holds checkpoints; resume with --resume auto"):
        checkpoint.find_resume_point("none", checkpoints)
    with pytest.raises(ValueError, match="no complete checkpoint there"):
        checkpoint.find_resume_point(str(tmp_path / "missing"), checkpoints)


def test_leftovers_of_a_killed_save_are_removed(tmp_path: Path):
    make_tag(tmp_path, 3)
    point_to(tmp_path, 3)
    partial = make_tag(tmp_path, 6, complete=False)
    scratch = tmp_path / ".global_step3_universal.tmp"
    scratch.mkdir()
    assert sorted(checkpoint.remove_incomplete(tmp_path)) == sorted([partial, scratch])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3", "latest"]


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path: Path):
    for step in (1, 2, 3, 4):
        make_tag(tmp_path, step)
    (tmp_path / "global_step2_universal").mkdir()
    point_to(tmp_path, 4)
    checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3", "global_step4", "latest"]


def test_prune_never_deletes_the_newest_healthy_checkpoint(tmp_path: Path):
    make_tag(tmp_path, 2, healthy=True)
    make_tag(tmp_path, 4)  # written before the health rule: counts as healthy
    for step in (6, 8, 10):
        make_tag(tmp_path, step, healthy=False)
    point_to(tmp_path, 10)
    checkpoint.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step4", "latest"]


def test_resume_auto_passes_over_unhealthy_checkpoints(tmp_path: Path):
    make_tag(tmp_path, 2, healthy=True)
    make_tag(tmp_path, 4, healthy=True)
    make_tag(tmp_path, 6, healthy=False)
    make_tag(tmp_path, 8, healthy=False)
    point_to(tmp_path, 8)
    point = checkpoint.find_resume_point("auto", tmp_path)
    assert (point.tag, point.passed_over) == ("global_step4", ("global_step6", "global_step8"))
    checkpoint.rewind_latest(point)
    removed = checkpoint.remove_incomplete(tmp_path)
    assert sorted(p.name for p in removed) == ["global_step6", "global_step8"]
    assert checkpoint.find_resume_point("auto", tmp_path).passed_over == ()
    explicit = checkpoint.find_resume_point(str(tmp_path / "global_step4"), tmp_path)
    assert explicit.passed_over == ()


def test_resume_auto_with_no_healthy_checkpoint_is_refused(tmp_path: Path):
    make_tag(tmp_path, 3, healthy=False)
    point_to(tmp_path, 3)
    with pytest.raises(ValueError, match=r"every checkpoint in .* \(global_step3\) was saved during a non-finite"):
        checkpoint.find_resume_point("auto", tmp_path)


def test_resume_from_another_model_config_is_refused(tmp_path: Path):
    make_tag(tmp_path, 3, model={"d_model": 64, "mamba": {"chunk_size": 64}})
    point = checkpoint.find_resume_point(str(tmp_path / "global_step3"), tmp_path)
    checkpoint.check_compatible(point, {"d_model": 64, "mamba": {"chunk_size": 64}}, data_seed=1)
    with pytest.raises(ValueError) as info:
        checkpoint.check_compatible(point, {"d_model": 128, "mamba": {"chunk_size": 32}}, data_seed=1)
    assert "saved with a different model config (model.d_model: 64 -> 128; model.mamba.chunk_size: 64 -> 32)" \
        in str(info.value)
    with pytest.raises(ValueError, match="saved with data.seed 1, the config says 9"):
        checkpoint.check_compatible(point, {"d_model": 64, "mamba": {"chunk_size": 64}}, data_seed=9)
