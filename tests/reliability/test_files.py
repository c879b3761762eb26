"""Output files: readable by colleagues (the umask applies, as with a plain open) and no temp litter."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fileio import remove_stale_temps, staged_directory, write_text_atomic
from model import ModelConfig, build_model
from model.config import Mamba2Config, MemoryConfig
from pretrain.import_hf import write_checkpoint

from ..conftest import run_cli


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every file and directory under root, relative names -> mode."""
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]}


def assert_world_readable(root: Path) -> None:
    wrong = {name: oct(mode) for name, mode in modes(root).items()
             if mode != (0o755 if (root / name).is_dir() else 0o644)}
    assert not wrong, f"under umask 022 expected files 0644 and dirs 0755, got {wrong}"


def tiny_checkpoint(directory: Path) -> Path:
    cfg = ModelConfig(arch="memmamba", vocab_size=512, d_model=32, n_layers=2,
                      mamba=Mamba2Config(d_state=8, headdim=8, chunk_size=16),
                      memory=MemoryConfig(pool_size=4, notes_per_chunk=2, summary_dim=16, heads=2))
    directory.mkdir(parents=True)
    torch.manual_seed(0)
    write_checkpoint(directory, cfg, build_model(cfg).state_dict(), 1, {"imported_from": "tests"})
    return directory


@pytest.mark.slow
def test_every_output_follows_the_umask(tmp_path: Path, pg19_mini: Path, synthetic_data, umask_022):
    run_cli("tokenizer.train", "--input", f"pg19:{pg19_mini}", "--vocab-size", "400", "--output", tmp_path / "tok")
    run_cli("data_prep.prepare", "--source", "synthetic:docs=6,seed=3,words=300", "--tokenizer", tmp_path / "tok",
            "--output", tmp_path / "data")
    run_cli("pretrain.export", "--checkpoint", tiny_checkpoint(tmp_path / "ckpt"), "--tokenizer",
            synthetic_data["tokenizer"], "--output", tmp_path / "hf")
    run_cli("pretrain.import_hf", "--input", tmp_path / "hf", "--output", tmp_path / "imported")
    for name in ("tok", "data", "hf", "imported"):
        assert_world_readable(tmp_path / name)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_atomic_writes_apply_the_umask(tmp_path: Path):
    previous = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with staged_directory(tmp_path / "out") as staging:
            (staging / "f").write_text("y")
    finally:
        os.umask(previous)
    assert modes(tmp_path) == {".": stat.S_IMODE(tmp_path.stat().st_mode), "a.txt": 0o640, "out": 0o750,
                               "out/f": 0o640}


def test_stale_temps_of_dead_writers_are_removed(tmp_path: Path):
    host = socket.gethostname()
    dead = tmp_path / f".hf.tmp-{host}-{dead_pid()}-abcd1234"
    (dead / "sub").mkdir(parents=True)
    live = tmp_path / f".hf.tmp-{host}-{os.getpid()}-abcd1234"  # a writer still at work
    live.mkdir()
    other_host = tmp_path / f".hf.tmp-not-{host}-{dead_pid()}-abcd1234"  # its pid means nothing here
    other_host.mkdir()
    dead_file = tmp_path / f".hf.tmp-{host}-{dead_pid()}-zz99zz99"
    dead_file.write_text("half")
    unrelated = tmp_path / ".other.tmp-x-1-abcd1234"
    unrelated.mkdir()

    with staged_directory(tmp_path / "hf") as staging:
        (staging / "config.json").write_text("{}")

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", live.name, other_host.name, unrelated.name])
    assert remove_stale_temps(tmp_path / "hf") == []


def test_a_failed_staged_directory_leaves_nothing(tmp_path: Path):
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "hf") as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("killed mid-way")
    assert list(tmp_path.iterdir()) == []
