"""`python -m pretrain.export` on bad input: one clear line, exit code 2, nothing overwritten."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pretrain.export import main as export_main
from pretrain.import_hf import main as import_main

from .conftest import random_model, save_as_checkpoint, tiny_config


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with one complete checkpoint (global_step1, written without ZeRO partitions)."""
    run = tmp_path / "run"
    save_as_checkpoint(random_model(tiny_config()), run / "checkpoints" / "global_step1")
    (run / "checkpoints" / "latest").write_text("global_step1\n")
    return run


def export_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = export_main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, message: str) -> None:
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_tag_selection_and_errors(capsys, run_dir, synthetic_data, tmp_path):
    tokenizer = synthetic_data["tokenizer"]
    code, stderr = export_cli(capsys, "--checkpoint", run_dir, "--tag", "global_step5", "--output", tmp_path / "o",
                              "--tokenizer", tokenizer)
    assert_one_line_error(code, stderr, "--tag global_step5: not found in")
    assert "(available: global_step1)" in stderr and not (tmp_path / "o").exists()
    code, stderr = export_cli(capsys, "--checkpoint", run_dir / "checkpoints" / "global_step1", "--tag",
                              "global_step5", "--output", tmp_path / "o", "--tokenizer", tokenizer)
    assert_one_line_error(code, stderr, "--tag global_step5: --checkpoint ")
    assert export_cli(capsys, "--checkpoint", run_dir, "--tag", "global_step1", "--output", tmp_path / "o",
                      "--tokenizer", tokenizer)[0] == 0
    assert (tmp_path / "o" / "config.json").is_file()


def test_run_without_checkpoints(capsys, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    code, stderr = export_cli(capsys, "--checkpoint", tmp_path / "run", "--output", tmp_path / "o")
    assert_one_line_error(code, stderr, "no complete checkpoint (no ")
    code, stderr = export_cli(capsys, "--checkpoint", tmp_path / "nowhere", "--output", tmp_path / "o")
    assert_one_line_error(code, stderr, "nowhere: no such directory")


@pytest.mark.parametrize("damage, message", [
    ("meta.json", "incomplete checkpoint (no meta.json; an interrupted save?)"),
    ("mp_rank_01_model_states.pt", "incomplete checkpoint: neither zero_pp_rank_0_mp_rank_01_optim_states.pt nor "
                                   "mp_rank_01_model_states.pt"),
])
def test_incomplete_checkpoint(capsys, tmp_path, damage, message):
    ckpt = save_as_checkpoint(random_model(tiny_config()), tmp_path / "global_step3", tp=2)
    (ckpt / damage).unlink()
    code, stderr = export_cli(capsys, "--checkpoint", ckpt, "--output", tmp_path / "o")
    assert_one_line_error(code, stderr, message)


def test_weights_not_matching_the_config(capsys, run_dir, tmp_path):
    config_path = run_dir / "checkpoints" / "global_step1" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"]["n_layers"] = 3
    config_path.write_text(yaml.safe_dump(config))
    code, stderr = export_cli(capsys, "--checkpoint", run_dir, "--output", tmp_path / "o")
    assert_one_line_error(code, stderr, "weights do not match the model of its config.yaml (missing ['backbone.layers.2")


def test_no_tokenizer(capsys, run_dir, tmp_path):
    code, stderr = export_cli(capsys, "--checkpoint", run_dir, "--output", tmp_path / "o")
    assert_one_line_error(code, stderr, "--tokenizer: ")
    assert "sets no data.tokenizer" in stderr and not (tmp_path / "o").exists()


def test_non_empty_output_needs_force(capsys, run_dir, synthetic_data, tmp_path):
    output = tmp_path / "hf"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    args = ("--checkpoint", run_dir, "--output", output, "--tokenizer", synthetic_data["tokenizer"])
    code, stderr = export_cli(capsys, *args)
    assert_one_line_error(code, stderr, f"--output {output}: exists and is not empty (pass --force to replace it)")
    assert [p.name for p in output.iterdir()] == ["precious.txt"]

    assert export_cli(capsys, *args, "--force")[0] == 0
    assert not (output / "precious.txt").exists()
    assert json.loads((output / "config.json").read_text())["model_type"] == "memmamba"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temp or old directory left behind
    shutil.rmtree(output)
    output.mkdir()  # an empty directory needs no --force
    assert export_cli(capsys, *args)[0] == 0


@pytest.mark.parametrize("main, expected", [(export_main, "SHA256SUMS"), (import_main, "--memory-config")])
def test_help(capsys, main, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and expected in capsys.readouterr().out
