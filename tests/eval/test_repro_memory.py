"""benchmarks.repro_memory --quick end to end: data, seven rows of two chained real training runs
(copies warm-up, then needles from its weights), passkey evaluation, results in the shape outside
checks read. A plumbing check: no accuracy is asserted."""

import json
from pathlib import Path

import pytest

from benchmarks.repro_memory import RUNS, SIZE_TOLERANCE, ZEROED

from ..conftest import run_cli


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
        assert run["tokens"] >= 4096 + 16384, name  # both stages trained
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
    for name in RUNS:  # every needles stage started from its own warm-up's weights
        assert f"weights initialised from {tmp_path / 'out' / 'runs' / name / 'warmup'}\n" in result.stdout, name
    assert results["runs"][ZEROED]["tokens"] == results["runs"]["memmamba"]["tokens"]
    assert (results_dir / "passkey.png").stat().st_size > 0 and (results_dir / "recall.png").stat().st_size > 0
    assert "| memmamba-memory-zeroed |" in (results_dir / "summary.md").read_text()
