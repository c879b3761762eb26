"""Tiny models and test doubles shared by the evaluation tests."""

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

from model import ModelConfig, build_model
from model.config import Mamba2Config, MemoryConfig, TransformerConfig

CHUNK = 16


def tiny_config(arch: str = "memmamba", vocab_size: int = 64, n_layers: int = 2) -> ModelConfig:
    """A few-thousand-parameter model with 16-token chunks and a 4-note pool."""
    return ModelConfig(
        arch=arch, vocab_size=vocab_size, d_model=32, n_layers=n_layers,
        mamba=Mamba2Config(d_state=8, headdim=8, expand=2, ngroups=1, d_conv=4, chunk_size=CHUNK),
        memory=MemoryConfig(pool_size=4, notes_per_chunk=2, summary_dim=16, heads=2, pool_window=3,
                            cross_layer_every=2, tau1=0.3),
        transformer=TransformerConfig(n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=1024),
    )


def tiny_model(arch: str = "memmamba", vocab_size: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, vocab_size)).eval()


class InductionCopier(nn.Module):
    """Test double that copies: at the last position it predicts the token that followed the longest
    earlier occurrence of the current suffix (up to 8 tokens), like an ideal induction head."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.unused = nn.Parameter(torch.zeros(1))  # gives the double a device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        for b, row in enumerate(ids.tolist()):
            logits[b, -1, self._next(row)] = 1.0
        return logits

    @staticmethod
    def _next(row: list[int]) -> int:
        array = np.asarray(row)
        for k in range(min(8, len(row) - 1), 0, -1):
            suffix = array[-k:]
            windows = np.lib.stride_tricks.sliding_window_view(array[:-1], k)  # windows ending before the last token
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                return int(array[hits[-1] + k])
        return 0


class DecayingMemory(nn.Module):
    """Toy model with known influence: one-hot embeddings, and layer l outputs the exponential moving
    sum h^l_t = sum_k a_l^k e(x_{t-k}) (each layer reads the embeddings directly)."""

    def __init__(self, vocab_size: int, decays: list[float]):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.decays = decays
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor, return_hidden_states: bool = False):
        onehot = torch.nn.functional.one_hot(ids, self.config.vocab_size).double()  # (B, L, V)
        hidden = []
        for a in self.decays:
            state, outputs = torch.zeros_like(onehot[:, 0]), []
            for t in range(ids.shape[1]):
                state = a * state + onehot[:, t]
                outputs.append(state)
            hidden.append(torch.stack(outputs, dim=1))
        logits = hidden[-1]
        return (logits, hidden) if return_hidden_states else logits


class NoteMemory(DecayingMemory):
    """DecayingMemory plus a perfect note pool of salient tokens: layer l outputs
    h^l_t = sum_k a_l^k e(x_{t-k}) + sum_{k: x_{t-k} salient} e(x_{t-k}), so a salient token's
    contribution never fades while every other token's decays like a plain SSM's."""

    def __init__(self, vocab_size: int, decays: list[float], salient: list[int]):
        super().__init__(vocab_size, decays)
        self.salient = torch.zeros(vocab_size, dtype=torch.float64)
        self.salient[salient] = 1.0

    def forward(self, ids: torch.Tensor, return_hidden_states: bool = False):
        _, hidden = super().forward(ids, return_hidden_states=True)
        onehot = torch.nn.functional.one_hot(ids, self.config.vocab_size).double()
        notes = (onehot * self.salient).cumsum(dim=1)  # (B, L, V): every salient token so far, undecayed
        hidden = [h + notes for h in hidden]
        return (hidden[-1], hidden) if return_hidden_states else hidden[-1]
