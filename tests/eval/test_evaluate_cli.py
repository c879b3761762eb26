"""`python -m pretrain.evaluate` end to end (its `main(argv)`, in this process) on an exported-style HF
directory and on a training run."""

import json

import numpy as np
import pytest
import transformers

from pretrain.eval import EvalLM
from pretrain.eval.documents import documents
from pretrain.eval.ppl import perplexity
from pretrain.evaluate import main

from .conftest import tiny_model

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


def test_evaluate_hf_directory(synthetic_data, tmp_path):
    model = tiny_model("mamba2", vocab_size=512)
    save_as_hf_mamba2(model, tmp_path / "hf")
    out = tmp_path / "eval"
    assert main(["--model", str(tmp_path / "hf"), "--data", str(synthetic_data["data"]),
                 "--tokenizer", str(synthetic_data["tokenizer"]), "--output", str(out), *TASK_ARGS]) == 0

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


RUN_CONFIG = """
model:
  arch: memmamba
  vocab_size: 512
  d_model: 32
  n_layers: 2
  mamba: {{d_state: 8, headdim: 8, expand: 2, ngroups: 1, chunk_size: 32}}
  memory: {{pool_size: 4, notes_per_chunk: 2, summary_dim: 16, heads: 2, cross_layer_every: 2}}
data: {{path: {data}, tokenizer: {tokenizer}}}
train: {{max_tokens: 1024, global_batch_size: 4, micro_batch_size: 4}}
curriculum: {{stages: [{{tokens: 0, seq_len: 128}}]}}
logging: {{every_steps: 1, progress_bar: false}}
eval: {{seq_lens: [128], samples: 2}}
"""


@pytest.mark.slow
def test_evaluate_run_directory_and_its_export(cli, synthetic_data, tmp_path):
    """Train two steps with the real trainer and evaluate the run: the loaded weights reproduce the
    trainer's own final validation loss and the scalars land in the run's TensorBoard. Then export
    it with `pretrain.export.export` (MemMamba remote code) and evaluate the HF directory: same numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data_prep.manifest import split_prefixes
    from pretrain.data import TokenStream, validation_batch
    from pretrain.eval.ppl import token_nll
    from pretrain.evaluate import load_model
    from pretrain.export import export

    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG.format(data=synthetic_data["data"], tokenizer=synthetic_data["tokenizer"]))
    run = tmp_path / "run"
    cli("pretrain.main", "--config", config, "--run-dir", run)

    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    loaded = load_model(run)
    assert loaded.step == final["step"] == 2 and loaded.tokenizer is not None
    stream = TokenStream(split_prefixes(synthetic_data["data"], "validation"), seed=0, shuffle=False)
    samples = validation_batch(stream, 128, 2, dp_rank=0, dp_size=1)
    mean_nll = np.mean([token_nll(EvalLM(loaded.model), sample) for sample in samples])
    assert mean_nll == pytest.approx(final["valid/loss@128"], rel=1e-5)

    assert main(["--model", str(run), "--data", str(synthetic_data["data"]), *TASK_ARGS]) == 0
    from_run = json.loads((run / "eval" / "global_step2" / "results.json").read_text())
    assert from_run["model"] == {"kind": "run", "name": "run", "step": 2}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalar = events.Scalars("eval/ppl@256")
    assert [(e.step, e.value) for e in scalar] == [(2, pytest.approx(from_run["scalars"]["ppl@256"], rel=1e-6))]

    export(run, tmp_path / "hf")
    assert main(["--model", str(tmp_path / "hf"), "--data", str(synthetic_data["data"]),
                 "--output", str(tmp_path / "hf-eval"), *TASK_ARGS]) == 0
    from_hf = json.loads((tmp_path / "hf-eval" / "results.json").read_text())
    assert from_hf["model"]["kind"] == "hf"
    for name, value in from_run["scalars"].items():
        assert from_hf["scalars"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
