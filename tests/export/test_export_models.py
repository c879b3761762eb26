"""Exports of tiny random models (no training): MemMamba as remote code, Mamba2 and Llama natively.

All HF directories are loaded in one fresh interpreter where this project is not importable
(conftest.run_isolated), as a user would load them.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from model.hf.generate import main as generate_main
from pretrain.export import export
from tokenizer import Tokenizer

from .conftest import (CHUNK, NEW_TOKENS, check_in_fresh_process, greedy_decode, memory_effect, random_model,
                       save_as_checkpoint, tiny_config)

EOD = 2  # the tokenizers' fixed end-of-document id, model.eod_token_id's default

KINDS = {"memmamba": ("memmamba", True), "mamba2": ("mamba2", True), "memmamba-off": ("memmamba", False),
         "transformer": ("transformer", True)}
"""name -> (arch, memory.enabled)"""


def user_inputs(vocab_size: int, seed: int = 1) -> dict:
    """One document per row (ids 3.., no EOD: native HF models do not reset at one), and packed rows."""
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(3, vocab_size, (2, 4 * CHUNK + 5), generator=gen)
    packed[0, CHUNK + 2], packed[1, 2 * CHUNK - 1] = EOD, EOD  # inside a chunk; at a chunk's end
    # Left padding: row 1 holds 13 tokens after 22 pads (more than a chunk of them), row 0 none.
    padded_ids = torch.randint(3, vocab_size, (2, 2 * CHUNK + 3), generator=gen)
    padded_mask = torch.ones_like(padded_ids)
    padded_mask[1, :22] = 0
    padded_ids[1, :22] = 3  # the pad id
    return {"padded_ids": padded_ids, "padded_mask": padded_mask,
            "ids": torch.randint(3, vocab_size, (2, 3 * CHUNK + 5), generator=gen),  # ragged last chunk
            "prompt": torch.randint(3, vocab_size, (2, 2 * CHUNK + 3), generator=gen),  # decoding crosses chunk ends
            "packed": packed,
            "text": "Fact 7: the key is 31337.  Indented\n\n\tand unicode: café 🎉"}


@pytest.fixture(scope="module")
def exported(synthetic_data, tmp_path_factory) -> dict:
    """Each kind of tiny random model, exported and then used in one fresh interpreter.

    Returns {kind: (model, hf_dir, report, outputs)} plus "inputs".
    """
    root = tmp_path_factory.mktemp("exported")
    models, checks = {}, []
    for kind, (arch, memory) in KINDS.items():
        cfg = tiny_config(arch)
        cfg.memory.enabled = memory
        models[kind] = random_model(cfg)
        hf_dir = root / kind
        # Natives are sharded (a 40KB limit) to cover the index; MemMamba stays one file.
        export(save_as_checkpoint(models[kind], root / f"{kind}-ckpt"), hf_dir, tokenizer=synthetic_data["tokenizer"],
               max_shard_size="5GB" if kind == "memmamba" else "40KB")
        checks.append((hf_dir, kind == "memmamba"))
    inputs = user_inputs(tiny_config().vocab_size)
    results = check_in_fresh_process(checks, inputs, root / "user")
    return {"inputs": inputs, "root": root, **{kind: (models[kind], hf_dir, *result) for kind, (hf_dir, _), result
                                               in zip(KINDS, checks, results)}}


def test_memmamba_remote_code_matches_our_model_and_generates_with_its_cache(exported, synthetic_data):
    model, hf_dir, report, out = exported["memmamba"]
    inputs = exported["inputs"]
    files = {p.name for p in hf_dir.iterdir()}
    assert {"modeling_memmamba.py", "configuration_memmamba.py", "mapping.py", "memmamba.py", "config.py",
            "model.safetensors", "tokenizer.json", "README.md", "SHA256SUMS"} <= files
    assert report["class"] == "MemMambaForCausalLM" and report["module"].startswith("transformers_modules.")
    assert report["module_file"].startswith(str(exported["root"] / "user" / "hf_home"))  # the copy, not the repo
    assert memory_effect(model, inputs["ids"]) > 1e-2  # so the comparison below covers the memory
    with torch.no_grad():
        assert (out["logits"] - model(inputs["ids"])).abs().max() <= 1e-4
        # Packed rows: the remote code resets at EOD like our model (the document after it as if alone).
        packed = inputs["packed"]
        assert (out["packed_logits"] - model(packed)).abs().max() <= 1e-4
        second = packed[0, CHUNK + 3:]
        assert (out["packed_logits"][0, CHUNK + 3:] - model(second[None])[0]).abs().max() <= 1e-4
    assert torch.equal(out["generated"], greedy_decode(model, inputs["prompt"], NEW_TOKENS))
    # The cache: one prefill over the prompt, then one token per call into one cache object
    # whose size never changes (O(1) memory per token).
    assert [n for n, _ in report["calls"]] == [inputs["prompt"].shape[1]] + [1] * (NEW_TOKENS - 1)
    assert len({nbytes for _, nbytes in report["calls"]}) == 1 and report["one_cache_object"]
    assert report["tokenizer_class"] == "TokenizersBackend" and report["resaved_equal"]
    assert report["text_ids"] == Tokenizer(synthetic_data["tokenizer"]).encode(inputs["text"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_left_padded_batch_equals_each_prompt_alone(exported, kind):
    """Batched generate() and lm-eval pad prompts on the left: the real positions of each row get the
    logits and the greedy continuation of that prompt alone (our remote code resets after the padding
    as after an EOD; the native classes through transformers' own masking)."""
    _, _, _, out = exported[kind]
    padded, mask = out["padded"], exported["inputs"]["padded_mask"].bool()
    for row in range(2):
        assert (padded["logits"][row, mask[row]] - padded["alone_logits"][row]).abs().max() <= 1e-4, (kind, row)
        assert torch.equal(padded["generated"][row], padded["alone_generated"][row]), (kind, row)


@pytest.mark.parametrize("kind, hf_class", [("mamba2", "Mamba2ForCausalLM"), ("memmamba-off", "Mamba2ForCausalLM"),
                                            ("transformer", "LlamaForCausalLM")])
def test_native_exports_load_without_remote_code(exported, synthetic_data, kind, hf_class):
    model, hf_dir, report, out = exported[kind]
    inputs = exported["inputs"]
    assert not list(hf_dir.glob("*.py"))  # no remote code
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded above --max-shard-size
    assert "lm_head.weight" not in index["weight_map"]  # tied: implied by the embedding, as in HF files
    assert report["class"] == hf_class and report["module"].startswith("transformers.models.")
    assert report["resaved_equal"]
    with torch.no_grad():
        assert (out["logits"] - model(inputs["ids"])).abs().max() <= 1e-4
        # Packed rows: transformers' native class does not reset at EOD, and the model card says so.
        assert (out["packed_logits"] - model(inputs["packed"])).abs().max() > 1e-3
    assert f"native `{hf_class}` does not reset on packed input" in (hf_dir / "README.md").read_text()
    assert torch.equal(out["generated"], greedy_decode(model, inputs["prompt"], NEW_TOKENS))
    assert report["text_ids"] == Tokenizer(synthetic_data["tokenizer"]).encode(inputs["text"])


def test_manifest_and_model_card(exported):
    _, hf_dir, _, _ = exported["memmamba"]
    listed = {}
    for line in (hf_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert set(listed) == {p.name for p in hf_dir.iterdir()} - {"SHA256SUMS"}
    assert all(hashlib.sha256((hf_dir / name).read_bytes()).hexdigest() == d for name, d in listed.items())
    card = (hf_dir / "README.md").read_text()
    assert "trust_remote_code=True" in card and "tokens trained: 0" in card and "pool_size: 4" in card


def test_bf16_export_keeps_ssm_parameters_fp32(synthetic_data, tmp_path):
    model = random_model(tiny_config("memmamba"))
    export(save_as_checkpoint(model, tmp_path / "ckpt"), tmp_path / "hf", tokenizer=synthetic_data["tokenizer"],
           dtype="bf16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    state = model.state_dict()
    with safe_open(Path(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias"):
                assert tensor.dtype == torch.float32 and torch.equal(tensor, state[name])
            else:
                assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name].bfloat16())


def test_generate_cli_continues_a_prompt_like_our_decode_loop(exported, synthetic_data, capsys):
    model, hf_dir, _, _ = exported["memmamba"]
    tokenizer = Tokenizer(synthetic_data["tokenizer"])
    prompt = "The key is"
    expected = greedy_decode(model, torch.tensor([tokenizer.encode(prompt)]), 8)[0].tolist()
    assert generate_main(["--model", str(hf_dir), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    # Decoded by the HF tokenizer: for a random model the bytes may be invalid UTF-8, where HF's
    # byte-fallback decoder and SentencePiece place replacement characters differently.
    hf_text = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True).decode(expected)
    assert capsys.readouterr().out == prompt + hf_text + "\n"
    assert generate_main(["--model", str(hf_dir.parent), "--prompt", prompt]) == 2
    assert "no config.json" in capsys.readouterr().err
