"""`python -m pretrain.evaluate` end to end (its `main(argv)`, in this process) on an exported-style HF
directory, on a checkpoint directory and on a training run; `--zero-memory` leaves the Mamba2 backbone."""

import json
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch
import transformers

from model import build_model
from pretrain.eval import EvalLM, TaskSettings
from pretrain.eval.documents import documents
from pretrain.eval.ppl import perplexity
from pretrain.evaluate import main, parse_args, zero_memory_output
from pretrain.import_hf import write_checkpoint

from .conftest import tiny_config, tiny_model

TASK_ARGS = ["--tasks", "ppl,passkey,fidelity", "--lengths", "160,256", "--ppl-samples", "2",
             "--passkey-depths", "0,1", "--passkey-trials", "1", "--fidelity-distances", "1,4,16",
             "--fidelity-d-stars", "4,16", "--fidelity-samples", "2"]


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
    assert results["model"] == {"kind": "hf", "name": "hf", "step": None, "zero_memory": False}
    assert {p.name for p in out.iterdir()} >= {"results.json", "summary.md", "ppl.png", "passkey.png", "fidelity.png"}
    # The HF model (transformers' own Mamba2 code) gives the perplexity of our model with the same weights.
    ours = perplexity(EvalLM(model), documents(synthetic_data["data"], "validation"), [160, 256], 2)
    for length in ("160", "256"):
        assert results["tasks"]["ppl"][length]["ppl"] == pytest.approx(ours[length]["ppl"], rel=1e-4)
    assert results["tasks"]["passkey"]["accuracy"] == [[0.0, 0.0], [0.0, 0.0]]
    assert results["tasks"]["passkey"]["mean_interval"]["160"] == pytest.approx([0.0, 0.6576], abs=1e-4)  # 0 of 2
    fid = results["tasks"]["fidelity"]
    assert fid["distances"] == [1, 4, 16] and fid["d_stars"] == [4, 16] and fid["samples"] == 2
    assert set(fid["eclmf"]) == {"4", "16"} and fid["needle"] is not None  # the tokenizer makes the needle
    assert results["settings"] == asdict(TaskSettings(
        lengths=[160, 256], ppl_samples=2, passkey_depths=[0.0, 1.0], passkey_trials=1, fidelity_distances=[1, 4, 16],
        fidelity_d_stars=[4, 16], fidelity_samples=2))
    assert results["scalars"]["ppl@256"] == results["tasks"]["ppl"]["256"]["ppl"]
    assert {"etmf@16", "eclmf@4/layer2", "needle_etmf@16"} <= set(results["scalars"])
    summary = (out / "summary.md").read_text()
    assert "| hf |" in summary and "| hf | 2 of 2 |" in summary


