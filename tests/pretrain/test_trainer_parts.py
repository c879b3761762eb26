"""Small trainer policies on a real tiny model, without process groups: weight decay groups, activation
checkpointing, frozen parameters, the DeepSpeed config derived from the typed config."""

from __future__ import annotations

import pytest
import torch

from model import build_model
from pretrain.config import RunConfig, load_config
from pretrain.trainer import deepspeed_config, enable_activation_checkpointing, freeze_parameters, parameter_groups

from .conftest import REPO_ROOT

QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(load_config(RunConfig, QUICKSTART, ["model.n_layers=2"]).model)


def test_weight_decay_only_on_matrices_and_each_parameter_once():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D", "backbone.layers.0.mixer.dt_bias",
            "backbone.layers.0.norm.weight"} <= no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    counted = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert sorted(counted) == sorted({id(p) for p in model.parameters()})  # the tied LM head only once



def test_memory_lr_scale_puts_the_memory_in_groups_of_its_own():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr_scale"] for g in parameter_groups(model, weight_decay=0.1)] == [1.0, 1.0]
    groups = parameter_groups(model, weight_decay=0.1, memory_lr_scale=3.0)
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.1), (1.0, 0.0), (3.0, 0.1), (3.0, 0.0)]
    for group in groups:
        assert all((".memory." in names[id(p)]) == (group["lr_scale"] == 3.0) for p in group["params"])
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)


def test_freeze_leaves_the_matched_parameters_out_of_the_optimizer():
    model = tiny_model()
    freeze_parameters(model, ["*.mixer.*", "backbone.norm_f.*"])
    names = [n for n, _ in model.named_parameters()]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in names if ".mixer." in n or n == "backbone.norm_f.weight"}
    optimized = {id(p) for group in parameter_groups(model, weight_decay=0.1) for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n not in frozen}
    with pytest.raises(ValueError, match="train.freeze: pattern 'mixers.*' matches no parameter of this model"):
        freeze_parameters(tiny_model(), ["mixers.*"])


def test_decay_embeddings_false_leaves_the_embedding_and_the_head_undecayed():
    for tie in (True, False):
        model = build_model(load_config(RunConfig, QUICKSTART, ["model.n_layers=2",
                                                                f"model.tie_embeddings={str(tie).lower()}"]).model)
        names = {id(p): n for n, p in model.named_parameters()}
        decay, no_decay = parameter_groups(model, weight_decay=0.1, decay_embeddings=False)
        spared = {names[id(p)] for p in no_decay["params"] if p.ndim >= 2}
        assert spared == ({"backbone.embeddings.weight"} if tie else {"backbone.embeddings.weight", "lm_head.weight"})
        default_decay, _ = parameter_groups(model, weight_decay=0.1)
        assert len(default_decay["params"]) == len(decay["params"]) + len(spared)


def test_activation_checkpointing_recomputes_blocks_with_equal_gradients():
    tokens = torch.randint(0, 512, (2, 65))
    grads, mixer_calls = [], []
    for checkpointed in (False, True):
        model = tiny_model()
        if checkpointed:
            enable_activation_checkpointing(model)
        calls = []
        for layer in model.backbone.layers:
            layer.mixer.register_forward_hook(lambda *_: calls.append(1))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        mixer_calls.append(len(calls))
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in tiny_model().named_parameters()]
    assert mixer_calls == [2, 4]  # every block ran again in the backward pass
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_deepspeed_config_follows_the_typed_config():
    cfg = load_config(RunConfig, QUICKSTART, ["deepspeed.precision=bf16", "deepspeed.offload_optimizer=true",
                                              "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, dp=2, device=torch.device("cpu"), load_universal=True)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # parameters stay fp32
    assert "bf16" not in ds and "fp16" not in ds
    assert ds["gradient_clipping"] == 0.5 and ds["checkpoint"] == {"load_universal": True}
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    auto = deepspeed_config(load_config(RunConfig, QUICKSTART), dp=1, device=torch.device("cpu"), load_universal=False)
    assert auto["torch_autocast"]["enabled"] is False  # "auto" is fp32 on CPU


def test_zero3_keeps_weights_whole_when_there_is_nothing_to_partition_over():
    cfg = load_config(RunConfig, QUICKSTART)
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.param_persistence_threshold is None
    one_rank = deepspeed_config(cfg, dp=1, device=torch.device("cpu"), load_universal=False)["zero_optimization"]
    assert one_rank["stage3_param_persistence_threshold"] >= sum(p.numel() for p in build_model(cfg.model).parameters())
    assert "stage3_param_persistence_threshold" not in deepspeed_config(  # DeepSpeed's default
        cfg, dp=2, device=torch.device("cpu"), load_universal=False)["zero_optimization"]
    chosen = load_config(RunConfig, QUICKSTART, ["deepspeed.param_persistence_threshold=4096"])
    for dp in (1, 2):
        zero = deepspeed_config(chosen, dp=dp, device=torch.device("cpu"), load_universal=False)["zero_optimization"]
        assert zero["stage3_param_persistence_threshold"] == 4096
    stage2 = load_config(RunConfig, QUICKSTART, ["deepspeed.zero_stage=2"])
    assert "stage3_param_persistence_threshold" not in deepspeed_config(
        stage2, dp=1, device=torch.device("cpu"), load_universal=False)["zero_optimization"]
