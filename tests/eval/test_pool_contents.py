"""benchmarks.pool_contents: what the note pools hold after a passkey prompt. A fifo pool of the last
four chunks' every token holds the needle when it stands right before the question, and has
evicted it when it stands at the start of a long prompt."""

import dataclasses

import torch

from benchmarks.pool_contents import inspect, main
from model import build_model
from pretrain.evaluate import LoadedModel, load_tokenizer

from .conftest import CHUNK, tiny_config


def loaded_memmamba(tokenizer_dir, **memory) -> LoadedModel:
    cfg = tiny_config("memmamba", vocab_size=512)
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **memory))
    torch.manual_seed(0)
    return LoadedModel(build_model(cfg).eval(), load_tokenizer(tokenizer_dir), "checkpoint", "tiny")


def test_fifo_pool_keeps_only_the_last_chunks(synthetic_data):
    # Every token of a chunk becomes a note (tau1 0): the pool is exactly the last 4 chunks' tokens.
    loaded = loaded_memmamba(synthetic_data["tokenizer"], eviction="fifo", notes_per_chunk=CHUNK,
                             pool_size=4 * CHUNK, tau1=0.0)
    result = inspect(loaded, [512], [0.0, 1.0], trials=1)
    assert len(result["layers"]) == 2
    for layer in result["layers"]:  # one prompt per depth: depth 0 evicted, depth 1 kept
        assert layer["kept"] == {"512": 0.5}


def test_cli_rejects_a_model_without_memory(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("pool_contents: ")
