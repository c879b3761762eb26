"""Memory-efficient LM loss: the LM head and cross-entropy fused, a slice of tokens at a time.

At 16k tokens and a 32k vocabulary the full float32 logits take 2 GB, and ``F.cross_entropy``
keeps another 2 GB of log-probabilities for the backward pass. ``chunked_lm_loss`` never holds
more than ``chunk_tokens`` rows of logits: it computes the loss and, in the same pass, the
gradients with respect to the hidden states and the head weight (softmax - one_hot), which the
backward pass then only scales. Same result as ``F.cross_entropy(hidden @ weight.T, targets)``.

Under tensor parallelism the head weight is split over the vocabulary (rank r holds rows
r*V/tp ..). Each slice's log-sum-exp and target logit are then reduced over the TP group, as
megatron's ``vocab_parallel_cross_entropy`` does for full logits, and the hidden-state gradient
(a partial sum over this rank's vocabulary rows) is all-reduced once at the end, as
ColumnParallelLinear's backward would.

``LMHead`` is the models' head module: its forward gives logits, or with targets this loss.
The loss has to run inside a module's forward: ZeRO-3 gathers a partitioned weight only there.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS_CHUNK_TOKENS = 1024
"""Tokens per slice: 1024 x 32k float32 logits are 128 MB, and the head's matmuls stay large."""


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_tokens: int, tp_group):
        keep = targets != ignore_index
        count = keep.sum().clamp_min(1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # Matmuls in the autocast dtype (bf16 training) or the inputs' own; every reduction in float32.
        matmul_dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                        else torch.promote_types(hidden.dtype, weight.dtype))
        acc_dtype = torch.promote_types(matmul_dtype, torch.float32)  # float32, or float64 for float64
        with torch.autocast(hidden.device.type, enabled=False):
            head = weight.to(matmul_dtype)
            local_vocab = head.shape[0]
            vocab_start = 0 if tp_group is None else tp_group.rank() * local_vocab
            # Gradients of the mean: each kept token's (softmax - one_hot) / count.
            token_scale = keep.to(acc_dtype) / count
            grad_hidden = torch.empty(hidden.shape, dtype=acc_dtype, device=hidden.device) if need_grad else None
            grad_weight = torch.zeros(head.shape, dtype=acc_dtype, device=head.device) if need_grad else None
            total = hidden.new_zeros((), dtype=acc_dtype)
            for start in range(0, hidden.shape[0], chunk_tokens):
                part = slice(start, start + chunk_tokens)
                h, k = hidden[part].to(matmul_dtype), token_scale[part]
                logits = (h @ head.T).to(acc_dtype)  # (c, V / tp)
                local_target = targets[part] - vocab_start
                here = (local_target >= 0) & (local_target < local_vocab)  # this rank holds the target's row
                rows, column = here.nonzero().squeeze(1), local_target[here]
                peak = logits.amax(dim=-1)
                picked = torch.zeros_like(peak)
                picked[rows] = logits[rows, column]
                _all_reduce(peak, tp_group, torch.distributed.ReduceOp.MAX)
                # Softmax in place with one exp (these passes over c x V are what costs besides the matmuls).
                probs = logits.sub_(peak.unsqueeze(1)).exp_()
                sums_picked = torch.stack([probs.sum(dim=-1), picked])  # one all-reduce for both
                _all_reduce(sums_picked, tp_group)
                sums, picked = sums_picked
                total += ((peak + sums.log() - picked) * k).sum()
                if not need_grad:
                    continue
                grad_logits = probs.mul_((k / sums).unsqueeze(1))  # (softmax - one_hot) * k, one_hot below
                grad_logits[rows, column] -= k[rows]
                grad_hidden[part] = grad_logits.to(matmul_dtype) @ head
                grad_weight += (grad_logits.to(matmul_dtype).T @ h).to(acc_dtype)
        if need_grad:
            _all_reduce(grad_hidden, tp_group)  # the hidden states feed every rank's slice of the head
            ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def _all_reduce(tensor: torch.Tensor, group, op=None) -> None:
    """In-place all-reduce over ``group`` (sum unless ``op``); nothing without a group."""
    if group is not None:
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM, group=group)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    chunk_tokens: int = LOSS_CHUNK_TOKENS, tp_group=None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` without materialising all logits.

    Args:
        hidden: (B, L, D) final (normed) hidden states; weight: (V, D) LM head weight, or this rank's
        (V / tp, D) rows of it under ``tp_group``; targets: (B, L) int64 target ids over the whole
        vocabulary, ``ignore_index`` where no loss is taken.

    Returns:
        Scalar loss (float32; float64 for float64 inputs), differentiable with respect to ``hidden``
        and ``weight``; the same on every rank of ``tp_group``.
    """
    if tp_group is not None and tp_group.size() == 1:
        tp_group = None
    return _ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.flatten(), ignore_index,
                                            chunk_tokens, tp_group)


class LMHead(nn.Linear):
    """The LM head (no bias): ``head(hidden)`` gives logits, ``head(hidden, targets)`` the mean loss
    through ``chunked_lm_loss``. ``model.parallel.parallelize`` leaves it in place with its weight
    cut to this rank's vocabulary rows and sets ``tp_group``; the logits then stay split, (..., V / tp)."""

    tp_group = None
    chunk_tokens = LOSS_CHUNK_TOKENS

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:
            return chunked_lm_loss(hidden, self.weight, targets, chunk_tokens=self.chunk_tokens, tp_group=self.tp_group)
        if self.tp_group is not None:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)  # all-reduced grad
        return F.linear(hidden, self.weight)
