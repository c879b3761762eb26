"""Single-process checks of the TP layout: state-dict shard/merge, in_proj per component, config
errors, the TP=1 loss, and DeepSpeed's own universal-checkpoint merge of our shards."""

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.parallel import check_tp_config, loss_fn, merge_state_dicts, shard_state_dict
from pretrain.checkpoint import universal_checkpoint_info

from .conftest import randomize, tp_config

LAYOUTS = [("memmamba", 2, 2), ("memmamba", 4, 4), ("mamba2", 2, 2), ("transformer", 2, 2)]  # arch, ngroups, tp


def _model(arch: str, ngroups: int = 2, seed: int = 0) -> torch.nn.Module:
    model = build_model(tp_config(arch, ngroups=ngroups))
    randomize(model, seed)
    return model


@pytest.mark.parametrize("arch,ngroups,tp", LAYOUTS)
def test_shard_then_merge_is_bit_exact(arch: str, ngroups: int, tp: int) -> None:
    cfg = tp_config(arch, ngroups=ngroups)
    full = _model(arch, ngroups).state_dict()
    shards = [shard_state_dict(full, cfg, tp, rank) for rank in range(tp)]
    for shard in shards:
        assert set(shard) == set(full)
        assert sum(t.numel() for t in shard.values()) < sum(t.numel() for t in full.values())
    merged = merge_state_dicts(shards, cfg)
    assert set(merged) == set(full)
    for name, tensor in full.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name


