"""Mamba2 mixer in pure PyTorch, parameter for parameter like HF ``modeling_mamba2.py``.

Reference: Dao & Gu, "Transformers are SSMs" (arXiv 2405.21060); mamba_ssm ``mamba2_simple.py``;
HF ``transformers/models/mamba2/modeling_mamba2.py`` (whose keys and numerics we match exactly:
with the memory off, our model equals ``Mamba2ForCausalLM`` with the same weights).

Tensor-parallel readiness: the forward reads local head/group counts from parameter shapes
(``A_log.shape[0]``, ``conv1d.weight.shape[0]``), never from the config, so sharding the
parameters along heads (model/parallel.py) leaves this code untouched.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Mamba2Config
from .decode import MixerCache
from .ssd import ssd_chunked, ssd_recurrent_step


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, like HF ``Mamba2RMSNorm`` / ``LlamaRMSNorm``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, x.shape[-1], self.eps)


class GatedRMSNorm(nn.Module):
    """norm(y * silu(z)) per group of ``group_size`` channels (HF ``MambaRMSNormGated``)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return rms_norm(y, self.weight, self.group_size, self.eps, gate=z)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
             gate: torch.Tensor | None = None) -> torch.Tensor:
    """weight * h / rms(h) over groups of ``group_size`` channels, h = x * silu(gate) (x without a gate).

    h and its rms are computed in float32 (float64 for float64 x) and the normalised h is cast to
    x's dtype before the weight multiplies it, as HF does (the result has the promoted dtype of x
    and weight).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, gate, weight)):
        return _RMSNorm.apply(x, gate, weight, group_size, eps)
    return _rms_norm_forward(x, gate, weight, group_size, eps)  # decoding: no Function, fewest ops


def _rms_norm_forward(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                      eps: float) -> torch.Tensor:
    """rms_norm's value, through torch's fused rms_norm."""
    h, _ = _gated(x, gate)
    if group_size == h.shape[-1]:
        normed = F.rms_norm(h, (group_size,), eps=eps)
    else:
        normed = F.rms_norm(h.unflatten(-1, (-1, group_size)), (group_size,), eps=eps).flatten(-2)
    return weight * normed.to(x.dtype)


def _gated(x: torch.Tensor, gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h = x * silu(gate), silu(gate)) in float32 (float64 stays), or (x, None) without a gate."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if gate is None:
        return x.to(dtype), None
    gate_act = F.silu(gate.to(dtype))
    return x.to(dtype) * gate_act, gate_act


class _RMSNorm(torch.autograd.Function):
    """rms_norm with a backward that recomputes h a block of tokens at a time.

    Autograd's decomposition of rms_norm (pow, mean, rsqrt, three products, each with its own
    backward) makes about twenty passes over (tokens, channels) per norm; at long lengths each
    is a trip to memory. Here the forward is torch's fused rms_norm, the backward's passes run
    over blocks that stay in cache, and only x, gate and weight are kept for it.
    """

    BLOCK_ELEMENTS = 1 << 17  # 512 KB of float32 per (block, channels) operand

    @staticmethod
    def forward(ctx, x, gate, weight, group_size, eps):
        ctx.save_for_backward(x, gate, weight)
        ctx.group_size, ctx.eps = group_size, eps
        return _rms_norm_forward(x, gate, weight, group_size, eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, weight = ctx.saved_tensors
        shape, channels = x.shape, x.shape[-1]
        x, grad_out = x.reshape(-1, channels), grad_out.reshape(-1, channels)  # (tokens, channels)
        gate = None if gate is None else gate.reshape(-1, channels)
        grad_x = torch.empty_like(x)
        grad_gate = None if gate is None else torch.empty_like(gate)
        grad_weight = torch.zeros(channels, dtype=torch.promote_types(weight.dtype, torch.float32), device=x.device)
        block = max(1, _RMSNorm.BLOCK_ELEMENTS // channels)
        for start in range(0, x.shape[0], block):
            part = slice(start, start + block)
            h, gate_act = _gated(x[part], None if gate is None else gate[part])
            grouped = h.unflatten(-1, (-1, ctx.group_size))
            inv_rms = torch.rsqrt(grouped.square().mean(-1, keepdim=True) + ctx.eps)
            normed = grouped * inv_rms
            grad = grad_out[part].to(normed.dtype)
            grad_weight += (grad * normed.flatten(-2).to(x.dtype)).sum(0)
            grad_normed = (grad * weight.to(normed.dtype)).view_as(normed)
            # d(h * inv_rms) = inv_rms * (dn - n * mean(dn * n)) per group.
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_h = torch.addcmul(grad_normed, normed, dot, value=-1).mul_(inv_rms).flatten(-2)
            if gate is None:
                grad_x[part] = grad_h
            else:
                grad_x[part] = grad_h * gate_act
                grad_gate[part] = torch.ops.aten.silu_backward(grad_h.mul_(x[part]), gate[part].to(h.dtype))
        return (grad_x.view(shape), None if gate is None else grad_gate.view(shape), grad_weight.to(weight.dtype),
                None, None)


class _CausalDepthwiseConv(torch.autograd.Function):
    """out_t = bias + sum_k weight[:, k] * x_{t-K+1+k} over x (B, L, C), weight (C, K), bias (C,).

    Works in the (B, L, C) layout of in_proj's output: nn.Conv1d needs (B, C, L), and the two
    strided transposes around it cost more than the convolution itself at long lengths. Tap k
    reads x shifted by K-1-k tokens, so each tap is one multiply-add over overlapping slices;
    nothing is padded (a zero-padded copy of x costs as much as a tap). With ``seq_idx`` (B, L)
    a tap reads x_s only when s is in t's document (model/documents.py).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx):
        ctx.save_for_backward(x, weight, seq_idx)
        out = torch.addcmul(bias, x, weight[:, -1])
        for k, shift in _shifted_taps(weight.shape[1], x.shape[1]):
            out[:, shift:].addcmul_(_within_document(x[:, :-shift], shift, seq_idx), weight[:, k])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, seq_idx = ctx.saved_tensors
        # x_s feeds out_{s+shift} through weight[:, k].
        grad_x = grad_out * weight[:, -1]
        grad_weight = torch.zeros_like(weight)
        grad_weight[:, -1] = torch.linalg.vecdot(x, grad_out, dim=1).sum(0)
        for k, shift in _shifted_taps(weight.shape[1], x.shape[1]):
            later = _within_document(grad_out[:, shift:], shift, seq_idx)
            grad_x[:, :-shift].addcmul_(later, weight[:, k])
            grad_weight[:, k] = torch.linalg.vecdot(x[:, :-shift], later, dim=1).sum(0)
        return grad_x, grad_weight, grad_out.sum((0, 1)), None