def test_bad_inputs_exit_2_with_one_line(synthetic_data, tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--data", str(synthetic_data["data"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a Hugging Face directory" in err
    assert main(["--model", str(tmp_path), "--tasks", "ppl,speed", "--passkey-trials", "0"]) == 2
    err = capsys.readouterr().err
    assert "--tasks: unknown task(s) speed" in err and "--passkey-trials: must be > 0" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--fidelity-d-stars" in help_text and "--zero-memory" in help_text


def test_every_task_setting_has_its_flag_with_its_default():
    args, defaults = vars(parse_args(["--model", "x"])), TaskSettings()
    for f in fields(TaskSettings):
        assert f.name in args, f"TaskSettings.{f.name} has no --{f.name.replace('_', '-')}"
        assert args[f.name] == getattr(defaults, f.name), f.name


def randomise_memory(model: torch.nn.Module, seed: int = 0) -> None:
    """Nonzero fusion projections (zero at init) and larger memory weights: a memory that contributes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".memory." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def backbone_of(model: torch.nn.Module, vocab_size: int) -> torch.nn.Module:
    """The Mamba2 of the same config (arch mamba2) with the MemMamba's non-memory weights."""
    mamba2 = build_model(tiny_config("mamba2", vocab_size)).eval()
    missing, unexpected = mamba2.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(".memory." in name for name in unexpected)
    return mamba2


def test_zero_memory_output_leaves_the_mamba2_backbone():
    model = tiny_model("memmamba", seed=3)
    randomise_memory(model)
    mamba2 = backbone_of(model, 64)
    ids = torch.randint(0, 64, (2, 80), generator=torch.Generator().manual_seed(0))  # 5 chunks of 16
    with torch.no_grad():
        assert (model(ids) - mamba2(ids)).abs().max() > 1e-2  # the memory contributes before
        assert zero_memory_output(model) == 2  # one MemoryBlock per layer
        torch.testing.assert_close(model(ids), mamba2(ids), rtol=0, atol=1e-6)
    # Decoding (prefill + recurrent steps) reads the zeroed memory too.
    assert torch.equal(EvalLM(model).greedy(ids[:, :40], 8), EvalLM(mamba2).greedy(ids[:, :40], 8))
    with pytest.raises(ValueError, match="--zero-memory: the model .* has no memory"):
        zero_memory_output(mamba2)


def memmamba_checkpoint(directory, seed: int) -> torch.nn.Module:
    """A tiny MemMamba whose memory contributes, written as a checkpoint directory (the import_hf layout)."""
    torch.manual_seed(seed)
    cfg = tiny_config("memmamba", vocab_size=512)
    model = build_model(cfg).eval()
    randomise_memory(model, seed=seed)
    directory.mkdir()
    write_checkpoint(directory, cfg, model.state_dict(), tp=1, meta={})
    return model


def test_zero_memory_on_a_checkpoint_directory(synthetic_data, tmp_path):
    """A checkpoint directory (the layout `pretrain.import_hf` writes, read by load_run) of a MemMamba whose
    memory contributes: --zero-memory gives its backbone's perplexity and records the ablation."""
    model = memmamba_checkpoint(tmp_path / "ckpt", seed=4)
    args = ["--model", str(tmp_path / "ckpt"), "--data", str(synthetic_data["data"]), "--tasks", "ppl",
            "--lengths", "160", "--ppl-samples", "2"]
    assert main([*args, "--output", str(tmp_path / "full")]) == 0
    assert main([*args, "--output", str(tmp_path / "zeroed"), "--zero-memory"]) == 0
    full, zeroed = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("full", "zeroed"))
    assert full["model"] == {"kind": "checkpoint", "name": "ckpt", "step": 0, "zero_memory": False}
    assert zeroed["model"] == {"kind": "checkpoint", "name": "ckpt", "step": 0, "zero_memory": True}
    docs = documents(synthetic_data["data"], "validation")
    backbone = perplexity(EvalLM(backbone_of(model, 512)), docs, [160], 2)["160"]["ppl"]
    assert zeroed["tasks"]["ppl"]["160"]["ppl"] == pytest.approx(backbone, rel=1e-6)
    assert full["tasks"]["ppl"]["160"]["ppl"] != pytest.approx(backbone, rel=1e-3)
    assert "(memory zeroed)" in (tmp_path / "zeroed" / "summary.md").read_text()


def test_zero_memory_of_a_model_without_memory_exits_2(synthetic_data, tmp_path, capsys):
    save_as_hf_mamba2(tiny_model("mamba2", vocab_size=512), tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["--model", str(tmp_path / "hf"), "--data", str(synthetic_data["data"]), "--tasks", "ppl",
                 "--lengths", "160", "--zero-memory", "--output", str(tmp_path / "out")]) == 2
    # stderr also holds transformers' loading bar
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--zero-memory: the model (Mamba2ForCausalLM) has no memory" in errors[0]
    assert not (tmp_path / "out").exists()  # stopped before any work


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
    assert from_run["model"] == {"kind": "run", "name": "run", "step": 2, "zero_memory": False}
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


def test_checkpoints_are_evaluated_through_the_kernels(synthetic_data, tmp_path):
    """As in training, `apply_kernels` picks the SSD scan and memory read (Triton on CUDA; forced here, on
    CPU under TRITON_INTERPRET=1): the kernels run, record themselves, and agree with the reference."""
    from model.kernels import memory_read_triton, ssd_chunked_triton
    from pretrain.evaluate import evaluate, load_model

    memmamba_checkpoint(tmp_path / "ckpt", seed=5)
    settings = TaskSettings(tasks=["ppl"], lengths=[160], ppl_samples=2)
    results = {}
    for backend in ("torch", "triton"):
        loaded = load_model(tmp_path / "ckpt")
        results[backend] = evaluate(loaded, settings, str(synthetic_data["data"]), "validation", tmp_path / backend,
                                    kernels=backend)
        mixers = [m for m in loaded.model.modules() if hasattr(m, "ssd_fn")]
        reads = [m for m in loaded.model.modules() if hasattr(m, "read_fn")]
        assert mixers and reads
        assert all((m.ssd_fn is ssd_chunked_triton) == (backend == "triton") for m in mixers)
        assert all((m.read_fn is memory_read_triton) == (backend == "triton") for m in reads)
        assert results[backend]["kernels"] == backend
    ppl = {backend: r["tasks"]["ppl"]["160"]["ppl"] for backend, r in results.items()}
    assert ppl["triton"] == pytest.approx(ppl["torch"], rel=1e-4)
