"""TP=2 on two CPU processes (gloo) equals TP=1 with the same weights: logits, loss, gradients,
and (through DeepSpeed ZeRO-3) optimizer steps and the universal checkpoint.

One two-process run (tp_worker.py) serves every test here: importing megatron-core and DeepSpeed
costs each process seconds, so all cases go through a single launch. The TP=1 references are
computed in the test process with the plain model, torch's cross entropy and torch's AdamW,
independently of model/parallel.py.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, build_model
from model.parallel import merge_state_dicts

from .conftest import randomize, tp_config

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("tp_worker.py")
TP = 2
SEQ_LEN = 32  # 4 memory chunks of 8: the 4-note pool fills and evicts
ATOL = RTOL = 1e-5

CONFIGS = {
    "memmamba": tp_config("memmamba", ngroups=2, tie_embeddings=True),
    "transformer": tp_config("transformer", tie_embeddings=False),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(cfg: ModelConfig, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(cfg)
    randomize(model, seed)
    return {"config": cfg, "state_dict": model.state_dict()}


def _tokens(cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Packed rows: an EOD inside a chunk (row 0) and at a chunk's end (row 1), so TP also runs the
    document reset (model.reset_at_eod is on by default) in the scan, the conv and the memory."""
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(seed))
    tokens[0, 11] = tokens[1, 15] = cfg.eod_token_id
    return tokens


