"""Tensor parallelism (TP) for MemMamba, Mamba2 and the Transformer baseline, with megatron-core.

TP is applied from outside (torchtitan style): ``parallelize(model)`` swaps layers of a built
TP=1 model for megatron-core's parallel layers and keeps on each rank only its slice of every
sharded parameter, so the TP model starts as exactly the TP=1 model cut into pieces. The model
code is untouched: it reads local head/group counts from parameter shapes.

What is split (one table, ``tp_splits``, used by parallelize, the state-dict helpers and the
DeepSpeed universal-checkpoint info, so they cannot disagree):

=========================  ==========================  ==============================================
parameter                  megatron layer / split       rank r holds
=========================  ==========================  ==============================================
embeddings, lm_head        VocabParallelEmbedding /     vocabulary rows r*V/tp ..; logits stay split,
                           our LMHead (model/loss.py)   its loss and ``loss_fn`` are vocab-parallel
mixer.in_proj              ColumnParallelLinear         the r-th slice of EACH of z, x, B, C, dt
                                                        (Megatron MambaMixer's partition sizes; a
                                                        block split would mix components)
mixer.conv1d (w, b)        depthwise Conv1d, by heads   the r-th slice of each of x, B, C
A_log, D, dt_bias          by heads (kept float32)      heads r*H/tp ..
mixer.norm.weight          by heads                     exact: the gated norm is per group and each
                                                        rank holds whole groups (ngroups % tp == 0)
mixer.out_proj             RowParallelLinear            input columns of its heads; output all-reduced
q_proj, k_proj, v_proj     ColumnParallelLinear         query heads r*H/tp .., kv heads r*KV/tp ..
o_proj                     RowParallelLinear            input columns of its query heads
gate_proj, up_proj         ColumnParallelLinear         SwiGLU hidden units r*F/tp ..
down_proj                  RowParallelLinear            input columns of its hidden units
everything else            replicated                   norms, the MemMamba memory (small; it reads
                                                        the all-reduced mixer output)
=========================  ==========================  ==============================================

Sharded parameters carry megatron's ``tensor_model_parallel`` / ``partition_dim`` /
``partition_stride`` attributes and replicated ones carry none: DeepSpeed counts a parameter
without them only once per TP group in the gradient norm. `pretrain.checkpoint.universal_checkpoint_info`
reads ``tp_splits`` to tell DeepSpeed's ``ds_to_universal`` how to merge each parameter.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .loss import LMHead

# The SSM parameters stay float32 whatever the model's dtype (DESIGN.md §5).
FP32_PARAMETERS = ("A_log", "D", "dt_bias")


@dataclass(frozen=True)
class Split:
    """How one parameter is cut across TP ranks.

    Along ``dim`` the full tensor is the concatenation of components of widths ``sizes`` (in_proj:
    z, x, B, C, dt). Each component is split evenly; rank r holds the r-th piece of every component,
    concatenated in the same order.
    """

    dim: int
    sizes: tuple[int, ...]

    def shard(self, full: torch.Tensor, tp_size: int, rank: int) -> torch.Tensor:
        components = full.split(self.sizes, dim=self.dim)
        return torch.cat([part.chunk(tp_size, dim=self.dim)[rank] for part in components], dim=self.dim)

    def merge(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        local_sizes = [size // len(shards) for size in self.sizes]
        per_rank = [shard.split(local_sizes, dim=self.dim) for shard in shards]
        components = [torch.cat([parts[i] for parts in per_rank], dim=self.dim) for i in range(len(self.sizes))]
        return torch.cat(components, dim=self.dim)


def tp_splits(cfg: ModelConfig) -> dict[str, Split]:
    """Parameter-name suffix -> Split for every sharded parameter of ``cfg``'s model; others are replicated."""
    vocab = Split(0, (cfg.vocab_size,))
    if cfg.arch == "transformer":
        t = cfg.transformer
        head_dim = cfg.d_model // t.n_heads
        q_width, kv_width = t.n_heads * head_dim, t.n_kv_heads * head_dim
        return {
            "model.embed_tokens.weight": vocab,
            "lm_head.weight": vocab,
            "self_attn.q_proj.weight": Split(0, (q_width,)),
            "self_attn.k_proj.weight": Split(0, (kv_width,)),
            "self_attn.v_proj.weight": Split(0, (kv_width,)),
            "self_attn.o_proj.weight": Split(1, (q_width,)),
            "mlp.gate_proj.weight": Split(0, (t.ffn_hidden,)),
            "mlp.up_proj.weight": Split(0, (t.ffn_hidden,)),
            "mlp.down_proj.weight": Split(1, (t.ffn_hidden,)),
        }
    d_inner, heads = cfg.d_inner, cfg.n_mamba_heads
    group_width = cfg.mamba.ngroups * cfg.mamba.d_state
    xbc = (d_inner, group_width, group_width)
    per_head = Split(0, (heads,))
    return {
        "backbone.embeddings.weight": vocab,
        "lm_head.weight": vocab,
        "mixer.in_proj.weight": Split(0, (d_inner, *xbc, heads)),  # Order: [z, x, B, C, dt]
        "mixer.conv1d.weight": Split(0, xbc),
        "mixer.conv1d.bias": Split(0, xbc),
        "mixer.dt_bias": per_head,
        "mixer.A_log": per_head,
        "mixer.D": per_head,
        "mixer.norm.weight": Split(0, (d_inner,)),
        "mixer.out_proj.weight": Split(1, (d_inner,)),
    }


