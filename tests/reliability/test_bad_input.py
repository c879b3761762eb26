"""Bad files and values: one `error:` line naming the file or key, a non-zero exit, and nothing touched.

Each case builds its bad input from good fixtures, runs the real CLI, and checks the message.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model import ModelConfig, build_model
from model.config import Mamba2Config, MemoryConfig
from pretrain.import_hf import write_checkpoint

from ..conftest import PG19_MINI, REPO_ROOT, run_cli
from ..pretrain.conftest import MAIN, child_env, tiny_overrides, train


def truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def pretrain_args(config_overrides: list[str], *extra: str | Path) -> list[str]:
    args = [str(MAIN), "--config", str(REPO_ROOT / "configs" / "quickstart.yaml")]
    for override in config_overrides:
        args += ["--set", override]
    return [*args, *map(str, extra)]


@pytest.fixture(scope="module")
def world(tmp_path_factory, synthetic_data) -> dict[str, Path]:
    """Good inputs to spoil: a tokenizer, a dataset, a trained run, a bare checkpoint and its HF export."""
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    train(run, tiny_overrides(synthetic_data["data"]), nproc=1, extra=["--max-steps", "2"])
    cfg = ModelConfig(arch="memmamba", vocab_size=512, d_model=32, n_layers=2,
                      mamba=Mamba2Config(d_state=8, headdim=8, chunk_size=16),
                      memory=MemoryConfig(pool_size=4, notes_per_chunk=2, summary_dim=16, heads=2))
    (root / "ckpt").mkdir()
    torch.manual_seed(0)
    write_checkpoint(root / "ckpt", cfg, build_model(cfg).state_dict(), 1, {"imported_from": "tests"})
    run_cli("pretrain.export", "--checkpoint", root / "ckpt", "--tokenizer", synthetic_data["tokenizer"],
            "--output", root / "hf")
    return {"root": root, "run": run, "ckpt": root / "ckpt", "hf": root / "hf", **synthetic_data}


def copy(world: dict[str, Path], name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(world[name], target)
    return target


def latest_tag(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


# Each case: (world, tmp_path) -> (argv after `python`, text the error line must contain).
Case = Callable[[dict[str, Path], Path], tuple[list[str], str]]


def truncated_tokenizer_model(world, tmp):
    tok = copy(world, "tokenizer", tmp)
    truncate(tok / "tokenizer.model")
    return (["-m", "data_prep.prepare", "--source", "synthetic:docs=4", "--tokenizer", tok, "--output", tmp / "out"],
            f"{tok / 'tokenizer.model'}: not a SentencePiece model")


def tokenizer_config_not_json(world, tmp):
    tok = copy(world, "tokenizer", tmp)
    (tok / "tokenizer_config.json").write_text("{vocab")
    return (["-m", "data_prep.prepare", "--source", "synthetic:docs=4", "--tokenizer", tok, "--output", tmp / "out"],
            f"{tok / 'tokenizer_config.json'}: not valid JSON")


def tokenizer_config_not_utf8(world, tmp):
    tok = copy(world, "tokenizer", tmp)
    (tok / "tokenizer_config.json").write_bytes(b'\xff{"vocab_size": 512}')
    return (["-m", "data_prep.prepare", "--source", "synthetic:docs=4", "--tokenizer", tok, "--output", tmp / "out"],
            f"{tok / 'tokenizer_config.json'}: not UTF-8")


def prepare_output_is_a_file(world, tmp):
    (tmp / "out").write_text("mine")
    return (["-m", "data_prep.prepare", "--source", "synthetic:docs=4", "--tokenizer", world["tokenizer"],
             "--output", tmp / "out"], f"--output {tmp / 'out'}: is a file")


def prepare_zero_workers(world, tmp):
    return (["-m", "data_prep.prepare", "--source", "synthetic:docs=4", "--tokenizer", world["tokenizer"],
             "--output", tmp / "out", "--workers", "0"], "--workers: expected >= 1")


def prepare_negative_workers(world, tmp):
    return (["-m", "data_prep.prepare", "--source", "synthetic:docs=4", "--tokenizer", world["tokenizer"],
             "--output", tmp / "out", "--workers", "-1"], "--workers: expected >= 1")


def empty_metadata_csv(world, tmp):
    pg19 = tmp / "pg19"
    shutil.copytree(PG19_MINI, pg19)
    (pg19 / "metadata.csv").write_bytes(b"")
    return (["-m", "data_prep.prepare", "--source", f"pg19:{pg19}", "--tokenizer", world["tokenizer"],
             "--output", tmp / "out"], f"{pg19 / 'metadata.csv'}: empty")


def tokenizer_zero_threads(world, tmp):
    return (["-m", "tokenizer.train", "--input", "synthetic:docs=4", "--vocab-size", "300", "--output", tmp / "tok",
             "--threads", "0"], "--threads: expected 1..1024")


def verify_manifest_missing_a_key(world, tmp):
    data = copy(world, "data", tmp)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["dtype"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    return ["-m", "data_prep.verify", data], f"{data / 'manifest.json'}: missing key(s) dtype"


def verify_shard_entry_missing_a_key(world, tmp):
    data = copy(world, "data", tmp)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["bin_sha256"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    return ["-m", "data_prep.verify", data], f"{data / 'manifest.json'}: malformed entry (KeyError: 'bin_sha256')"


def resume_meta_empty(world, tmp):
    run = copy(world, "run", tmp)
    (latest_tag(run) / "meta.json").write_text("{}")
    return (pretrain_args(tiny_overrides(world["data"]), "--run-dir", run),
            f"{latest_tag(run) / 'meta.json'}: not a checkpoint's metadata (missing step")


def resume_meta_not_utf8(world, tmp):
    run = copy(world, "run", tmp)
    (latest_tag(run) / "meta.json").write_bytes(b"\xfe\xff")
    return pretrain_args(tiny_overrides(world["data"]), "--run-dir", run), f"{latest_tag(run) / 'meta.json'}: not UTF-8"


def resume_garbage_model_states(world, tmp):
    run = copy(world, "run", tmp)
    for states in latest_tag(run).glob("*model_states.pt"):
        states.write_bytes(b"not a torch file" * 100)
    return pretrain_args(tiny_overrides(world["data"]), "--run-dir", run), f"{latest_tag(run)}: unreadable"


def resume_on_other_data(world, tmp):
    run = copy(world, "run", tmp)
    other = tmp / "other"
    run_cli("data_prep.prepare", "--source", "synthetic:docs=40,seed=8,words=1500", "--tokenizer", world["tokenizer"],
            "--output", other)
    return (pretrain_args(tiny_overrides(other), "--run-dir", run),
            f"--resume: checkpoint {latest_tag(run)} was trained on other data ({world['data']} there, {other} now")


def negative_max_steps(world, tmp):
    return pretrain_args(tiny_overrides(world["data"]), "--run-dir", tmp / "run", "--max-steps", "-5"), \
        "--max-steps: expected >= 1, got -5"


def set_value_named_as_set(world, tmp):
    return (pretrain_args([*tiny_overrides(world["data"]), "model.d_model=-4"], "--run-dir", tmp / "run"),
            "quickstart.yaml with --set model.d_model=-4: invalid config: model.d_model: must be a positive integer")


def export_truncated_model_states(world, tmp):
    ckpt = copy(world, "ckpt", tmp)
    truncate(next(ckpt.glob("*model_states.pt")))
    return (["-m", "pretrain.export", "--checkpoint", ckpt, "--tokenizer", world["tokenizer"], "--output", tmp / "hf"],
            f"{next(ckpt.glob('*model_states.pt'))}: unreadable")


def export_meta_not_json(world, tmp):
    ckpt = copy(world, "ckpt", tmp)
    (ckpt / "meta.json").write_text("{step")
    return (["-m", "pretrain.export", "--checkpoint", ckpt, "--tokenizer", world["tokenizer"], "--output", tmp / "hf"],
            f"{ckpt / 'meta.json'}: not valid JSON")


def import_truncated_safetensors(world, tmp):
    hf = copy(world, "hf", tmp)
    truncate(hf / "model.safetensors", 5000)
    return (["-m", "pretrain.import_hf", "--input", hf, "--output", tmp / "imported"],
            f"{hf / 'model.safetensors'}: unreadable safetensors file")


def import_config_not_json(world, tmp):
    hf = copy(world, "hf", tmp)
    (hf / "config.json").write_text("{model_type")
    return (["-m", "pretrain.import_hf", "--input", hf, "--output", tmp / "imported"],
            f"{hf / 'config.json'}: not valid JSON")


def generate_truncated_safetensors(world, tmp):
    hf = copy(world, "hf", tmp)
    truncate(hf / "model.safetensors", 5000)
    return (["-m", "model.hf.generate", "--model", hf, "--prompt", "Once"],
            f"--model {hf}: unreadable weights (a truncated safetensors file?")


def generate_missing_tokenizer_json(world, tmp):
    hf = copy(world, "hf", tmp)
    (hf / "tokenizer.json").unlink()
    return ["-m", "model.hf.generate", "--model", hf, "--prompt", "Once"], f"--model {hf}: no tokenizer.json"


CASES: list[Case] = [
    truncated_tokenizer_model, tokenizer_config_not_json, tokenizer_config_not_utf8, prepare_output_is_a_file,
    prepare_zero_workers, prepare_negative_workers, empty_metadata_csv, tokenizer_zero_threads,
    verify_manifest_missing_a_key, verify_shard_entry_missing_a_key, resume_meta_empty, resume_meta_not_utf8,
    resume_garbage_model_states, resume_on_other_data, negative_max_steps, set_value_named_as_set,
    export_truncated_model_states, export_meta_not_json, import_truncated_safetensors, import_config_not_json,
    generate_truncated_safetensors, generate_missing_tokenizer_json,
]


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_gets_one_line(case: Case, world, tmp_path: Path):
    argv, expected = case(world, tmp_path)
    before = digests(tmp_path)
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO_ROOT, env=child_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in errors[0], errors[0]
    assert digests(tmp_path) == before  # nothing written, nothing half-written, nothing lost


def test_vocab_size_beyond_the_corpus_says_what_was_produced(tmp_path: Path):
    result = run_cli("tokenizer.train", "--input", "synthetic:docs=4,words=300", "--vocab-size", "1000000",
                     "--output", tmp_path / "tok")
    produced = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["vocab_size"]
    assert produced < 1000000
    assert (f"warning: --vocab-size 1000000: the corpus yields only {produced} pieces; the tokenizer has {produced}"
            in result.stderr)


def test_allow_new_data_resumes_on_other_data(world, tmp_path: Path):
    run = copy(world, "run", tmp_path)
    other = tmp_path / "other"
    run_cli("data_prep.prepare", "--source", "synthetic:docs=40,seed=8,words=1500", "--tokenizer", world["tokenizer"],
            "--output", other)
    result = subprocess.run([sys.executable, *pretrain_args(tiny_overrides(other), "--run-dir", run, "--max-steps", "3",
                                                            "--allow-new-data")],
                            cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "done: step 3" in result.stdout
