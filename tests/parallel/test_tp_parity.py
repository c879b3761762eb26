"""TP=2 on two CPU processes (gloo) equals TP=1 with the same weights: logits, loss and gradients.

One two-process run (tp_worker.py) serves every test here: importing megatron-core costs each
process seconds, so all cases go through a single launch. The TP=1 reference is computed in the
test process with the plain model and torch's cross entropy, independently of model/parallel.py.
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


def _case(cfg: ModelConfig, seed: int, mode: str = "train") -> dict:
    torch.manual_seed(seed)
    model = build_model(cfg)
    randomize(model, seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(seed))
    return {"config": cfg, "state_dict": model.state_dict(), "input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
            "mode": mode}


def _reference(case: dict) -> dict:
    """TP=1: the plain model, torch's cross entropy."""
    model = build_model(case["config"])
    model.load_state_dict(case["state_dict"])
    logits = model(case["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), case["labels"].flatten())
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.detach(),
            "grads": {name: param.grad for name, param in model.named_parameters()}}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Launch the two ranks once; returns the cases, the per-rank results and the TP=1 references."""
    workdir = tmp_path_factory.mktemp("tp2")
    cases = {
        "memmamba": _case(CONFIGS["memmamba"], seed=1),
        "transformer": _case(CONFIGS["transformer"], seed=2),
        "memmamba_blockwise_in_proj": _case(CONFIGS["memmamba"], seed=1, mode="blockwise"),
        "memmamba_bf16": _case(CONFIGS["memmamba"], seed=1, mode="bf16"),
        # One B/C group cannot be split over 2 ranks.
        "misconfigured": _case(tp_config("memmamba", ngroups=1), seed=3, mode="misconfigured"),
    }
    torch.save(cases, workdir / "cases.pt")
    port = str(_free_port())
    procs = []
    for rank in range(TP):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(TP),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(workdir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"TP rank {rank} exited {proc.returncode}:\n{output[-4000:]}"
    ranks = [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(TP)]
    references = {name: _reference(cases[name]) for name in CONFIGS}
    return {"cases": cases, "ranks": ranks, "references": references}


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
        assert result["logits_untouched_by_loss"], "loss_fn modified the caller's logits in place"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_tp1(run: dict, name: str) -> None:
    reference = run["references"][name]["grads"]
    merged = merge_state_dicts([results[name]["grads"] for results in run["ranks"]], CONFIGS[name])
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