def _train_case(name: str, seed: int, mode: str = "train") -> dict:
    tokens = _tokens(CONFIGS[name], seed)
    return {"mode": mode, **_weights(CONFIGS[name], seed), "input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def _reference(case: dict) -> dict:
    """TP=1: the plain model, torch's cross entropy."""
    model = build_model(case["config"])
    model.load_state_dict(case["state_dict"])
    logits = model(case["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), case["labels"].flatten())
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.detach(),
            "grads": {name: param.grad for name, param in model.named_parameters()}}


def _adamw_reference(case: dict) -> dict:
    """TP=1 without DeepSpeed: torch AdamW steps (gradients clipped to norm 1) on the plain model;
    losses, gradient norms before clipping, final weights and first moments."""
    model = build_model(case["config"])
    model.load_state_dict(case["state_dict"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=case["lr"])
    losses, grad_norms = [], []
    for tokens in case["batches"]:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())  # DeepSpeed's clipping
        optimizer.step()
        losses.append(loss.item())
    params = dict(model.named_parameters())
    return {"losses": losses, "grad_norms": grad_norms, "fp32": {k: p.detach() for k, p in params.items()},
            "exp_avg": {k: optimizer.state[p]["exp_avg"] for k, p in params.items()}}


def _launch(workdir: Path) -> list[dict]:
    port = str(_free_port())
    procs = []
    for rank in range(TP):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(TP),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(workdir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"TP rank {rank} exited {proc.returncode}:\n{output[-4000:]}"
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(TP)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Launch the two ranks once; returns the cases, the per-rank results and the TP=1 references."""
    workdir = tmp_path_factory.mktemp("tp2")
    zero3_batches = [_tokens(CONFIGS["memmamba"], seed) for seed in (10, 11)]
    cases = {
        "memmamba": _train_case("memmamba", seed=1),
        "transformer": _train_case("transformer", seed=2),
        "memmamba_blockwise_in_proj": _train_case("memmamba", seed=1, mode="blockwise"),
        "memmamba_bf16": {"mode": "bf16", **_weights(CONFIGS["memmamba"], seed=1)},
        # One B/C group cannot be split over 2 ranks.
        "misconfigured": {"mode": "misconfigured", **_weights(tp_config("memmamba", ngroups=1), seed=3)},
        "zero3": {"mode": "zero3", **_weights(CONFIGS["memmamba"], seed=4), "batches": zero3_batches, "lr": 1e-2,
                  "checkpoint_dir": str(workdir / "checkpoints")},
    }
    torch.save(cases, workdir / "cases.pt")
    ranks = _launch(workdir)
    convert = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                              str(workdir / "checkpoints" / "final"), "--output_folder", str(workdir / "universal")],
                             capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, f"ds_to_universal failed:\n{convert.stdout[-2000:]}\n{convert.stderr[-2000:]}"
    references = {name: _reference(cases[name]) for name in CONFIGS}
    references["zero3"] = _adamw_reference(cases["zero3"])
    return {"cases": cases, "ranks": ranks, "references": references, "universal": workdir / "universal" / "zero"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_loss_match_tp1(run: dict, name: str) -> None:
    reference = run["references"][name]
    ranks = [results[name] for results in run["ranks"]]
    vocab_slices = torch.cat([r["logits"] for r in ranks], dim=-1)  # rank r holds vocab rows r*V/2 ..
    torch.testing.assert_close(vocab_slices, reference["logits"], atol=ATOL, rtol=RTOL)
    for rank, result in enumerate(ranks):
        assert result["logits"].shape[-1] == CONFIGS[name].vocab_size // TP, f"rank {rank} logits not vocab-split"
        torch.testing.assert_close(result["gathered_logits"], reference["logits"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(result["loss"], reference["loss"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(result["fused_loss"], reference["loss"], atol=ATOL, rtol=RTOL)
        assert result["logits_untouched_by_loss"], "loss_fn modified the caller's logits in place"


@pytest.mark.parametrize("loss", ["loss_fn", "fused"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_tp1(run: dict, name: str, loss: str) -> None:
    """Through loss_fn on the vocab-split logits and through the fused vocab-parallel head loss;
    the MemMamba config ties the head to the embedding, the Transformer's does not."""
    reference = run["references"][name]["grads"]
    key = "grads" if loss == "loss_fn" else "fused_grads"
    merged = merge_state_dicts([results[name][key] for results in run["ranks"]], CONFIGS[name])
    assert set(merged) == set(reference)
    for key, grad in reference.items():
        assert grad.abs().max() > 0, f"{key}: zero gradient in the TP=1 reference (the test would be blind to it)"
        torch.testing.assert_close(merged[key], grad, atol=ATOL, rtol=RTOL, msg=lambda m, key=key: f"{key}: {m}")


def test_blockwise_in_proj_split_is_caught(run: dict) -> None:
    """Negative control: the same run with in_proj cut as one block (not per z/x/B/C/dt) is far off."""
    reference = run["references"]["memmamba"]["logits"]
    wrong = torch.cat([results["memmamba_blockwise_in_proj"]["logits"] for results in run["ranks"]], dim=-1)
    assert (wrong - reference).abs().max() > 1e-2


def test_partition_attributes_only_on_sharded_parameters(run: dict) -> None:
    sharded_rows = ("embeddings.weight", "in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log",
                    "mixer.D", "mixer.norm.weight")
    for results in run["ranks"]:
        attributes = results["memmamba"]["attributes"]
        assert any(".memory." in name for name in attributes)
        for name, attribute in attributes.items():
            if name.endswith("out_proj.weight"):
                assert attribute == (True, 1, 1), name
            elif name.endswith(sharded_rows):
                assert attribute == (True, 0, 1), name
            else:
                assert attribute is None, f"{name} is replicated but carries TP attributes {attribute}"
        transformer = results["transformer"]["attributes"]
        for name, attribute in transformer.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                assert attribute == (True, 1, 1), name
            elif name.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight",
                                "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                assert attribute == (True, 0, 1), name
            else:
                assert attribute is None, name


def test_ssm_parameters_stay_float32_in_a_bf16_model(run: dict) -> None:
    for results in run["ranks"]:
        dtypes = results["memmamba_bf16"]["dtypes"]
        for name, dtype in dtypes.items():
            expected = torch.float32 if name.endswith(("A_log", ".D", "dt_bias")) else torch.bfloat16
            assert dtype == expected, f"{name}: {dtype}"


def test_parallelize_rejects_indivisible_groups(run: dict) -> None:
    for results in run["ranks"]:
        error = results["misconfigured"]["error"]
        assert error is not None and "model.mamba.ngroups" in error and "parallel.tp=2" in error


def test_zero3_tp2_trains_like_tp1(run: dict) -> None:
    """Through DeepSpeed ZeRO-3 with megatron's mpu: the same losses, and the same global gradient
    norm, which DeepSpeed gets right only if replicated parameters carry no TP attributes."""
    reference = run["references"]["zero3"]
    for results in run["ranks"]:
        torch.testing.assert_close(results["zero3"]["losses"], reference["losses"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(results["zero3"]["grad_norms"], reference["grad_norms"], atol=ATOL, rtol=RTOL)


def test_universal_checkpoint_of_tp2_holds_the_tp1_model(run: dict) -> None:
    """ds_to_universal, guided by universal_checkpoint_info, rebuilds full (TP=1) weights and Adam
    moments from the TP=2 ZeRO-3 checkpoint."""
    reference = run["references"]["zero3"]
    for state in ("fp32", "exp_avg"):
        for name, expected in reference[state].items():
            saved = torch.load(run["universal"] / name / f"{state}.pt", weights_only=False)
            saved = saved["param"] if isinstance(saved, dict) else saved
            torch.testing.assert_close(saved.view(expected.shape), expected, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, key=f"{name} {state}": f"{key}: {m}")
