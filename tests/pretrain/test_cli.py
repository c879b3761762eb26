"""pretrain/main.py before training starts: --help, --dry-run, and one clear error line for each bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_prep.indexed import IndexedDataset
from model import build_model
from pretrain.config import RunConfig, load_config
from pretrain.estimate import estimate
from pretrain.main import main

from .conftest import (MAIN, REPO_ROOT, child_env, consolidated_weights, finish, metrics, start, tiny_overrides,
                       train_command)

QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_names_the_launch_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "deepspeed [--num_gpus N] pretrain/main.py --config configs/X.yaml" in out
    assert "--resume" in out and "--dry-run" in out


def test_dry_run_counts_the_real_parameters(capsys):
    code, out, _ = run_main(["--config", str(QUICKSTART), "--dry-run", "--world-size", "2"], capsys)
    assert code == 0
    model = build_model(load_config(RunConfig, QUICKSTART).model)
    real = sum(p.numel() for p in model.parameters())  # a tied weight is counted once
    assert f"parameters: {real:,} total" in out
    assert "world size 2 = tp 1 x dp 2" in out and "per-GPU memory estimate" in out


PAPER_SCALE_MEMORY = {
    "memmamba_130m_pg19": "memory reach: fifo pool of 50 notes, 4 per 256-token chunk -> 3,328 tokens: a token reads "
                          "the notes of the 13 chunks before its own (all notes of the last 12, the 2 newest of the "
                          "one before), older ones are evicted (chunks writing fewer than 4 notes make them last "
                          "longer)\n",
    "mamba2_130m_pg19": "memory: none (mamba2)\n",
    "transformer_130m_pg19": "memory: none (transformer)\n",
}


@pytest.mark.parametrize("name", ["memmamba_130m_pg19", "mamba2_130m_pg19", "transformer_130m_pg19"])
def test_dry_run_of_paper_scale_configs_runs_on_cpu(name, capsys):
    path = REPO_ROOT / "configs" / f"{name}.yaml"
    code, out, err = run_main(["--config", str(path), "--dry-run", "--world-size", "8"], capsys)
    assert code == 0, out
    assert PAPER_SCALE_MEMORY[name] in out
    # memmamba_130m evaluates at 4096 and 8192, beyond its fifo pool's 3,328 tokens: one warning line
    assert err.count("warning: ") == (name == "memmamba_130m_pg19")
    parameters = int(re.search(r"parameters: ([\d,]+) total", out).group(1).replace(",", ""))
    assert 100e6 < parameters < 140e6
    cfg = load_config(RunConfig, path)
    e = estimate(cfg, world_size=8)
    assert e.model_states_gb == pytest.approx(16 * parameters / 8 / 2**30)  # fp32 weights, grads, Adam m, v
    assert f"{e.total_gb:.2f} GB" in out
    with_tp = estimate(load_config(RunConfig, path, ["parallel.tp=2"]), world_size=8)
    assert with_tp.parameters_per_gpu < 0.6 * parameters


def test_dry_run_prints_the_memory_reach_and_warns_beyond_it():
    """The real CLI, as a user runs it: the reach line on stdout, the warning (one line, naming the keys) on stderr."""
    config = REPO_ROOT / "configs" / "repro_small.yaml"
    fifo = subprocess.run([sys.executable, str(MAIN), "--config", str(config), "--set", "model.memory.eviction=fifo",
                           "--dry-run"], capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), timeout=300)
    assert fifo.returncode == 0, fifo.stderr
    assert ("memory reach: fifo pool of 16 notes, 2 per 64-token chunk -> 512 tokens: a token reads the notes of the "
            "8 chunks before its own, older ones are evicted (chunks writing fewer than 2 notes make them last "
            "longer)\n") in fifo.stdout
    warning = [line for line in fifo.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and warning[0].startswith(
        "warning: eval.seq_lens has 1024 > model.memory reach 512 tokens (eviction fifo, pool_size 16, "
        "notes_per_chunk 2, chunk 64), as does curriculum.stages[2].seq_len 1024 (the longest training length)")


def test_dry_run_of_a_priority_pool_is_not_capped_and_does_not_warn(capsys):
    config = REPO_ROOT / "configs" / "repro_small.yaml"
    code, out, err = run_main(["--config", str(config), "--set", "model.memory.eviction=priority", "--dry-run"],
                              capsys)
    assert code == 0
    assert ("memory reach: priority pool of 16 notes -> a note stays until 16 higher-scored notes replace it "
            "(not capped by distance)\n") in out
    assert "warning" not in err
    code, out, _ = run_main(["--config", str(config), "--set", "model.memory.enabled=false", "--dry-run"], capsys)
    assert code == 0 and "memory: none (memmamba with memory.enabled false)\n" in out
    assert "documents: state, conv and memory pool reset after every EOD (token 2)\n" in out


def bad_input_cases(tiny_data: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text(yaml.safe_dump({"model": yaml.safe_load(QUICKSTART.read_text())["model"]}))
    base = ["--config", str(QUICKSTART), "--run-dir", str(tmp_path / "run"), "--set", f"data.path={tiny_data}"]
    return [
        (["--config", str(no_data)], "no_data.yaml: missing required key 'data'"),
        (base + ["--set", "train.seedd=1"], "--set train.seedd=1: unknown key 'train.seedd'"),
        (base + ["--set", "train.seed=abc"], "train.seed: expected int, got str 'abc'"),
        (base + ["--set", f"data.path={empty}"], f"{empty}/manifest.json: missing"),
        (base + ["--set", "model.vocab_size=1024"],
         "model.vocab_size is 1024 but the data in"),
        (base + ["--set", "model.eod_token_id=5"], "model.eod_token_id is 5 but the documents in"),
        (base + ["--set", "model.reset_at_eod=2"], "model.reset_at_eod: expected bool, got int 2"),
        (base + ["--set", "curriculum.stages=[{tokens: 0, seq_len: 100}]"],
         "curriculum.stages[0].seq_len: 100 is not a multiple of model.mamba.chunk_size (64)"),
        (base + ["--set", "eval.samples=400", "--set", "eval.seq_lens=[1024]"], "eval.samples: 400 samples of 1024"),
        (base + ["--resume", str(tmp_path / "nowhere")], "no complete checkpoint there"),
    ]


def test_bad_input_is_one_line_and_exit_2(tiny_data, tmp_path, capsys):
    for args, message in bad_input_cases(tiny_data, tmp_path):
        code, out, err = run_main(args, capsys)
        assert code == 2, (args, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (message, err)
        assert not (tmp_path / "run").exists()  # nothing started


def test_token_ids_past_the_vocabulary_are_caught_before_training(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = sorted((data / "train").glob("*.bin"))[0]
    tokens = np.memmap(shard, mode="r+", dtype=IndexedDataset(shard.with_suffix("")).dtype)
    tokens[5] = 600  # the quickstart vocabulary has 512 ids
    tokens.flush()
    del tokens
    code, out, err = run_main(["--config", str(QUICKSTART), "--set", f"data.path={data}",
                               "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and err == f"error: {shard}: token id 600 at position 5 >= vocab size 512\n", err
    assert not (tmp_path / "run").exists()


def test_tp_must_divide_the_world_size(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_main(["--config", str(QUICKSTART), "--set", f"data.path={tiny_data}", "--set", "parallel.tp=3",
                             "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "parallel.tp: must divide the world size (2), got 3" in err


def test_tokenizer_must_be_the_one_the_data_was_made_with(synthetic_data, tmp_path, capsys):
    other = tmp_path / "other_tokenizer"
    subprocess.run([sys.executable, "-m", "tokenizer.train", "--input", "synthetic:docs=5,seed=3", "--vocab-size",
                    "512", "--output", str(other)], check=True, capture_output=True, cwd=REPO_ROOT)
    code, _, err = run_main(["--config", str(QUICKSTART), "--set", f"data.path={synthetic_data['data']}",
                             "--set", f"data.tokenizer={other}", "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and f"data.tokenizer: {other} is not the tokenizer" in err


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_training_aborts(tiny_data, tmp_path):
    """An absurd learning rate makes the weights overflow: the NaN steps are skipped (weights unchanged),
    counted, and after train.max_consecutive_skips the run stops with exit 1, its checkpoints intact."""
    run_dir = tmp_path / "nan"
    overrides = tiny_overrides(tiny_data) + ["optimizer.lr=1e30", "optimizer.warmup_tokens=0",
                                             "train.max_consecutive_skips=2", "checkpoint.every_steps=1"]
    code, log = finish(start(run_dir, overrides, nproc=1), run_dir)
    assert code == 1, log[-3000:]
    assert "error: aborting at step 3: 2 consecutive steps had a non-finite loss or gradient norm" in log
    records = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "global_step2"  # nothing saved by the aborting step
    before, after = consolidated_weights(checkpoints, "global_step1"), consolidated_weights(checkpoints, "global_step2")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step left the weights alone
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.slow
def test_a_run_without_tensor_parallelism_never_loads_megatron(tiny_data, tmp_path):
    """megatron-core is imported only for tensor parallelism (its memory and start-up time are not needed at tp=1)."""
    args = train_command(tmp_path / "run", tiny_overrides(tiny_data) + ["train.max_tokens=1024"], nproc=1)[1:]
    script = ("import runpy, sys\n"
              f"sys.argv = {args!r}\n"
              "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
              "except SystemExit as stop:\n    assert not stop.code, stop.code\n"
              "print('megatron loaded:', any(name.startswith('megatron') for name in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "megatron loaded: False"


@pytest.mark.slow
def test_frozen_parameters_stay_as_they_are_under_zero3(tiny_data, tmp_path):
    """train.freeze through the real trainer (DeepSpeed ZeRO-3, one rank): the matched parameters keep
    their values from step to step while the others train."""
    run_dir = tmp_path / "frozen"
    overrides = tiny_overrides(tiny_data) + ['train.freeze=["*.mixer.*", "*.embeddings.*"]', "checkpoint.every_steps=1",
                                             "train.max_tokens=1024"]
    code, log = finish(start(run_dir, overrides, nproc=1), run_dir)
    assert code == 0, log[-3000:]
    checkpoints = run_dir / "checkpoints"
    before, after = consolidated_weights(checkpoints, "global_step1"), consolidated_weights(checkpoints, "global_step2")
    frozen = [k for k in before if ".mixer." in k or ".embeddings." in k]
    trained = [k for k in before if k not in frozen and ".memory." in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


@pytest.mark.slow
def test_memory_lr_scale_reaches_the_memory_through_zero3(tiny_data, tmp_path):
    """optimizer.memory_lr_scale through the real trainer (ZeRO-3, one rank): at 1e-6 the memory's
    weights move a millionth as far as at the schedule's rate, while the rest of the model trains."""
    moves = {}
    for scale in (1.0, 1e-6):
        run_dir = tmp_path / f"scale{scale}"
        overrides = tiny_overrides(tiny_data) + [f"optimizer.memory_lr_scale={scale}", "checkpoint.every_steps=1",
                                                 "train.max_tokens=1024"]
        code, log = finish(start(run_dir, overrides, nproc=1), run_dir)
        assert code == 0, log[-3000:]
        before = consolidated_weights(run_dir / "checkpoints", "global_step1")
        after = consolidated_weights(run_dir / "checkpoints", "global_step2")
        moves[scale] = {k: float((after[k] - before[k]).abs().max()) for k in before}
    memory = [k for k in moves[1.0] if ".memory." in k and moves[1.0][k] > 0]
    others = [k for k in moves[1.0] if ".memory." not in k]
    assert memory and others
    assert all(moves[1e-6][k] < 1e-3 * moves[1.0][k] for k in memory)
    assert all(moves[1e-6][k] > 0.1 * moves[1.0][k] for k in others if moves[1.0][k] > 0)