def split_of(name: str, splits: Mapping[str, Split]) -> Split | None:
    """The Split of parameter ``name`` (matched by dotted suffix), or None if it is replicated."""
    for suffix, split in splits.items():
        if name == suffix or name.endswith("." + suffix):
            return split
    return None


def check_tp_config(cfg: ModelConfig, tp_size: int) -> None:
    """Raise one ValueError listing every reason ``cfg`` cannot be split over ``tp_size`` ranks."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"parallel.tp: must be a positive integer, got {tp_size!r}")
    problems = []

    def need_divisible(value: int, field: str, what: str) -> None:
        if value % tp_size:
            problems.append(f"model.{field}: {what} {value} is not divisible by parallel.tp={tp_size}")

    if cfg.vocab_size % tp_size:
        padded = -(-cfg.vocab_size // tp_size) * tp_size
        problems.append(f"model.vocab_size: {cfg.vocab_size} is not divisible by parallel.tp={tp_size}; pad the "
                        f"vocabulary to a multiple of {tp_size} (e.g. {padded}) so every rank holds whole rows")
    if cfg.arch == "transformer":
        need_divisible(cfg.transformer.n_heads, "transformer.n_heads", "the number of query heads")
        need_divisible(cfg.transformer.n_kv_heads, "transformer.n_kv_heads", "the number of key/value heads")
        need_divisible(cfg.transformer.ffn_hidden, "transformer.ffn_hidden", "the MLP width")
    else:
        need_divisible(cfg.n_mamba_heads, "mamba.headdim",
                       f"the number of SSM heads (expand * d_model / headdim = {cfg.d_inner} / {cfg.mamba.headdim})")
        need_divisible(cfg.mamba.ngroups, "mamba.ngroups", "the number of B/C groups (each rank needs whole groups)")
    if problems:
        raise ValueError("tensor parallel: " + "; ".join(problems))


# ---- state dicts: full (TP=1) <-> per-rank shards ----

def shard_state_dict(full: Mapping[str, torch.Tensor], cfg: ModelConfig, tp_size: int, rank: int
                     ) -> dict[str, torch.Tensor]:
    """The state dict of TP rank ``rank`` of ``tp_size``, cut from a full (TP=1) state dict.

    Keys are unchanged; sharded tensors are new tensors, replicated ones are the full dict's own
    tensors (not copies). Works on any subset of the model's keys (e.g. gradients).
    """
    check_tp_config(cfg, tp_size)
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank: must be in [0, {tp_size}), got {rank}")
    splits, shards = tp_splits(cfg), {}
    for name, tensor in full.items():
        split = split_of(name, splits)
        if split is None:
            shards[name] = tensor
            continue
        if tensor.shape[split.dim] != sum(split.sizes):
            raise ValueError(f"{name}: expected a full (TP=1) tensor of size {sum(split.sizes)} along dim "
                             f"{split.dim}, got shape {tuple(tensor.shape)} (already a shard?)")
        shards[name] = split.shard(tensor, tp_size, rank)
    return shards


def merge_state_dicts(shards: Sequence[Mapping[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full (TP=1) state dict from the state dicts of all TP ranks, in rank order.

    Sharded tensors are merged per component (in_proj: z, x, B, C, dt each); replicated tensors
    must be identical on every rank and are taken from rank 0.
    """
    tp_size = len(shards)
    check_tp_config(cfg, tp_size)
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            raise ValueError(f"TP rank {rank}'s state dict has different keys than rank 0's: "
                             f"{sorted(set(shard) ^ set(keys))[:5]}")
    splits, full = tp_splits(cfg), {}
    for name in keys:
        tensors = [shard[name] for shard in shards]
        split = split_of(name, splits)
        if split is None:
            if not all(torch.equal(tensors[0], t) for t in tensors[1:]):
                raise ValueError(f"{name}: replicated parameter differs between TP ranks")
            full[name] = tensors[0]
            continue
        expected = sum(split.sizes) // tp_size
        if any(t.shape[split.dim] != expected for t in tensors):
            raise ValueError(f"{name}: expected TP shards of size {expected} along dim {split.dim}, got shapes "
                             f"{[tuple(t.shape) for t in tensors]}")
        full[name] = split.merge(tensors)
    return full


# ---- the model ----

