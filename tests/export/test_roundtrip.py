"""Real checkpoints: `pretrain/main.py` on 2 gloo processes (DP=2/TP=1 and DP=1/TP=2, ZeRO-3), then
`python -m pretrain.export`, then the HF directory in a fresh interpreter without this project."""

import json
import shutil

import numpy as np
import pytest
import torch

from data_prep.manifest import split_prefixes
from model import build_model
from pretrain.data import TokenStream, validation_batch
from pretrain.checkpoint import _tp_rank_state, load_checkpoint
from pretrain.export import main as export_main

from .conftest import CHUNK, NEW_TOKENS, check_in_fresh_process, greedy_decode, memory_effect

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported_runs(run_dp2, run_tp2, synthetic_data, tmp_path_factory) -> dict:
    """Both runs exported with the CLI's entry point and used in one fresh interpreter.

    Returns {name: (run_dir, hf_dir, report, outputs)} and "inputs", with "valid" the first
    eval.samples validation sequences: the batch the trainer's final validation loss was measured on.
    """
    root = tmp_path_factory.mktemp("roundtrip")
    runs = {"dp2": run_dp2, "tp2": run_tp2}
    for name, run in runs.items():
        assert export_main(["--checkpoint", str(run), "--output", str(root / name)]) == 0
    stream = TokenStream(split_prefixes(synthetic_data["data"], "validation"), seed=0, shuffle=False)
    valid = torch.from_numpy(validation_batch(stream, 4 * CHUNK, 2, 0, 1).astype(np.int64))
    gen = torch.Generator().manual_seed(0)
    inputs = {"ids": torch.randint(0, 512, (2, 3 * CHUNK + 5), generator=gen), "prompt": valid[:, :CHUNK + 5],
              "text": "The passkey is 4417. Remember it.", "valid": valid}
    results = check_in_fresh_process([(root / name, True) for name in runs], inputs, root / "user")
    return {"inputs": inputs, **{name: (runs[name], root / name, *result) for name, result in zip(runs, results)}}


@pytest.mark.parametrize("name", ["dp2", "tp2"])
def test_hf_model_equals_the_trained_checkpoint(exported_runs, name):
    run, hf_dir, report, out = exported_runs[name]
    inputs = exported_runs["inputs"]
    ckpt = load_checkpoint(run)
    assert ckpt.path.name == "global_step2" and ckpt.meta["tp"] == (2 if name == "tp2" else 1)
    model = build_model(ckpt.model).eval()
    model.load_state_dict(ckpt.state_dict, strict=True)
    assert memory_effect(model, inputs["ids"]) > 1e-3  # 2 steps at lr 0.05 moved the zero-initialised fusion

    assert report["class"] == "MemMambaForCausalLM"
    with torch.no_grad():
        assert (out["logits"] - model(inputs["ids"])).abs().max() <= 1e-4
    assert torch.equal(out["generated"], greedy_decode(model, inputs["prompt"], NEW_TOKENS))
    assert [n for n, _ in report["calls"]] == [inputs["prompt"].shape[1]] + [1] * (NEW_TOKENS - 1)
    assert len({nbytes for _, nbytes in report["calls"]}) == 1 and report["one_cache_object"]

    # Independent of our gather/merge code: the trainer's own final validation loss, measured by the
    # DeepSpeed engine (TP-sharded for tp2) on the same batch, is what the HF model computes.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if f"valid/loss@{4 * CHUNK}" in r][-1]
    assert final["step"] == 2
    assert out["loss"] == pytest.approx(final[f"valid/loss@{4 * CHUNK}"], rel=1e-5)


def test_dp2_gather_equals_deepspeeds_own(run_dp2):
    """zero_to_fp32 on the whole checkpoint (public API, TP=1) gives bit-identical weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ours = load_checkpoint(run_dp2).state_dict
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(run_dp2 / "checkpoints"), tag="global_step2")
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_tp2_merge_is_not_a_block_concat(run_tp2):
    """Negative control: joining the in_proj shards as one block (not per z, x, B, C, dt component)
    gives other weights than the merge the export uses."""
    ckpt = load_checkpoint(run_tp2)
    shards = [_tp_rank_state(ckpt.path, rank, 1) for rank in range(2)]
    name = "backbone.layers.0.mixer.in_proj.weight"
    assert not torch.equal(torch.cat([s[name] for s in shards]), ckpt.state_dict[name])


def test_tags_and_incomplete_zero_checkpoint(run_dp2, synthetic_data, capsys, tmp_path):
    step1, step2 = load_checkpoint(run_dp2, "global_step1"), load_checkpoint(run_dp2)
    name = "backbone.layers.0.mixer.in_proj.weight"
    assert step1.meta["step"] == 1 and not torch.equal(step1.state_dict[name], step2.state_dict[name])

    broken = tmp_path / "run" / "checkpoints"
    shutil.copytree(run_dp2 / "checkpoints" / "global_step2", broken / "global_step2")
    (broken / "latest").write_text("global_step2\n")
    (broken / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    capsys.readouterr()
    code = export_main(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "o")])
    stderr = capsys.readouterr().err
    assert code == 2 and "incomplete checkpoint: missing zero_pp_rank_1_mp_rank_00_optim_states.pt (meta.json says " \
                         "dp=2)" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
