"""Curriculum by tokens seen and the token-driven learning rate."""

from __future__ import annotations

import math

import pytest

from pretrain.config import CurriculumConfig, CurriculumStage, OptimizerConfig, TrainConfig
from pretrain.schedule import learning_rate, stage_index, step_shape

STAGES = [CurriculumStage(0, 256), CurriculumStage(10_000, 512), CurriculumStage(30_000, 1024)]


def run_schedule(curriculum: CurriculumConfig, train: TrainConfig, dp: int) -> list[tuple[int, int, int]]:
    """(tokens seen before the step, seq_len, tokens of the step) for every step of a run."""
    steps, tokens = [], 0
    while tokens < train.max_tokens:
        shape = step_shape(curriculum, train, tokens, dp)
        steps.append((tokens, shape.seq_len, shape.tokens))
        tokens += shape.tokens
    return steps


def test_seq_len_follows_stages_by_tokens_seen():
    curriculum = CurriculumConfig(stages=STAGES)
    train = TrainConfig(max_tokens=60_000, global_batch_size=8, micro_batch_size=2)
    for tokens, seq_len, step_tokens in run_schedule(curriculum, train, dp=2):
        expected = 256 if tokens < 10_000 else 512 if tokens < 30_000 else 1024
        assert seq_len == expected
        assert step_tokens == 8 * seq_len  # batch fixed in sequences: tokens per step grow
    assert [stage_index(curriculum, t) for t in (0, 9_999, 10_000, 29_999, 30_000, 10**9)] == [0, 0, 1, 1, 2, 2]


def test_constant_tokens_per_step_shrinks_the_batch():
    curriculum = CurriculumConfig(stages=STAGES, constant_tokens_per_step=True)
    train = TrainConfig(max_tokens=60_000, global_batch_size=16, micro_batch_size=4)
    shapes = [step_shape(curriculum, train, t, dp_size=2) for t in (0, 10_000, 30_000)]
    assert [(s.seq_len, s.global_batch, s.micro_batch, s.grad_accum) for s in shapes] == [
        (256, 16, 4, 2), (512, 8, 2, 2), (1024, 4, 1, 2)]
    assert {s.tokens for s in shapes} == {4096}
    steps = run_schedule(curriculum, train, dp=2)
    assert {step_tokens for _, _, step_tokens in steps} == {4096}


def test_warmup_then_cosine_to_min_lr():
    opt = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_tokens=1000, decay="cosine")
    assert learning_rate(opt, 0, 11_000) == 0.0
    assert learning_rate(opt, 500, 11_000) == pytest.approx(5e-4)
    assert learning_rate(opt, 1000, 11_000) == pytest.approx(1e-3)
    assert learning_rate(opt, 6000, 11_000) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way: cos = 0
    assert learning_rate(opt, 11_000, 11_000) == pytest.approx(1e-4)
    assert learning_rate(opt, 50_000, 11_000) == pytest.approx(1e-4)  # clamped past the end
    lrs = [learning_rate(opt, t, 11_000) for t in range(1000, 11_001, 500)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_linear_and_constant_decay():
    linear = OptimizerConfig(lr=1.0, min_lr=0.0, warmup_tokens=0, decay="linear")
    assert [learning_rate(linear, t, 100) for t in (0, 25, 50, 100)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    constant = OptimizerConfig(lr=2.0, min_lr=0.0, warmup_tokens=10, decay="constant")
    assert [learning_rate(constant, t, 100) for t in (5, 10, 99)] == pytest.approx([1.0, 2.0, 2.0])


def test_lr_depends_on_tokens_only_with_or_without_curriculum():
    """The same token count gets the same LR whether or not the sequence length changed on the way."""
    opt = OptimizerConfig(lr=1e-3, min_lr=1e-5, warmup_tokens=4096, decay="cosine")
    train = TrainConfig(max_tokens=65_536, global_batch_size=8, micro_batch_size=2)
    fixed = run_schedule(CurriculumConfig(stages=[CurriculumStage(0, 256)]), train, dp=1)
    curriculum = run_schedule(CurriculumConfig(stages=[CurriculumStage(0, 256), CurriculumStage(16_384, 1024)]),
                              train, dp=1)
    assert {s for _, s, _ in curriculum} == {256, 1024} and len(curriculum) < len(fixed)
    fixed_lr = {tokens: learning_rate(opt, tokens, train.max_tokens) for tokens, _, _ in fixed}
    shared = [tokens for tokens, _, _ in curriculum if tokens in fixed_lr]
    assert len(shared) == len(curriculum)  # every step boundary of the curriculum run is one of the fixed run
    for tokens in shared:
        assert learning_rate(opt, tokens, train.max_tokens) == fixed_lr[tokens]
    assert not math.isclose(learning_rate(opt, shared[-1], train.max_tokens), opt.lr)


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
    opt = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_tokens=1000, decay="wsd", wsd_decay_fraction=0.25)
    total = 20_000  # decay over the last 5,000 tokens
    assert learning_rate(opt, 500, total) == pytest.approx(5e-4)  # warm-up as the others
    assert learning_rate(opt, 1000, total) == pytest.approx(1e-3)  # stable from the end of warm-up ...
    assert learning_rate(opt, 14_999, total) == pytest.approx(1e-3)  # ... to the start of the decay
    assert learning_rate(opt, 15_000, total) == pytest.approx(1e-3)
    assert learning_rate(opt, 17_500, total) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # linear: half-way
    assert learning_rate(opt, 20_000, total) == pytest.approx(1e-4)
    assert learning_rate(opt, 30_000, total) == pytest.approx(1e-4)
    everything = OptimizerConfig(lr=1.0, min_lr=0.0, warmup_tokens=100, decay="wsd", wsd_decay_fraction=1.0)
    assert learning_rate(everything, 100, 1100) == pytest.approx(1.0)  # the decay never starts inside warm-up
    assert learning_rate(everything, 600, 1100) == pytest.approx(0.5)
