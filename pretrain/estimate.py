"""`--dry-run`: parameters, the memory's reach and a per-GPU memory estimate, from a model built on the meta device.

The estimate is arithmetic, not a measurement; its terms (bytes per GPU) are:

- model states, ZeRO-3: every parameter keeps an fp32 copy, an fp32 gradient and two fp32 Adam
  moments (16 bytes; with bf16 autocast the parameters stay fp32, see trainer.deepspeed_config),
  split over the tensor-parallel group (sharded weights only) and then over data-parallel ranks;
- gathered weights: ZeRO-3 materialises about two blocks' full weights at a time (current + prefetch);
- activations of the largest micro-batch of the curriculum (micro_batch * seq_len tokens), from
  the tensors a block saves for backward (counted per architecture below), or only the block
  inputs plus one block's worth with activation checkpointing;
- loss: the fused LM loss (model/loss.py) holds one slice of LOSS_CHUNK_TOKENS x vocab / tp fp32
  logits at a time, plus the gradients it computes up front: (tokens, d_model) for the hidden
  states and (vocab / tp, d_model) for the head weight, both fp32.

It leaves out allocator fragmentation, communication buffers and the CUDA context (~1-2 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import build_model
from model.config import ModelConfig, memory_reach_tokens
from model.loss import LOSS_CHUNK_TOKENS
from model.parallel import split_of, tp_splits

from .config import RunConfig
from .schedule import step_shape

GB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    parameters_per_gpu: int
    model_states_gb: float
    gathered_weights_gb: float
    activations_gb: float
    loss_gb: float
    micro_batch_tokens: int

    @property
    def total_gb(self) -> float:
        return self.model_states_gb + self.gathered_weights_gb + self.activations_gb + self.loss_gb


def activation_elements_per_token_per_layer(cfg: ModelConfig) -> int:
    """Elements one block keeps for backward per token (before tensor parallelism)."""
    d = cfg.d_model
    if cfg.arch == "transformer":
        t = cfg.transformer
        kv = 2 * d * t.n_kv_heads // t.n_heads
        # norm in/out, q|k|v, attention out, o-proj out, norm 2, gate|up, activation, down out
        return 2 * d + (d + kv) + d + d + d + 2 * t.ffn_hidden + t.ffn_hidden + d
    m = cfg.mamba
    e, groups_state = cfg.d_inner, 2 * m.ngroups * m.d_state
    heads = cfg.n_mamba_heads
    # norm in/out, in_proj out [z, x, B, C, dt], conv out, SSD output, gated norm in/out, out_proj out
    elements = 2 * d + (2 * e + groups_state + heads) + (e + groups_state) + e + 2 * e + d
    if cfg.memory_enabled:
        mem = cfg.memory
        # score, pooled y, note summary, attention output and gate, fusion output
        elements += 1 + e + mem.summary_dim + mem.summary_dim + 1 + d
    return elements


def estimate(cfg: RunConfig, world_size: int) -> MemoryEstimate:
    tp = cfg.parallel.tp
    dp = world_size // tp
    with torch.device("meta"):
        model = build_model(cfg.model)
    unique = {id(p): (name, p) for name, p in model.named_parameters()}.values()
    total = sum(p.numel() for _, p in unique)
    splits = tp_splits(cfg.model)  # what tensor parallelism splits (DESIGN.md §5); norms and memory are replicated
    sharded = sum(p.numel() for name, p in unique if split_of(name, splits) is not None)
    per_gpu = (total - sharded) + sharded // tp

    act_bytes = 4 if cfg.deepspeed.precision == "fp32" else 2  # "auto" means bf16 on the GPUs estimated for
    shapes = [step_shape(cfg.curriculum, cfg.train, stage.tokens, dp) for stage in cfg.curriculum.stages]
    tokens = max(s.micro_batch * s.seq_len for s in shapes)
    per_layer = activation_elements_per_token_per_layer(cfg.model) * tokens * act_bytes / tp
    if cfg.deepspeed.activation_checkpointing:
        activations = cfg.model.n_layers * tokens * cfg.model.d_model * 4 + per_layer
    else:
        activations = cfg.model.n_layers * per_layer
    vocab, d_model = cfg.model.vocab_size / tp, cfg.model.d_model
    loss = (min(tokens, LOSS_CHUNK_TOKENS) * vocab + tokens * d_model + vocab * d_model) * 4
    states = 0.0 if cfg.deepspeed.offload_optimizer else 16 * per_gpu / (dp if cfg.deepspeed.zero_stage == 3 else 1)
    gathered = 2 * 4 * per_gpu / cfg.model.n_layers
    return MemoryEstimate(parameters=total, parameters_per_gpu=per_gpu, model_states_gb=states / GB,
                          gathered_weights_gb=gathered / GB, activations_gb=activations / GB, loss_gb=loss / GB,
                          micro_batch_tokens=tokens)


def memory_reach_line(cfg: ModelConfig) -> str:
    """How far back the MemMamba memory reaches (``model.config.memory_reach_tokens``), as one line."""
    if not cfg.memory_enabled:
        return f"memory: none ({cfg.arch}{' with memory.enabled false' if cfg.arch == 'memmamba' else ''})"
    mem, chunk = cfg.memory, cfg.mamba.chunk_size
    reach = memory_reach_tokens(cfg)
    if mem.eviction == "fifo":
        chunks, full, rest = reach // chunk, mem.pool_size // mem.notes_per_chunk, mem.pool_size % mem.notes_per_chunk
        partial = f" (all notes of the last {full}, the {rest} newest of the one before)" if rest else ""
        return (f"memory reach: fifo pool of {mem.pool_size} notes, {mem.notes_per_chunk} per {chunk}-token chunk "
                f"-> {reach:,} tokens: a token reads the notes of the {chunks} chunks before its own{partial}, "
                f"older ones are evicted (chunks writing fewer than {mem.notes_per_chunk} notes make them last longer)")
    if mem.eviction == "priority" and reach is None:
        return (f"memory reach: priority pool of {mem.pool_size} notes -> a note stays until {mem.pool_size} "
                f"higher-scored notes replace it (not capped by distance)")
    raise NotImplementedError(f"memory_reach_line: no description for model.memory.eviction {mem.eviction!r}")


def report(cfg: RunConfig, world_size: int) -> str:
    e = estimate(cfg, world_size)
    tp = cfg.parallel.tp
    return "\n".join([
        f"dry run: {cfg.model.arch}, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, "
        f"vocab {cfg.model.vocab_size}",
        f"parameters: {e.parameters:,} total, {e.parameters_per_gpu:,} per GPU at tp={tp}",
        memory_reach_line(cfg.model),
        (f"documents: state, conv and memory pool reset after every EOD (token {cfg.model.eod_token_id})"
         if cfg.model.reset_at_eod else "documents: no reset at EOD (model.reset_at_eod false): packed documents "
         "see each other"),
        f"world size {world_size} = tp {tp} x dp {world_size // tp}, ZeRO stage {cfg.deepspeed.zero_stage}, "
        f"largest micro-batch {e.micro_batch_tokens:,} tokens",
        f"per-GPU memory estimate: {e.total_gb:.2f} GB = model states {e.model_states_gb:.2f} + gathered weights "
        f"{e.gathered_weights_gb:.2f} + activations {e.activations_gb:.2f} + loss {e.loss_gb:.2f} "
        f"(+ ~1-2 GB CUDA context and buffers)",
    ])
