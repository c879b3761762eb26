"""benchmarks.repro_memory --quick end to end: data, eight rows of three chained real training runs
(copies warm-up, then two needles passes, each from the previous weights), two rows side by side,
passkey evaluation, results in the shape outside checks read. A plumbing check: no accuracy is
asserted. And the check that keeps a stage trained with another config from being reused."""

import json
from pathlib import Path

import pytest

from benchmarks.repro_memory import QUICK_TOKENS, RUNS, SIZE_TOLERANCE, ZEROED, check_reused
from pretrain.config import RunConfig, load_config, save_config

from ..conftest import REPO_ROOT, run_cli


@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path: Path):
    results_dir = tmp_path / "results"
    result = run_cli("benchmarks.repro_memory", "--quick", "--output", tmp_path / "out", "--results", results_dir,
            timeout=900)
    results = json.loads((results_dir / "results.json").read_text())
    assert results["train_seq_len"] == 256
    assert set(results["runs"]) == {*RUNS, ZEROED}
    reference = results["runs"]["memmamba"]["parameters"]
    for name, run in results["runs"].items():
        assert run["tokens"] >= sum(QUICK_TOKENS.values()), name  # every stage trained
        passkey = run["passkey"]
        assert passkey["lengths"] == [256, 1024] and passkey["depths"] == [0.0, 1.0] and passkey["trials"] == 2
        assert all(0.0 <= a <= 1.0 for row in passkey["accuracy"] for a in row)
        assert set(passkey["mean"]) == {"256", "1024"}
        recall = run["recall"]
        assert recall["documents"] == 4 and recall["answers"] == 8 and 0.0 <= recall["accuracy"] <= 1.0  # passkey + fact
        if name in ("mamba2", "transformer"):
            assert abs(run["parameters"] / reference - 1) <= SIZE_TOLERANCE
    assert results["runs"]["transformer"]["arch"] == "transformer"
    assert results["warmup_source"].startswith("copies:")
    for name in RUNS:  # every needles stage started from the previous stage's weights
        runs = tmp_path / "out" / "runs" / name
        log = (runs / "train.log").read_text()
        assert f"weights initialised from {runs / 'copies'}\n" in log and f"weights initialised from {runs / 'needles'}\n" in log
    assert "train.log" in result.stdout
    assert results["runs"][ZEROED]["tokens"] == results["runs"]["memmamba"]["tokens"]
    assert (results_dir / "passkey.png").stat().st_size > 0 and (results_dir / "recall.png").stat().st_size > 0
    assert "| memmamba-memory-zeroed |" in (results_dir / "summary.md").read_text()


def test_a_stage_trained_with_another_config_is_not_reused(tmp_path: Path):
    config = REPO_ROOT / "configs" / "repro_memory.yaml"
    save_config(load_config(RunConfig, config, ["model.arch=mamba2", "train.seed=7"]), tmp_path / "config.yaml")
    check_reused(tmp_path, ["model.arch=mamba2", "train.seed=7", "model.memory.pool_size=4"], config)  # unused by mamba2
    with pytest.raises(SystemExit, match=r"other values of train\.seed: delete that run directory"):
        check_reused(tmp_path, ["model.arch=mamba2"], config)
    with pytest.raises(SystemExit, match=r"other values of model\.n_layers"):
        check_reused(tmp_path, ["model.arch=mamba2", "train.seed=7", "model.n_layers=2"], config)
