"""`python -m pretrain.evaluate` end to end on an exported-style HF directory and on a training run."""

import json
import math

import numpy as np
import pytest
import torch
import transformers

from pretrain.eval import EvalLM
from pretrain.eval.documents import documents
from pretrain.eval.ppl import perplexity
from pretrain.evaluate import main

from .conftest import tiny_config, tiny_model

TASK_ARGS = ["--tasks", "ppl,passkey,fidelity", "--lengths", "160,256", "--ppl-samples", "2",
             "--passkey-depths", "0,1", "--passkey-trials", "1", "--fidelity-distances", "1,4,16",
             "--fidelity-d-star", "16", "--fidelity-samples", "2"]


def save_as_hf_mamba2(model, directory) -> None:
    """What the export writes for a memory-disabled model: a native Mamba2ForCausalLM directory."""
    cfg = model.config
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        layer_norm_epsilon=cfg.norm_eps, state_size=cfg.mamba.d_state, head_dim=cfg.mamba.headdim,
        expand=cfg.mamba.expand, num_heads=cfg.n_mamba_heads, n_groups=cfg.mamba.ngroups,
        conv_kernel=cfg.mamba.d_conv, chunk_size=cfg.mamba.chunk_size, use_bias=False, use_conv_bias=True,
        residual_in_fp32=True, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    hf.save_pretrained(directory)


def test_evaluate_hf_directory(cli, synthetic_data, tmp_path):
    model = tiny_model("mamba2", vocab_size=512)
    save_as_hf_mamba2(model, tmp_path / "hf")
    out = tmp_path / "eval"
    cli("pretrain.evaluate", "--model", tmp_path / "hf", "--data", synthetic_data["data"],
        "--tokenizer", synthetic_data["tokenizer"], "--output", out, *TASK_ARGS)

    results = json.loads((out / "results.json").read_text())
    assert results["model"] == {"kind": "hf", "name": "hf", "step": None}
    assert {p.name for p in out.iterdir()} >= {"results.json", "summary.md", "ppl.png", "passkey.png", "fidelity.png"}
    # The HF model (transformers' own Mamba2 code) gives the perplexity of our model with the same weights.
    ours = perplexity(EvalLM(model), documents(synthetic_data["data"], "validation"), [160, 256], 2)
    for length in ("160", "256"):
        assert results["tasks"]["ppl"][length]["ppl"] == pytest.approx(ours[length]["ppl"], rel=1e-4)
    assert results["tasks"]["passkey"]["accuracy"] == [[0.0, 0.0], [0.0, 0.0]]
    assert results["tasks"]["fidelity"]["distances"] == [1, 4, 16]
    assert results["scalars"]["ppl@256"] == results["tasks"]["ppl"]["256"]["ppl"]
    assert "| hf |" in (out / "summary.md").read_text()


def test_bad_inputs_exit_2_with_one_line(synthetic_data, tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--data", str(synthetic_data["data"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a Hugging Face directory" in err
    assert main(["--model", str(tmp_path), "--tasks", "ppl,speed", "--passkey-trials", "0"]) == 2
    err = capsys.readouterr().err
    assert "--tasks: unknown task(s) speed" in err and "--passkey-trials: must be > 0" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--fidelity-d-star" in capsys.readouterr().out
