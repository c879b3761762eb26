"""pretrain/import_hf.py: HF Mamba2 -> our checkpoint (TP shards) -> export, bit-exact; upcycling into MemMamba."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from data_prep.manifest import split_prefixes
from model import build_model
from model.parallel import loss_fn
from pretrain.data import TokenStream
from model.config import MemoryConfig
from pretrain.export import export
from pretrain.import_hf import import_hf, imported_model_config, init_from, read_hf_dir
from pretrain.import_hf import main as import_main

from .conftest import CHUNK, check_in_fresh_process, tiny_config


def hf_mamba2(directory: Path, tie: bool, max_shard_size: str = "5GB", seed: int = 0, eos_token_id: int = 2
              ) -> transformers.Mamba2ForCausalLM:
    """A genuine transformers Mamba2ForCausalLM (its own random init), saved with save_pretrained."""
    cfg = tiny_config("mamba2")
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, state_size=8, head_dim=8,
        num_heads=8, expand=2, n_groups=2, conv_kernel=4, chunk_size=CHUNK, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=3)).eval()
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return model


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_hf_mamba2_import_tp2_export_is_bit_exact(cli, synthetic_data, tmp_path):
    hf_mamba2(tmp_path / "hf", tie=False, max_shard_size="40KB")  # sharded input, untied head
    cli("pretrain.import_hf", "--input", tmp_path / "hf", "--output", tmp_path / "ckpt", "--tp", "2")
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("mp_rank_*")) == ["mp_rank_00_model_states.pt",
                                                                            "mp_rank_01_model_states.pt"]
    shard = torch.load(tmp_path / "ckpt" / "mp_rank_01_model_states.pt")["module"]
    assert shard["backbone.layers.0.mixer.A_log"].shape == (4,)  # really cut in two along heads
    cli("pretrain.export", "--checkpoint", tmp_path / "ckpt", "--output", tmp_path / "back",
        "--tokenizer", synthetic_data["tokenizer"])

    original, back = safetensors_of(tmp_path / "hf"), safetensors_of(tmp_path / "back")
    assert set(original) == set(back)
    for name in original:
        assert original[name].dtype == back[name].dtype and torch.equal(original[name], back[name]), name
    config_in = json.loads((tmp_path / "hf" / "config.json").read_text())
    config_out = json.loads((tmp_path / "back" / "config.json").read_text())
    for field in ("model_type", "hidden_size", "num_hidden_layers", "state_size", "head_dim", "num_heads", "n_groups",
                  "conv_kernel", "chunk_size", "expand", "tie_word_embeddings", "vocab_size"):
        assert config_in[field] == config_out[field], field


def test_the_imported_document_reset_ends_documents_at_the_models_eos(tmp_path):
    """An HF model's eos (0 in GPT-NeoX-style vocabularies) becomes model.eod_token_id, not our tokenizers' 2."""
    hf_mamba2(tmp_path / "hf", tie=True, eos_token_id=0)
    cfg = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert cfg.reset_at_eod and cfg.eod_token_id == 0


def test_upcycled_mamba2_equals_the_original_and_trains(synthetic_data, tmp_path):
    """Mamba2 -> MemMamba with a fresh memory: the HF export computes exactly the original's logits
    (zero fusion), and one optimizer step on real data lowers the loss and moves the memory."""
    original = hf_mamba2(tmp_path / "hf", tie=True)
    (tmp_path / "memory.yaml").write_text("pool_size: 4\nnotes_per_chunk: 2\nsummary_dim: 16\nheads: 2\n"
                                          "cross_layer_every: 2\ntau1: 0.3\n")
    cfg = import_hf(tmp_path / "hf", tmp_path / "ckpt", tp=2, memory_config_path=tmp_path / "memory.yaml", seed=3)
    assert cfg.arch == "memmamba" and cfg.memory.pool_size == 4 and cfg.memory_enabled
    export(tmp_path / "ckpt", tmp_path / "upcycled", tokenizer=synthetic_data["tokenizer"])
    ids = torch.randint(3, cfg.vocab_size, (2, 3 * CHUNK + 5), generator=torch.Generator().manual_seed(0))  # no EOD
    inputs = {"ids": ids, "prompt": ids[:, :CHUNK + 3], "text": "upcycled"}
    [(report, out)] = check_in_fresh_process([(tmp_path / "upcycled", True)], inputs, tmp_path / "user")
    assert report["class"] == "MemMambaForCausalLM"
    assert any(".memory." in k for k in safetensors_of(tmp_path / "upcycled"))
    with torch.no_grad():
        assert (out["logits"] - original(ids).logits).abs().max() <= 1e-4

    # One training step from the imported weights, loaded as `pretrain/main.py --init-from` loads them
    # (the TP=2 checkpoint merged back to TP=1, before the run shards it again).
    model = build_model(cfg)
    init_from(model, tmp_path / "ckpt")
    stream = TokenStream(split_prefixes(synthetic_data["data"], "train"), seed=0, shuffle=False)
    batch = torch.from_numpy(np.stack([stream.read(0, i * 64, 65) for i in range(4)]).astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = loss_fn(model(batch[:, :-1]), batch[:, 1:])
    before.backward()
    fusion = model.backbone.layers[0].memory.token_out.weight
    assert fusion.grad.abs().sum() > 0  # the zero-initialised memory output gets a gradient
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(model(batch[:, :-1]), batch[:, 1:])
    assert torch.isfinite(after) and after < before and fusion.abs().sum() > 0

    _, hf_config, _ = read_hf_dir(tmp_path / "hf")
    other = build_model(imported_model_config("mamba2", hf_config, "x", MemoryConfig(pool_size=5, summary_dim=16,
                                                                                      heads=2)))
    with pytest.raises(ValueError, match=r"has another model: model.memory.pool_size 4 \(run: 5\); "
                                         r"model.memory.notes_per_chunk 2 \(run: 4\)"):
        init_from(other, tmp_path / "ckpt")


@pytest.mark.parametrize("setup, message", [
    ("gpt2", "config.json: unknown model_type 'gpt2', expected one of mamba2, memmamba, llama"),
    ("no-weights", "no model.safetensors or model.safetensors.index.json"),
    ("conv-bias-off", "use_conv_bias = False is not supported"),
    ("memory-on-llama", "--memory-config: only a Mamba2 model can be upcycled"),
    ("tp3", "--tp 3: tensor parallel:"),
])
def test_import_bad_input(capsys, tmp_path, setup, message):
    hf_mamba2(tmp_path / "hf", tie=True)
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    extra = []
    if setup == "gpt2":
        config["model_type"] = "gpt2"
    elif setup == "no-weights":
        (tmp_path / "hf" / "model.safetensors").unlink()
    elif setup == "conv-bias-off":
        config["use_conv_bias"] = False
    elif setup == "memory-on-llama":
        config = {**config, "model_type": "llama", "rms_norm_eps": 1e-5, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64,
                  "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}
        (tmp_path / "memory.yaml").write_text("pool_size: 4\n")
        extra = ["--memory-config", tmp_path / "memory.yaml"]
    elif setup == "tp3":
        extra = ["--tp", "3"]
    config_path.write_text(json.dumps(config))
    capsys.readouterr()  # drop save_pretrained's progress bars
    code = import_main([str(a) for a in ("--input", tmp_path / "hf", "--output", tmp_path / "out", *extra)])
    stderr = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists()
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
