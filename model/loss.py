"""Memory-efficient LM loss: the LM head and cross-entropy fused, a slice of tokens at a time.

At 16k tokens and a 32k vocabulary the full float32 logits take 2 GB, and ``F.cross_entropy``
keeps another 2 GB of log-probabilities for the backward pass. ``chunked_lm_loss`` never holds
more than ``chunk_tokens`` rows of logits: it computes the loss and, in the same pass, the
gradients with respect to the hidden states and the head weight (softmax - one_hot), which the
backward pass then only scales. Same result as ``F.cross_entropy(hidden @ weight.T, targets)``.
"""

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_tokens: int):
        keep = targets != ignore_index
        count = keep.sum().clamp_min(1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64
        # Gradients of the mean: each kept token's (softmax - one_hot) / count.
        token_scale = keep.to(acc_dtype) / count
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = None  # (V, D), started by the first slice's matmul (no zero fill of a V x D tensor)
        total = hidden.new_zeros((), dtype=acc_dtype)
        for start in range(0, hidden.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            h, t, k = hidden[part], targets[part], token_scale[part]
            logits = (h @ weight.T).to(acc_dtype)  # (c, V)
            rows, target = torch.arange(len(t), device=t.device), t.clamp_min(0)
            picked = logits[rows, target]
            if not need_grad:
                total += ((torch.logsumexp(logits, dim=-1) - picked) * k).sum()
                continue
            # Softmax in place with one exp (these passes over c x V are what costs besides the matmuls).
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            total += ((peak.squeeze(1) + sums.squeeze(1).log() - picked) * k).sum()
            grad_logits = probs.mul_(k.unsqueeze(1) / sums)  # (softmax - one_hot) * k, one_hot below
            grad_logits[rows, target] -= k
            grad_hidden[part] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is None:
                grad_weight = grad_logits.T @ h.to(acc_dtype)
            else:
                grad_weight.addmm_(grad_logits.T, h.to(acc_dtype))
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` without materialising all logits.

    Args:
        hidden: (B, L, D) final (normed) hidden states; weight: (V, D) LM head weight;
        targets: (B, L) int64 target ids, ``ignore_index`` where no loss is taken.

    Returns:
        Scalar loss (float32; float64 for float64 inputs), differentiable with respect to ``hidden`` and ``weight``.
    """
    return _ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.flatten(), ignore_index,
                                            chunk_tokens)
