"""Training on a weighted blend of two prepared datasets: per-source tokens logged, exact resume, bad blends."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.checkpoint import read_latest

from ..conftest import run_cli
from .conftest import REPO_ROOT, metrics, tiny_overrides, train, train_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def second_dataset(synthetic_data, tmp_path_factory) -> Path:
    """Another corpus made with the same tokenizer."""
    out = tmp_path_factory.mktemp("second") / "needles"
    run_cli("data_prep.prepare", "--source", "needles:docs=60,words=300", "--tokenizer", synthetic_data["tokenizer"],
            "--output", out)
    return out


def blend_overrides(first: Path, second: Path) -> list[str]:
    return [*tiny_overrides(first)[1:], "data.path=null",
            f"data.blend=[{{path: {first}, weight: 3}}, {{path: {second}, weight: 1}}]"]


def test_blend_logs_tokens_per_source_and_resumes_exactly(synthetic_data, second_dataset, tmp_path):
    overrides = blend_overrides(synthetic_data["data"], second_dataset)
    reference = tmp_path / "reference"
    train(reference, overrides, nproc=1)
    records = [r for r in metrics(reference) if "loss" in r]
    first, second = f"data/tokens/{synthetic_data['data'].name}", f"data/tokens/{second_dataset.name}"
    final = records[-1]
    assert final[first] + final[second] == final["tokens"] == 4096
    assert final[first] == 3 * final[second]  # 3 : 1 of the samples, every step (8 samples of one length)

    run = tmp_path / "run"
    train(run, overrides, nproc=1, extra=["--max-steps", "5"])
    log = train(run, overrides, nproc=1)
    assert "resuming from" in log and read_latest(run / "checkpoints") == "global_step8"
    assert train_losses(run) == train_losses(reference)  # bitwise, across the resume


@pytest.mark.parametrize("change, message", [
    (lambda first, second: [f"data.blend=[{{path: {first}, weight: 1}}, {{path: {second}, weight: 0}}]"],
     "data.blend[1].weight: must be > 0, got 0"),
    (lambda first, second: [f"data.blend=[{{path: {first}, weight: 1}}]", f"data.path={first}"],
     "data.path: set exactly one of data.path and data.blend"),
])
def test_bad_blends_are_one_line_and_exit_2(change, message, synthetic_data, second_dataset, tmp_path, capsys):
    from pretrain.main import main

    args = ["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--run-dir", str(tmp_path / "run")]
    for override in [*blend_overrides(synthetic_data["data"], second_dataset),
                     *change(synthetic_data["data"], second_dataset)]:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_blend_source_with_another_tokenizer_is_refused(synthetic_data, tmp_path, capsys):
    from pretrain.main import main

    other, tokenizer = tmp_path / "other", tmp_path / "tokenizer"  # the same vocabulary size, other pieces
    run_cli("tokenizer.train", "--input", "needles:docs=40,words=300", "--vocab-size", "512", "--output", tokenizer)
    run_cli("data_prep.prepare", "--source", "needles:docs=40,words=300", "--tokenizer", tokenizer, "--output", other)
    args = ["--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--run-dir", str(tmp_path / "run")]
    for override in blend_overrides(synthetic_data["data"], other):
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"data.blend[1].path: {other} was made with another tokenizer than data.blend[0].path" in err, err
    assert err.count("\n") == 1
    refused = run_cli("data_prep.verify", synthetic_data["data"], other, check=False)
    assert refused.returncode == 1
    assert f"error: {other / 'manifest.json'}: made with another tokenizer than {synthetic_data['data']}" in refused.stderr


def test_verify_takes_every_source_of_a_blend(synthetic_data, second_dataset):
    verified = run_cli("data_prep.verify", synthetic_data["data"], second_dataset)
    assert [line.split(":")[0] for line in verified.stdout.splitlines()] == ["OK", "OK"]
    assert str(second_dataset) in verified.stdout.splitlines()[1]
