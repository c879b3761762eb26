"""Model FLOPs per token and the peak FLOP/s they are divided by, for the MFU in the training logs.

``model_flops_per_token(cfg, seq_len)`` is arithmetic on the config (no model is built), checked
against ``torch.utils.flop_counter.FlopCounterMode`` on the reference model in
tests/pretrain/test_flops.py. ``peak_flops_per_second(device, configured_tflops)`` says what one
device can do and where that figure came from; ``mfu`` divides the two.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, fields

import torch

from model.config import ModelConfig

TRAIN_FACTOR = 3
"""Training FLOPs = 3 x forward: the backward computes two matmuls (input and weight gradients) for
every forward one (the Megatron-LM / PaLM MFU convention). Recomputation (the SSD diagonal blocks'
backward, activation checkpointing) is not model work and is not counted."""


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token of one forward pass, per component, summed over layers (see
    ``model_flops_per_token`` for the formula of each). Components of other architectures are 0."""

    in_proj: float = 0.0
    conv1d: float = 0.0
    ssd_scores: float = 0.0
    ssd_diagonal: float = 0.0
    ssd_chunk_state: float = 0.0
    ssd_state_output: float = 0.0
    out_proj: float = 0.0
    memory_write: float = 0.0
    memory_read: float = 0.0
    memory_cross_layer: float = 0.0
    memory_out: float = 0.0
    attn_proj: float = 0.0
    attention: float = 0.0
    mlp: float = 0.0
    lm_head: float = 0.0

    @property
    def forward(self) -> float:
        return sum(self.terms().values())

    @property
    def train(self) -> float:
        """Forward + backward (``TRAIN_FACTOR`` x forward)."""
        return TRAIN_FACTOR * self.forward

    @property
    def ssd(self) -> float:
        """The chunked scan's four matmul terms together."""
        return self.ssd_scores + self.ssd_diagonal + self.ssd_chunk_state + self.ssd_state_output

    def terms(self) -> dict[str, float]:
        """The nonzero components, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopCount:
    """Forward FLOPs per token of a ``seq_len``-token sample (one document per sample).

    Every matmul and einsum counts 2 FLOPs per multiply-accumulate; elementwise work (norms,
    activations, gates, decays, softmax, RoPE, the D skip, the inter-chunk state update) is left
    out. Embeddings are lookups and cost nothing. Use ``.train`` (3 x forward) for MFU.

    Notation: D d_model, V vocab, E = expand*D, H = E/P heads of P channels, N d_state, G groups,
    K d_conv, c chunk_size; the scan and the memory run on whole chunks, so with n_c = ceil(L/c)
    the padding factor is f = n_c*c/L (1 when c divides L, as training requires). Memory: S
    summary_dim, k notes_per_chunk, M pool_size; layer i (0-based) is a cross-layer layer when
    i > 0 and (i+1) % cross_layer_every == 0, and then reads the i pools before it.
    Transformer: Hq, Hkv heads of hd = D/Hq channels, F ffn_hidden.

    ================== ===================================== =====================================
    term               FLOPs per token, per layer            what
    ================== ===================================== =====================================
    in_proj            2 D (2E + 2GN + H)                    [z, x, B, C, dt]
    conv1d             2 K (E + 2GN)                         depthwise causal conv over x|B|C
    ssd_scores         2 G N c f                             C B^T of each (c x c) diagonal block
    ssd_diagonal       2 E c f                               (decay * scores) @ x_dt, per head
    ssd_chunk_state    2 E N f                               state leaving a chunk: x_dt^T B
    ssd_state_output   2 E N f                               state entering it, read: C state
    out_proj           2 E D
    memory_write       4 D + (2 w D S + 4 S^2) k f / c       s_t and score_state_t per token; per
                                                             chunk k notes W_n pool(y), projected
                                                             to keys|values once (w pool_window
                                                             for pooling concat, else 1)
    memory_read        2 D S + 4 M S f                       query; q k^T and p v over all M slots
    memory_cross_layer 2 D S + i (4 S^2 k / c + 4 M S) f     cross-layer layers: query, keys|values
                                                             of i earlier pools, attention
    memory_out         2 S D (+ 2 S D on cross layers)       F_tok (and F_lay)
    attn_proj          2 D (2 Hq hd + 2 Hkv hd)              q, k, v, o
    attention          2 Hq hd (L + 1)                       q k^T and p v, causal half
    mlp                6 D F                                 SwiGLU gate, up, down
    lm_head            2 D V                                 once, not per layer
    ================== ===================================== =====================================

    Square blocks under a causal mask are counted as their kernels compute them: the SSD scan's
    (c x c) diagonal blocks in full, as the chunked algorithm (our reference, mamba_ssm's
    ``_bmm_chunk_fwd``) multiplies them before masking; causal attention over its L(L+1)/2 visible
    pairs, as a causal flash kernel skips the masked half. The memory reads all M slots, empty
    ones too (the reference's SDPA masks them). The inter-chunk state passing is a loop of
    elementwise updates (state * exp(a_end) + new state, 2 E N / c per token), not ssd_minimal's
    (n_c x n_c) einsum, so the scan's matmul cost per token depends on L only through f.
    Packed documents (``reset_at_eod``) cost a little less in attention and a little more in
    padding (each document starts on a chunk edge); the formula counts one document per sample.
    Tensor parallelism splits the model FLOPs over ranks; the replicated memory's repeated work is
    not model work.
    """
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")
    d, length = cfg.d_model, seq_len
    lm_head = 2.0 * d * cfg.vocab_size
    layers = cfg.n_layers

    if cfg.arch == "transformer":
        t = cfg.transformer
        head_dim = d // t.n_heads
        return FlopCount(
            attn_proj=layers * 2.0 * d * (2 * t.n_heads * head_dim + 2 * t.n_kv_heads * head_dim),
            # Query t reads keys 0..t: (L + 1) / 2 keys on average, 2 hd FLOPs each for q k^T and p v.
            attention=layers * 2.0 * t.n_heads * head_dim * (length + 1),
            mlp=layers * 6.0 * d * t.ffn_hidden,
            lm_head=lm_head,
        )
    if cfg.arch not in ("memmamba", "mamba2"):
        raise ValueError(f"model.arch: no FLOP formula for {cfg.arch!r}")

    m = cfg.mamba
    inner, heads, group_state, chunk = cfg.d_inner, cfg.n_mamba_heads, m.ngroups * m.d_state, m.chunk_size
    pad = math.ceil(length / chunk) * chunk / length  # f: a ragged last chunk is computed whole
    counts = dict(
        in_proj=layers * 2.0 * d * (2 * inner + 2 * group_state + heads),
        conv1d=layers * 2.0 * m.d_conv * (inner + 2 * group_state),
        ssd_scores=layers * 2.0 * group_state * chunk * pad,  # heads of a group share C B^T
        ssd_diagonal=layers * 2.0 * inner * chunk * pad,
        ssd_chunk_state=layers * 2.0 * inner * m.d_state * pad,
        ssd_state_output=layers * 2.0 * inner * m.d_state * pad,
        out_proj=layers * 2.0 * inner * d,
        lm_head=lm_head,
    )
    if cfg.memory_enabled:
        mem = cfg.memory
        s, notes = mem.summary_dim, mem.notes_per_chunk * pad / chunk  # notes written per token
        note_input = d * (mem.pool_window if mem.pooling == "concat" else 1)  # the width W_n reads
        every = mem.cross_layer_every
        earlier = [i for i in range(layers) if every > 0 and i > 0 and (i + 1) % every == 0]  # pools read = i
        read = 4.0 * mem.pool_size * s * pad  # q k^T and p v of every (padded) token over M slots
        counts.update(
            memory_write=layers * (4.0 * d + (2.0 * note_input * s + 4.0 * s * s) * notes),
            memory_read=layers * (2.0 * d * s + read),
            # A cross-layer layer projects every earlier layer's notes with its own keys|values.
            memory_cross_layer=sum(2.0 * d * s + i * (4.0 * s * s * notes + read) for i in earlier),
            memory_out=(layers + len(earlier)) * 2.0 * s * d,
        )
    return FlopCount(**counts)


# bf16 dense tensor-core peaks (no 2:4 sparsity) from NVIDIA's data sheets, TFLOP/s, matched
# against torch.cuda.get_device_name().lower(); the first match wins, so variants come first.
# Not listed: A10G (NVIDIA publishes no data sheet for it and the figures quoted elsewhere
# disagree), so it is measured like any other unknown device.
CUDA_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"h100.*nvl", 835.0),
    (r"h100.*pcie", 756.0),
    (r"h100|h200", 989.0),  # H100 SXM (HBM3), H200, GH200: the same Hopper SXM part
    (r"b200", 2250.0),
    (r"a100", 312.0),  # SXM and PCIe alike
    (r"\ba10\b", 125.0),
    (r"\ba40\b", 149.7),
    (r"l40s", 362.0),
    (r"\bl40\b", 181.0),
    (r"\bl4\b", 121.0),
    (r"rtx 4090", 165.2),  # fp32 accumulation, which torch's bf16 matmuls use (330 with fp16 accumulation)
    (r"rtx 3090", 71.0),
)
MATMUL_SIZE = 2048
"""Side of the square matmul that measures a device without a table entry: 17 GFLOP, about 0.1 s on
one CPU core at 190 GFLOP/s, so warm-ups and repeats stay under a second."""


def peak_flops_per_second(device: torch.device, configured_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where that figure came from).

    ``configured_tflops`` wins when given. Otherwise a CUDA device found in
    ``CUDA_BF16_PEAK_TFLOPS`` gets its bf16 dense peak. Any other device is measured once per
    process (and thread count): the best of a few large matmuls, fp32 on CPU, bf16 on an unknown
    GPU. A measured figure is what the matmul library achieves, below the hardware's peak, so the
    MFU against it reads higher than against a data sheet; the source string says which it was.
    On CPU the measurement uses the torch thread count at the time of the call: call it after the
    trainer has set threads.
    """
    if configured_tflops is not None:
        if not (isinstance(configured_tflops, (int, float)) and math.isfinite(configured_tflops)
                and configured_tflops > 0):
            raise ValueError(f"peak TFLOP/s: must be a positive number, got {configured_tflops!r}")
        return float(configured_tflops) * 1e12, f"configured: {float(configured_tflops):g} TFLOP/s"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, tflops in CUDA_BF16_PEAK_TFLOPS:
            if re.search(pattern, name.lower()):
                return tflops * 1e12, f"table: {name} bf16 dense peak {tflops:g} TFLOP/s"
        flops = _measured_matmul_flops(str(device), torch.bfloat16, torch.get_num_threads())
        return flops, (f"measured: {name} is not in the peak table; bf16 {MATMUL_SIZE}^2 matmul, "
                       f"{flops / 1e12:.3g} TFLOP/s (set the configured peak for a data-sheet MFU)")
    threads = torch.get_num_threads()
    flops = _measured_matmul_flops(str(device), torch.float32, threads)
    return flops, (f"measured: fp32 {MATMUL_SIZE}^2 matmul on {device.type}, {threads} thread{'s' * (threads != 1)}, "
                   f"{flops / 1e12:.3g} TFLOP/s")


@functools.lru_cache(maxsize=None)
def _measured_matmul_flops(device: str, dtype: torch.dtype, threads: int, warmup: int = 2, repeats: int = 3
                           ) -> float:
    """Best FLOP/s of ``repeats`` (n x n) @ (n x n) products after ``warmup`` ones (``threads`` keys the cache)."""
    n = MATMUL_SIZE
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if out.is_cuda else (lambda: None)
    best = math.inf
    for i in range(warmup + repeats):
        synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize()
        if i >= warmup:  # the first runs pay for allocation, thread start-up and clock ramp-up
            best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of ``devices`` devices.

    ``tokens_per_s`` over all ``devices`` (the trainer's global figure), ``flops_per_token``
    normally ``model_flops_per_token(cfg, seq_len).train``, ``peak_flops`` one device's.
    """
    return tokens_per_s * flops_per_token / (peak_flops * devices)


def achieved_tflops(tokens_per_s: float, flops_per_token: float, devices: int = 1) -> float:
    """Achieved model TFLOP/s per device."""
    return tokens_per_s * flops_per_token / devices / 1e12