def _in_proj_components(cfg, projected: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Split in_proj output (..., width) of a model sharded over ``tp`` ranks into z, x, B, C, dt."""
    d_inner, heads = cfg.d_inner // tp, cfg.n_mamba_heads // tp
    group_width = cfg.mamba.ngroups * cfg.mamba.d_state // tp
    return list(projected.split([d_inner, d_inner, group_width, group_width, heads], dim=-1))


def _holds_whole_heads(cfg, full_weight: torch.Tensor, shard_weight: torch.Tensor, rank: int, tp: int) -> bool:
    """Does this in_proj shard produce, for each of z, x, B, C, dt, exactly rank ``rank``'s heads/groups
    of the full projection? Checked on projected activations, independently of model/parallel.py."""
    u = torch.randn(3, cfg.d_model, dtype=torch.float64)
    full_parts = _in_proj_components(cfg, u @ full_weight.double().T, 1)
    local_parts = _in_proj_components(cfg, u @ shard_weight.double().T, tp)
    return all(torch.allclose(local, full.chunk(tp, dim=-1)[rank]) for local, full in zip(local_parts, full_parts))


def test_in_proj_is_split_per_component_and_a_block_split_is_caught() -> None:
    cfg, tp = tp_config("memmamba"), 2
    full = _model("memmamba").state_dict()
    name = "backbone.layers.0.mixer.in_proj.weight"
    for rank in range(tp):
        ours = shard_state_dict(full, cfg, tp, rank)[name]
        assert _holds_whole_heads(cfg, full[name], ours, rank, tp)
        block = full[name].chunk(tp, dim=0)[rank]  # the classic mistake: one block of rows
        assert block.shape == ours.shape and not _holds_whole_heads(cfg, full[name], block, rank, tp)


def test_merge_rejects_inconsistent_shards() -> None:
    cfg = tp_config("memmamba")
    full = _model("memmamba").state_dict()
    shards = [shard_state_dict(full, cfg, 2, rank) for rank in range(2)]
    drifted = dict(shards[1])
    drifted["backbone.norm_f.weight"] = drifted["backbone.norm_f.weight"] + 1
    with pytest.raises(ValueError, match="backbone.norm_f.weight: replicated parameter differs"):
        merge_state_dicts([shards[0], drifted], cfg)
    with pytest.raises(ValueError, match=r"embeddings.weight: expected a full \(TP=1\) tensor .*already a shard"):
        shard_state_dict(shards[0], cfg, 2, 0)
    with pytest.raises(ValueError, match="different keys"):
        merge_state_dicts([shards[0], {k: v for k, v in shards[1].items() if "lm_head" not in k}], cfg)


@pytest.mark.parametrize("arch,change,field", [
    ("memmamba", {"vocab_size": 63}, "model.vocab_size: 63 is not divisible by parallel.tp=2; pad the vocabulary"),
    ("memmamba", {"mamba.ngroups": 1}, "model.mamba.ngroups"),
    ("mamba2", {"mamba.headdim": 64, "mamba.ngroups": 1}, "model.mamba.headdim"),
    ("transformer", {"transformer.n_heads": 2, "transformer.n_kv_heads": 1}, "model.transformer.n_kv_heads"),
    ("transformer", {"transformer.ffn_hidden": 47}, "model.transformer.ffn_hidden"),
])
def test_misconfiguration_names_the_field(arch: str, change: dict, field: str) -> None:
    cfg = tp_config(arch)
    for dotted, value in change.items():
        *sections, key = dotted.split(".")
        setattr(getattr(cfg, sections[0]) if sections else cfg, key, value)
    cfg.validate()  # a valid model, just not splittable over 2 ranks
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_tp_config(cfg, 2)
    check_tp_config(cfg, 1)


def test_all_problems_reported_at_once() -> None:
    cfg = tp_config("transformer")
    cfg.vocab_size, cfg.transformer.n_heads, cfg.transformer.n_kv_heads = 65, 2, 1
    with pytest.raises(ValueError) as error:
        check_tp_config(cfg, 4)
    for field in ("model.vocab_size", "model.transformer.n_heads", "model.transformer.n_kv_heads"):
        assert field in str(error.value)
    assert "e.g. 68" in str(error.value)
    with pytest.raises(ValueError, match="parallel.tp: must be a positive integer"):
        check_tp_config(cfg, 0)


def test_loss_fn_at_tp1_is_cross_entropy() -> None:
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 5)
    torch.testing.assert_close(loss_fn(logits, labels, "none"), expected)
    torch.testing.assert_close(loss_fn(logits, labels), expected.mean())
    assert loss_fn(logits.bfloat16(), labels, "sum").dtype == torch.float32
    with pytest.raises(ValueError, match="reduction"):
        loss_fn(logits, labels, "average")


@pytest.mark.parametrize("arch", ["memmamba", "transformer"])
def test_deepspeed_universal_merge_rebuilds_full_parameters(arch: str, tmp_path) -> None:
    """Feed our TP=2 shards to DeepSpeed's own ds_to_universal merge step, as ZeRO fragments of one
    data-parallel rank, with our universal_checkpoint_info: it must rebuild every full parameter."""
    from deepspeed.checkpoint.constants import PARAM
    from deepspeed.checkpoint.ds_to_universal import merge_tp_slices

    cfg, tp = tp_config(arch), 2
    model = _model(arch)
    full = dict(model.named_parameters())  # what DeepSpeed saves: each (tied) parameter once
    info = universal_checkpoint_info(model, tp)
    shards = [shard_state_dict({k: v.detach() for k, v in full.items()}, cfg, tp, rank) for rank in range(tp)]
    slices, merged = tmp_path / "slices", tmp_path / "merged"
    for name in full:
        for rank in range(tp):
            (slices / name / str(rank)).mkdir(parents=True)
            for state in ("fp32", "exp_avg", "exp_avg_sq"):
                torch.save(shards[rank][name].flatten(), slices / name / str(rank) / f"{state}.00")
        merge_tp_slices(info, str(merged), str(slices), tp, (name, [shards[r][name].shape for r in range(tp)]))
        rebuilt = torch.load(merged / name / "fp32.pt", weights_only=False)[PARAM]
        assert torch.equal(rebuilt.view(full[name].shape), full[name].detach()), name