def parallelize(model: nn.Module, tp_group=None) -> nn.Module:
    """Shard a TP=1 MemMamba / Mamba2 / Transformer model over ``tp_group``, in place; returns it.

    Call after ``parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)`` and
    before activation checkpointing and the DeepSpeed (ZeRO-3) wrap, with the same full model
    (same seed) on every rank of the group. ``tp_group`` defaults to megatron-core's
    tensor-parallel group. With one rank, or without a group (no ``tp_group`` and megatron-core's model
    parallelism not initialised, as at tp=1), the model is returned unchanged and megatron is not imported.

    Afterwards the forward returns this rank's vocabulary slice of the logits, (B, L, V / tp):
    train with ``model(ids, targets=...)`` (the fused vocab-parallel loss) or ``loss_fn`` on those
    logits, gather with ``gather_logits`` where full logits are needed.
    """
    if tp_group is None and tp_world_size() == 1:
        return model
    from megatron.core import parallel_state

    group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
    tp_size, rank = group.size(), group.rank()
    cfg: ModelConfig = model.config
    check_tp_config(cfg, tp_size)
    if tp_size == 1:
        return model

    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    from .parallel_layers import ColumnParallel, RowParallel, VocabParallel, cpu_friendly_config

    splits = tp_splits(cfg)
    local = shard_state_dict(model.state_dict(), cfg, tp_size, rank)
    ties = _tied_parameter_names(model)

    for name, module in list(model.named_modules()):
        split = split_of(f"{name}.weight", splits)
        if split is None:
            continue
        if isinstance(module, LMHead):  # kept: it computes the vocab-parallel loss itself
            module.tp_group = group
            continue
        config = cpu_friendly_config(tp_size, module.weight.dtype)
        if isinstance(module, nn.Embedding):
            replacement = VocabParallel(module.num_embeddings, module.embedding_dim, config, group)
        elif isinstance(module, nn.Linear):
            layer = ColumnParallel if split.dim == 0 else RowParallel
            replacement = layer(module.in_features, module.out_features, config, group)
        elif isinstance(module, nn.Conv1d):
            channels = local[f"{name}.weight"].shape[0]
            # skip_init: no random init (it would advance the global RNG on TP ranks only).
            replacement = torch.nn.utils.skip_init(type(module), channels, module.kernel_size[0],
                                                   dtype=module.weight.dtype)
        else:
            continue  # a plain weight (the gated norm's) is resized with the other bare parameters
        _set_by_name(model, name, replacement)

    for alias, owner in ties.items():  # the tied LM head shares the vocab-parallel embedding's shard
        _set_by_name(model, alias, model.get_parameter(owner))

    for name, param in list(model.named_parameters()):
        split = split_of(name, splits)
        if split is None:
            continue
        dtype = torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMETERS else param.dtype
        if param.shape != local[name].shape or param.dtype != dtype:
            _set_by_name(model, name, nn.Parameter(torch.empty(local[name].shape, dtype=dtype)))

    model.load_state_dict(local, strict=True)
    for name, param in model.named_parameters():
        split = split_of(name, splits)
        if split is not None:
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=split.dim, stride=1)
    return model


def _tied_parameter_names(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under more than one name (a tied LM head)."""
    first_name, ties = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first_name.setdefault(id(param), name)
        if owner != name:
            ties[name] = owner
    return ties


def _set_by_name(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, value)


# ---- loss and logits ----

def tp_world_size() -> int:
    """megatron-core's tensor-parallel size, 1 when model parallelism is not initialised."""
    # Without megatron imported there is no TP group: skip its slow import for TP=1 users.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy in float32, for full logits (TP=1) or vocab-split logits (TP>1).

    Args:
        logits: (B, L, V) at TP=1, this rank's (B, L, V / tp) slice at TP>1.
        labels: (B, L) int64 token ids over the whole vocabulary.
        reduction: "mean" | "sum" over all tokens, or "none" for the (B, L) per-token losses.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected mean, sum or none, got {reduction!r}")
    if tp_world_size() > 1:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # megatron subtracts the max from its input in place: give it a float32 copy, never the caller's logits.
        per_token = vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), labels)
    else:
        per_token = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
        per_token = per_token.view(labels.shape)
    if reduction == "none":
        return per_token
    return per_token.sum() if reduction == "sum" else per_token.mean()


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V / tp) vocab-split logits -> (..., V) on every rank; identity at TP=1.

    Differentiable like megatron's gather_from_tensor_model_parallel_region (each rank keeps the
    gradient of its own slice), which allocates on CUDA and so cannot serve CPU runs.
    """
    if tp_world_size() == 1:
        return logits
    from megatron.core import parallel_state

    return _GatherLastDim.apply(logits, parallel_state.get_tensor_model_parallel_group())


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        pieces = [torch.empty_like(local) for _ in range(group.size())]
        torch.distributed.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.group.size(), dim=-1)[ctx.group.rank()].contiguous(), None