def _within_document(pairs: torch.Tensor, shift: int, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """A tap's operand (B, L - shift, C), row s pairing tokens s and s + shift (x_{t - shift} in the
    forward, grad_{s + shift} in the backward), zeroed where the two are in different documents."""
    if seq_idx is None:
        return pairs
    return pairs * (seq_idx[:, shift:] == seq_idx[:, :-shift]).unsqueeze(-1).to(pairs.dtype)


def _shifted_taps(width: int, seqlen: int) -> list[tuple[int, int]]:
    """(tap k, its shift K-1-k) for the taps that reach back into a sequence of seqlen tokens."""
    return [(k, width - 1 - k) for k in range(width - 1) if width - 1 - k < seqlen]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv: x (B, L, C), weight (C, K), bias (C,) -> (B, L, C); with ``seq_idx``
    (B, L) document indices, no tap reads across a document boundary."""
    return _CausalDepthwiseConv.apply(x, weight, bias, seq_idx)


class CausalConv1d(nn.Conv1d):
    """Depthwise causal conv over (B, L, C); parameters are nn.Conv1d's (HF ``conv1d`` layout)."""

    def __init__(self, channels: int, width: int, device=None, dtype=None):
        super().__init__(channels, channels, width, groups=channels, padding=width - 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        return causal_conv1d(x, self.weight[:, 0], self.bias, seq_idx)


class Mamba2Mixer(nn.Module):
    """in_proj -> causal conv1d over x|B|C -> SSD scan -> gated RMSNorm -> out_proj."""

    def __init__(self, d_model: int, cfg: Mamba2Config, norm_eps: float, n_layers: int):
        super().__init__()
        d_inner = cfg.expand * d_model
        nheads = d_inner // cfg.headdim
        conv_dim = d_inner + 2 * cfg.ngroups * cfg.d_state
        self.headdim, self.d_state, self.chunk_size = cfg.headdim, cfg.d_state, cfg.chunk_size
        # Order: [z, x, B, C, dt] with widths [d_inner, d_inner, G*N, G*N, H]; conv1d runs over x|B|C.
        self.in_proj = nn.Linear(d_model, d_inner + conv_dim + nheads, bias=False)
        self.conv1d = CausalConv1d(conv_dim, cfg.d_conv)
        # A_log, D and dt_bias stay float32 under bf16 (see DESIGN.md §5).
        self.dt_bias = nn.Parameter(torch.empty(nheads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(nheads, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(nheads, dtype=torch.float32))
        self.norm = GatedRMSNorm(d_inner, d_inner // cfg.ngroups, norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.ssd_fn = ssd_chunked  # swapped for the Triton scan by model/kernels on CUDA
        self.reset_parameters(n_layers)

    @torch.no_grad()
    def reset_parameters(self, n_layers: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """HF/mamba_ssm initialisation: A = 1..H, D = 1, dt log-uniform in [dt_min, dt_max]."""
        nheads = self.A_log.shape[0]
        self.A_log.copy_(torch.log(torch.arange(1, nheads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        nn.init.normal_(self.in_proj.weight, std=0.02)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight.div_(math.sqrt(n_layers))  # GPT-2 residual scaling
        nn.init.zeros_(self.conv1d.bias)

    def _split_sizes(self) -> tuple[int, int, int, int]:
        """Local (d_inner, conv_dim, nheads, ngroups), read from parameter shapes for TP."""
        nheads = self.A_log.shape[0]
        d_inner = nheads * self.headdim
        conv_dim = self.conv1d.weight.shape[0]
        ngroups = (conv_dim - d_inner) // (2 * self.d_state)
        return d_inner, conv_dim, nheads, ngroups

    def forward(self, u: torch.Tensor, cache: MixerCache | None = None, seq_idx: torch.Tensor | None = None
                ) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D). With ``cache``, also store the final conv and SSM states. With
        ``seq_idx`` (B, L) document indices, nothing passes from one document to the next."""
        batch, seqlen, _ = u.shape
        d_inner, conv_dim, nheads, ngroups = self._split_sizes()
        z, xbc, dt = self.in_proj(u).split([d_inner, conv_dim, nheads], dim=-1)
        if cache is not None:
            width = cache.conv_state.shape[-1]
            tail = xbc[:, -width:]  # (B, <= d_conv-1, conv_dim): the window the next token's conv reads
            if seq_idx is not None:  # only the last document's inputs
                tail = tail * (seq_idx[:, -tail.shape[1]:] == seq_idx[:, -1:]).unsqueeze(-1)
            cache.conv_state.zero_()[..., width - tail.shape[1]:].copy_(tail.transpose(1, 2))
        xbc = self.conv1d(xbc, seq_idx)  # (B, L, conv_dim)
        x, B, C = F.silu(xbc).split([d_inner, ngroups * self.d_state, ngroups * self.d_state], dim=-1)
        y, final_state = self.ssd_fn(
            x.view(batch, seqlen, nheads, self.headdim),  # (B, L, H, P)
            F.softplus(dt + self.dt_bias),  # (B, L, H)
            -torch.exp(self.A_log.float()),  # (H,)
            B.view(batch, seqlen, ngroups, self.d_state),  # (B, L, G, N)
            C.view(batch, seqlen, ngroups, self.d_state),
            self.chunk_size,
            D=self.D,
            seq_idx=seq_idx,
        )
        if cache is not None:
            cache.ssm_state.copy_(final_state)
        return self.out_proj(self.norm(y.reshape(batch, seqlen, d_inner), z))

    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> MixerCache:
        d_inner, conv_dim, nheads, _ = self._split_sizes()
        width = self.conv1d.weight.shape[-1] - 1
        return MixerCache(
            conv_state=torch.zeros(batch_size, conv_dim, width, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, nheads, self.headdim, self.d_state, device=device,
                                  dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        )

    def step(self, u: torch.Tensor, cache: MixerCache) -> torch.Tensor:
        """One token: u (B, D) -> (B, D), updating ``cache`` in place."""
        batch = u.shape[0]
        d_inner, conv_dim, nheads, ngroups = self._split_sizes()
        z, xbc, dt = self.in_proj(u).split([d_inner, conv_dim, nheads], dim=-1)
        window = torch.cat([cache.conv_state, xbc.unsqueeze(-1)], dim=-1)  # (B, conv_dim, d_conv)
        cache.conv_state.copy_(window[..., 1:])
        xbc = (window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias
        x, B, C = F.silu(xbc).split([d_inner, ngroups * self.d_state, ngroups * self.d_state], dim=-1)
        y = ssd_recurrent_step(
            x.view(batch, nheads, self.headdim),
            F.softplus(dt + self.dt_bias),
            -torch.exp(self.A_log.float()),
            B.view(batch, ngroups, self.d_state),
            C.view(batch, ngroups, self.d_state),
            cache.ssm_state,
            D=self.D,
        )
        return self.out_proj(self.norm(y.reshape(batch, d_inner), z))
