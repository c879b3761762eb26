"""Perplexity by context length, and by position within the context.

For each length L, the first ``samples`` documents of the split that hold at least L + 1 tokens
are read from their start: tokens 0..L-1 are the context, tokens 1..L the targets. Every
document contributes all L next-token losses, so the result is token-weighted:

    ppl(L) = exp( sum of NLLs / (documents * L) )

and the same sum restricted to context positions [a, b) gives the bucket perplexities
(power-of-two buckets 0-64, 64-128, ..., L/2-L): a model that uses long context gets better
(lower) perplexity in the late buckets; one that loses it flattens out.

Mamba2 and MemMamba run the whole context in one forward whose chunked scan hands the
recurrent state from chunk to chunk (model/ssd.py): time and memory grow linearly with L, so
lengths far beyond the training length are measured exactly as they would be decoded. The LM
head runs on 1024 positions at a time (``EvalLM.nll``), so no L x vocab logits tensor exists. The
Transformer baseline's attention is quadratic in L.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from .lm import EvalLM

FIRST_BUCKET = 64
"""End of the first position bucket; later buckets double in size."""


def bucket_edges(length: int, first: int = FIRST_BUCKET) -> list[int]:
    """[0, 64, 128, 256, ..., length]: power-of-two buckets of context positions."""
    edges, edge = [0], first
    while edge < length:
        edges.append(edge)
        edge *= 2
    return edges + [length]


def select_documents(docs: Iterable[np.ndarray], lengths: list[int], samples: int) -> dict[int, list[np.ndarray]]:
    """For each length L, the first ``samples`` documents with >= L + 1 tokens (reads no further than needed)."""
    chosen: dict[int, list[np.ndarray]] = {length: [] for length in lengths}
    for doc in docs:
        for length, picked in chosen.items():
            if len(doc) >= length + 1 and len(picked) < samples:
                picked.append(doc[:length + 1])
        if all(len(picked) == samples for picked in chosen.values()):
            break
    return chosen


def token_nll(lm: EvalLM, tokens: np.ndarray) -> np.ndarray:
    """tokens (L + 1,) -> the L next-token negative log-likelihoods (nats) of tokens 1..L, float64."""
    ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))[None]
    return lm.nll(ids)[0].double().cpu().numpy()


def perplexity(lm: EvalLM, docs: Iterable[np.ndarray], lengths: list[int], samples: int) -> dict[str, dict]:
    """{str(L): {"documents", "tokens", "nll", "ppl", "buckets": [{"start", "end", "ppl"}]}} per length.

    A length no document of the split reaches gets ``"documents": 0`` and ``"ppl": None``.
    """
    results = {}
    for length, chosen in select_documents(docs, lengths, samples).items():
        if not chosen:
            results[str(length)] = {"documents": 0, "tokens": 0, "nll": None, "ppl": None, "buckets": []}
            continue
        nll_by_position = np.sum([token_nll(lm, doc) for doc in chosen], axis=0)  # (L,) summed over documents
        edges = bucket_edges(length)
        buckets = [{"start": a, "end": b, "ppl": math.exp(nll_by_position[a:b].sum() / (len(chosen) * (b - a)))}
                   for a, b in zip(edges, edges[1:])]
        mean_nll = float(nll_by_position.sum() / (len(chosen) * length))
        results[str(length)] = {"documents": len(chosen), "tokens": len(chosen) * length, "nll": mean_nll,
                                "ppl": math.exp(mean_nll), "buckets": buckets}
    return results
