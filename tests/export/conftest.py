"""Fixtures of the export tests: tiny models, real 2-process training runs, and an isolated Python.

`run_isolated` runs code in a fresh interpreter where this project cannot be imported (cwd
outside the repo, no PYTHONPATH, the editable-install finder removed, checked with find_spec),
with its own HF cache: exactly what a user of an exported directory has.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model import ModelConfig, build_model
from model.config import Mamba2Config, MemoryConfig, TransformerConfig
from pretrain.import_hf import write_checkpoint
REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNK = 16
NEW_TOKENS = 32
"""Tokens generate() produces in the fresh-interpreter checks."""

ISOLATION = """
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in repr(h)]
sys.path = [p for p in sys.path if "editable" not in p]
sys.path_importer_cache.clear()
for name in ("model", "pretrain", "tokenizer", "data_prep"):
    assert importlib.util.find_spec(name) is None, f"the project package {name!r} is importable"
"""


def tiny_config(arch: str = "memmamba", vocab_size: int = 512) -> ModelConfig:
    """Two layers, chunks of 16 tokens, a 4-note pool, cross-layer attention in layer 1."""
    return ModelConfig(
        arch=arch, vocab_size=vocab_size, d_model=32, n_layers=2,
        mamba=Mamba2Config(d_state=8, headdim=8, expand=2, ngroups=2, chunk_size=CHUNK),
        memory=MemoryConfig(pool_size=4, notes_per_chunk=2, summary_dim=16, heads=2, pool_window=3,
                            cross_layer_every=2, tau1=0.3),
        transformer=TransformerConfig(n_heads=4, n_kv_heads=2, ffn_hidden=48, rope_theta=500.0, max_seq_len=256),
    )


@torch.no_grad()
def random_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A model whose every parameter (the zero-initialised memory fusion too) is random and matters."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    for name, param in model.named_parameters():
        if "norm" in name or name.endswith(("A_log", "D", "dt_bias")):
            continue
        param.copy_(torch.randn_like(param) * (0.4 if ".memory." in name else 0.2))
    return model


def save_as_checkpoint(model: torch.nn.Module, directory: Path, tp: int = 1) -> Path:
    """Write a model as a checkpoint without ZeRO partitions (the import_hf layout)."""
    directory.mkdir(parents=True)
    write_checkpoint(directory, model.config, model.state_dict(), tp, {"imported_from": "tests"})
    return directory


@torch.no_grad()
def memory_effect(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """How much the logits change when the memory's output projections are zeroed."""
    without = copy.deepcopy(model)
    for name, param in without.named_parameters():
        if name.endswith(("token_out.weight", "layer_out.weight")):
            param.zero_()
    return (model(ids) - without(ids)).abs().max().item()


def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Our own decode loop: prefill, then argmax + step; (B, new_tokens)."""
    cache = model.allocate_cache(prompt.shape[0])
    logits = model.prefill(prompt, cache)[:, -1]
    tokens = []
    for _ in range(new_tokens):
        tokens.append(logits.argmax(-1))
        logits = model.step(tokens[-1], cache)
    return torch.stack(tokens, 1)


def run_isolated(code: str, cwd: Path, *args: str, timeout: float = 300):
    """Run ``code`` (after the isolation preamble) in a fresh interpreter; returns the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(cwd / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    script = ISOLATION + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise AssertionError(f"isolated python failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(run_dir: Path, data: dict[str, Path], tp: int, steps: int = 2) -> Path:
    """A real `pretrain/main.py` run on 2 gloo processes (dp = 2 / tp), a checkpoint after every step.

    The learning rate is high so that 2 steps move the zero-initialised memory fusion far enough
    for the memory to change the logits visibly.
    """
    cfg = tiny_config()
    config = {
        "model": {"arch": "memmamba", "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                  "mamba": vars(cfg.mamba), "memory": vars(cfg.memory)},
        "data": {"path": str(data["data"]), "tokenizer": str(data["tokenizer"])},
        "train": {"max_tokens": 10**6, "global_batch_size": 4, "micro_batch_size": 2},
        "curriculum": {"stages": [{"tokens": 0, "seq_len": 4 * CHUNK}]},
        "optimizer": {"lr": 0.05, "min_lr": 0.05, "decay": "constant", "warmup_tokens": 0},
        "parallel": {"tp": tp},
        "checkpoint": {"every_steps": 1, "keep_last": 3},
        "logging": {"every_steps": 1, "progress_bar": False},
        "eval": {"every_steps": 0, "seq_lens": [4 * CHUNK], "samples": 2},
    }
    run_dir.mkdir(parents=True)
    config_path = run_dir.parent / f"{run_dir.name}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "pretrain/main.py", "--config", str(config_path), "--run-dir", str(run_dir),
               "--max-steps", str(steps)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"training run failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return run_dir


@pytest.fixture(scope="session")
def run_dp2(synthetic_data, tmp_path_factory) -> Path:
    """Run directory of 2 steps trained with DP=2, TP=1 (checkpoints global_step1, global_step2)."""
    return train_run(tmp_path_factory.mktemp("dp2") / "run", synthetic_data, tp=1)


@pytest.fixture(scope="session")
def run_tp2(synthetic_data, tmp_path_factory) -> Path:
    """Run directory of 2 steps trained with DP=1, TP=2."""
    return train_run(tmp_path_factory.mktemp("tp2") / "run", synthetic_data, tp=2)


def check_in_fresh_process(checks: list[tuple[Path, bool]], inputs: dict, workdir: Path
                           ) -> list[tuple[dict, dict]]:
    """Run tests/export/hf_check.py in one isolated interpreter over (HF dir, remote?) pairs;
    returns per pair (its JSON report, its outputs_i.pt)."""
    from .hf_check import CODE

    workdir.mkdir(parents=True, exist_ok=True)
    torch.save({**inputs, "new_tokens": NEW_TOKENS}, workdir / "inputs.pt")
    args = [arg for hf_dir, remote in checks for arg in (str(hf_dir), "remote" if remote else "native")]
    reports = run_isolated(CODE, workdir, *args)
    return [(report, torch.load(workdir / f"outputs_{i}.pt")) for i, report in enumerate(reports)]
