"""Model configuration: nested dataclasses of plain types, filled from YAML by the run config loader.

``ModelConfig.validate()`` checks every field and cross-field rule, collects all problems and
raises one ValueError that names each field as ``model.<section>.<field>``.
"""

from dataclasses import dataclass, field

ARCHS = ("memmamba", "mamba2", "transformer")
POOLINGS = ("max", "mean", "none", "concat")
EVICTIONS = ("fifo", "priority")


@dataclass
class Mamba2Config:
    d_state: int = 64
    """SSM state size N per head."""
    headdim: int = 64
    """Channels P per SSM head; heads = expand * d_model / headdim."""
    expand: int = 2
    """Inner width of the mixer as a multiple of d_model."""
    ngroups: int = 1
    """Groups sharing B and C (like GQA); must divide the number of heads."""
    d_conv: int = 4
    """Kernel width of the depthwise causal conv1d over x, B, C."""
    chunk_size: int = 256
    """Tokens per SSD chunk; also the memory's chunk (notes enter the pool once per chunk)."""


@dataclass
class MemoryConfig:
    enabled: bool = True
    """Use the MemMamba memory; False gives exactly a Mamba2 model."""
    pool_size: int = 50
    """Notes kept in each layer's pool."""
    notes_per_chunk: int = 4
    """At most this many notes (the top-k by score above tau1) enter the pool per chunk."""
    summary_dim: int = 64
    """Width of a note n_t = W_s . pool(y)_t."""
    pooling: str = "max"
    """How y is pooled over the causal window before summarising: max | mean | none (y_t alone) |
    concat (the window's outputs side by side, in order; W_n is pool_window times wider)."""
    pool_window: int = 4
    """Causal window (tokens t-w+1..t) of the pooling."""
    tau1: float = 0.5
    """A token can become a note only if its score s_t exceeds tau1."""
    tau2: float = 0.5
    """Gate centre: g_t = sigmoid((score_state_t - tau2) / gate_temperature)."""
    gate_temperature: float = 0.1
    """Softness of the cross-token gate."""
    cross_layer_every: int = 4
    """Every p-th layer also attends over the pools of all previous layers; 0 turns it off."""
    heads: int = 4
    """Attention heads of the cross-token and cross-layer reads; must divide summary_dim."""
    eviction: str = "priority"
    """When the pool is full: priority drops the lowest-scored notes (a salient note stays as long as
    pool_size higher-scored ones have not arrived, at any distance), fifo the oldest (a note then lives
    pool_size / notes_per_chunk chunks)."""


