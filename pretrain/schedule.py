"""Sequence-length curriculum and learning-rate schedule, both driven by tokens seen (DESIGN.md §3).

Driving the learning rate by tokens rather than steps keeps it independent of the curriculum:
a run whose steps grow from 256 to 1024 tokens per sequence has the same learning rate after
N tokens as a run at a fixed length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import CurriculumConfig, OptimizerConfig, TrainConfig


def stage_index(curriculum: CurriculumConfig, tokens_seen: int) -> int:
    """Index of the last stage whose start (in tokens) has been reached."""
    index = 0
    for i, stage in enumerate(curriculum.stages):
        if tokens_seen >= stage.tokens:
            index = i
    return index


def learning_rate(opt: OptimizerConfig, tokens_seen: int, total_tokens: int) -> float:
    """Linear warm-up to opt.lr over opt.warmup_tokens, then decay to opt.min_lr at total_tokens.

    wsd (warmup-stable-decay, MiniCPM's schedule) holds opt.lr until the last wsd_decay_fraction of
    total_tokens (never before the warm-up ends), then decays linearly. A stable-phase checkpoint can
    thus be branched off (`--init-from`) into a decay of its own, e.g. at a longer context (docs/schedules.md).
    """
    if tokens_seen < opt.warmup_tokens:
        return opt.lr * tokens_seen / opt.warmup_tokens
    decay_start = opt.warmup_tokens
    if opt.decay == "wsd":
        decay_start = max(opt.warmup_tokens, total_tokens - round(opt.wsd_decay_fraction * total_tokens))
    if opt.decay == "constant" or total_tokens <= decay_start or tokens_seen < decay_start:
        return opt.lr
    progress = min(1.0, (tokens_seen - decay_start) / (total_tokens - decay_start))
    if opt.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear, wsd
        shape = 1.0 - progress
    return opt.min_lr + (opt.lr - opt.min_lr) * shape


@dataclass(frozen=True)
class StepShape:
    """What one optimizer step consumes at the current curriculum stage."""

    stage: int
    seq_len: int
    global_batch: int
    """Sequences over all data-parallel ranks."""
    micro_batch: int
    """Sequences per rank per forward pass."""
    grad_accum: int
    """Forward/backward passes per rank per step."""

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len


def step_shape(curriculum: CurriculumConfig, train: TrainConfig, tokens_seen: int, dp_size: int) -> StepShape:
    """Batch layout of the step that starts after `tokens_seen` tokens, on `dp_size` data-parallel ranks.

    With constant_tokens_per_step the global and micro batch shrink by first_seq_len / seq_len, so
    every step holds the same number of tokens and the same number of micro-batches.
    """
    stage = stage_index(curriculum, tokens_seen)
    seq_len = curriculum.stages[stage].seq_len
    global_batch, micro_batch = train.global_batch_size, train.micro_batch_size
    if curriculum.constant_tokens_per_step:
        base = curriculum.stages[0].seq_len
        global_batch = global_batch * base // seq_len
        micro_batch = micro_batch * base // seq_len
    return StepShape(stage=stage, seq_len=seq_len, global_batch=global_batch, micro_batch=micro_batch,
                     grad_accum=global_batch // (micro_batch * dp_size))