@dataclass
class TransformerConfig:
    n_heads: int = 4
    """Query heads; must divide d_model (head dim must be even for RoPE)."""
    n_kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide n_heads."""
    ffn_hidden: int = 768
    """Hidden width of the SwiGLU MLP."""
    rope_theta: float = 10000.0
    """RoPE base."""
    max_seq_len: int = 16384
    """Longest sequence (prompt + generated) the KV cache is allocated for."""


@dataclass
class ModelConfig:
    arch: str = "memmamba"
    """memmamba | mamba2 (memmamba with the memory section ignored) | transformer."""
    vocab_size: int = 32000
    """Embedding rows; the tokenizer's vocabulary size."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    """Number of blocks."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm (HF Mamba2's layer_norm_epsilon, Llama's rms_norm_eps)."""
    tie_embeddings: bool = True
    """Share the LM head weight with the input embedding."""
    reset_at_eod: bool = True
    """Treat every eod_token_id as the end of a document: the token after it starts afresh (SSM state,
    conv window and note pool empty; the Transformer attends within the document, positions from 0),
    so documents packed into one sample never see each other, in training and in decoding alike."""
    eod_token_id: int = 2
    """The end-of-document id appended to every document (the project's tokenizers fix it at 2, their eos)."""
    mamba: Mamba2Config = field(default_factory=Mamba2Config)
    """Mixer settings for memmamba and mamba2."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """MemMamba memory settings (used by arch memmamba)."""
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    """Baseline settings (used by arch transformer)."""

    @property
    def memory_enabled(self) -> bool:
        return self.arch == "memmamba" and self.memory.enabled

    @property
    def d_inner(self) -> int:
        return self.mamba.expand * self.d_model

    @property
    def n_mamba_heads(self) -> int:
        return self.d_inner // self.mamba.headdim

    def validate(self) -> None:
        """Raise one ValueError listing every problem, each naming its field."""
        problems: list[str] = []

        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                problems.append(f"model.{name}: {message}")

        need(self.arch in ARCHS, "arch", f"got {self.arch!r}, expected one of {', '.join(ARCHS)}")
        for name in ("vocab_size", "d_model", "n_layers"):
            need(_positive(getattr(self, name)), name, f"must be a positive integer, got {getattr(self, name)!r}")
        need(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps!r}")
        need(isinstance(self.reset_at_eod, bool), "reset_at_eod", f"must be true or false, got {self.reset_at_eod!r}")
        need(isinstance(self.eod_token_id, int) and not isinstance(self.eod_token_id, bool)
             and 0 <= self.eod_token_id < (self.vocab_size if _positive(self.vocab_size) else 1 << 62),
             "eod_token_id", f"must be a token id in [0, vocab_size), got {self.eod_token_id!r}")
        need(self.memory.pooling in POOLINGS, "memory.pooling",
             f"got {self.memory.pooling!r}, expected one of {', '.join(POOLINGS)}")
        need(self.memory.eviction in EVICTIONS, "memory.eviction",
             f"got {self.memory.eviction!r}, expected one of {', '.join(EVICTIONS)}")

        if self.arch in ("memmamba", "mamba2"):
            m = self.mamba
            for name in ("d_state", "headdim", "expand", "ngroups", "d_conv", "chunk_size"):
                need(_positive(getattr(m, name)), f"mamba.{name}",
                     f"must be a positive integer, got {getattr(m, name)!r}")
            if _positive(m.headdim) and _positive(m.expand) and _positive(self.d_model):
                need(self.d_inner % m.headdim == 0, "mamba.headdim",
                     f"must divide expand * d_model = {self.d_inner}, got {m.headdim}")
                if self.d_inner % m.headdim == 0 and _positive(m.ngroups):
                    need(self.n_mamba_heads % m.ngroups == 0, "mamba.ngroups",
                         f"must divide the number of heads ({self.n_mamba_heads}), got {m.ngroups}")

        if self.memory_enabled:
            mem = self.memory
            for name in ("pool_size", "notes_per_chunk", "summary_dim", "pool_window", "heads"):
                need(_positive(getattr(mem, name)), f"memory.{name}",
                     f"must be a positive integer, got {getattr(mem, name)!r}")
            need(mem.pool_size >= mem.notes_per_chunk, "memory.pool_size",
                 f"must be >= memory.notes_per_chunk ({mem.notes_per_chunk}), got {mem.pool_size}")
            need(mem.notes_per_chunk <= self.mamba.chunk_size, "memory.notes_per_chunk",
                 f"must be <= mamba.chunk_size ({self.mamba.chunk_size}), got {mem.notes_per_chunk}")
            if _positive(mem.heads):
                need(mem.summary_dim % mem.heads == 0, "memory.heads",
                     f"must divide memory.summary_dim ({mem.summary_dim}), got {mem.heads}")
            need(0.0 <= mem.tau1 < 1.0, "memory.tau1", f"must be in [0, 1) (scores are sigmoids), got {mem.tau1}")
            need(0.0 <= mem.tau2 <= 1.0, "memory.tau2", f"must be in [0, 1], got {mem.tau2}")
            need(mem.gate_temperature > 0, "memory.gate_temperature", f"must be > 0, got {mem.gate_temperature}")
            need(isinstance(mem.cross_layer_every, int) and mem.cross_layer_every >= 0, "memory.cross_layer_every",
                 f"must be an integer >= 0 (0 = off), got {mem.cross_layer_every!r}")

        if self.arch == "transformer":
            t = self.transformer
            for name in ("n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
                need(_positive(getattr(t, name)), f"transformer.{name}",
                     f"must be a positive integer, got {getattr(t, name)!r}")
            need(t.rope_theta > 0, "transformer.rope_theta", f"must be > 0, got {t.rope_theta}")
            if _positive(t.n_heads) and _positive(self.d_model):
                need(self.d_model % t.n_heads == 0, "transformer.n_heads",
                     f"must divide d_model ({self.d_model}), got {t.n_heads}")
                if self.d_model % t.n_heads == 0:
                    need((self.d_model // t.n_heads) % 2 == 0, "transformer.n_heads",
                         f"must leave an even head dim for RoPE (d_model {self.d_model} / {t.n_heads})")
                if _positive(t.n_kv_heads):
                    need(t.n_heads % t.n_kv_heads == 0, "transformer.n_kv_heads",
                         f"must divide transformer.n_heads ({t.n_heads}), got {t.n_kv_heads}")

        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def validate_seq_len(self, seq_len: int) -> None:
        """Raise ValueError unless ``seq_len`` is a usable training length for this model."""
        if not _positive(seq_len):
            raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")
        if self.arch in ("memmamba", "mamba2") and seq_len % self.mamba.chunk_size != 0:
            raise ValueError(
                f"seq_len: {seq_len} is not a multiple of model.mamba.chunk_size ({self.mamba.chunk_size})"
            )
        if self.arch == "transformer" and seq_len > self.transformer.max_seq_len:
            raise ValueError(
                f"seq_len: {seq_len} exceeds model.transformer.max_seq_len ({self.transformer.max_seq_len})"
            )


def memory_reach_tokens(cfg: ModelConfig) -> int | None:
    """How far back a token can read the memory, in tokens; None when that is not capped by position.

    None also for a model without memory (arch mamba2 or transformer, or memory.enabled false):
    callers check ``cfg.memory_enabled`` to say "no memory".

    fifo: ``ceil(pool_size / notes_per_chunk) * chunk_size``. The notes of chunk i enter the pool
    when chunk i ends, and the tokens of chunk j read the pool as it stood after chunk j - 1; fifo
    keeps the pool_size newest notes. So with R = ceil(pool_size / notes_per_chunk), a token of
    chunk j reads notes of chunks j - R .. j - 1 only: the R * chunk_size tokens before its own
    chunk (its own chunk is not counted; none of its notes is in the pool yet). When
    notes_per_chunk does not divide pool_size, only the ``pool_size % notes_per_chunk`` newest
    notes of chunk j - R are still there (every note of chunks j - pool_size // notes_per_chunk ..
    j - 1 is). This holds when every chunk writes notes_per_chunk notes; a chunk that writes fewer
    (fewer scores above tau1) only makes the older notes last longer. A window starting at a
    chunk boundary (every training and eval window) therefore keeps all its notes readable to its
    end if it is at most the reach long, and loses the notes of its first chunk before its end
    once it is longer than ``(pool_size // notes_per_chunk + 1) * chunk_size``.

    priority: None. The pool keeps the pool_size highest-scored notes seen so far (ties: the
    newer), so a note stays until pool_size notes that outrank it have entered, at any distance.

    Raises:
        NotImplementedError: for an eviction mode without a reach rule here (never guessed as fifo).
    """
    if not cfg.memory_enabled:
        return None
    mem = cfg.memory
    if mem.eviction == "fifo":
        return -(-mem.pool_size // mem.notes_per_chunk) * cfg.mamba.chunk_size
    if mem.eviction == "priority":
        return None
    raise NotImplementedError(f"memory_reach_tokens: no reach rule for model.memory.eviction {mem.eviction!r}")


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
