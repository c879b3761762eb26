"""Memory-fidelity metrics (DESIGN.md §7; our definitions, after the ETMF / ECLMF of arXiv 2510.03279).

Influence of the token ``d`` positions back on layer ``l``'s output at position ``t``:

    I_l(d) = E[ ||h^l_t(x) - h^l_t(x')|| / ||h^l_t(x)|| ]

where ``x'`` equals ``x`` except at position ``t - d``, which holds a uniformly drawn different
token, and ``h^l_t`` is the residual stream after block ``l`` (1-based). The expectation runs
over the sample sequences (one replacement per sample and distance); ``t`` is each sample's
last position, so a sample holds ``max(distances) + 1`` tokens.

    ETMF(d)  = I_L(d) / I_L(1)        (last layer; curve over the distances, plus the first
                                       distance where it falls below 0.5 and below 0.1)
    ECLMF(l) = I_l(d*) / I_1(d*)      (per layer, at a fixed distance d*, default 1024)

Plain Mamba2 forgets exponentially (its state decays by exp(dt * A) per token); a memory that
works keeps ETMF higher at long distances.
"""

from __future__ import annotations

import numpy as np
import torch

from .lm import EvalLM

THRESHOLDS = (0.5, 0.1)


def distances_with_required(distances: list[int], d_star: int) -> list[int]:
    """The sorted distances, with 1 (ETMF's reference) and d* (ECLMF's) added."""
    if any(d < 1 for d in distances) or d_star < 1:
        raise ValueError(f"fidelity distances: expected positive integers, got {distances} and d* = {d_star}")
    return sorted(set(distances) | {1, d_star})


@torch.no_grad()
def influence(lm: EvalLM, samples: list[np.ndarray], distances: list[int], seed: int = 0,
              batch_size: int = 8) -> np.ndarray:
    """I_l(d) as an array (layers, len(distances)), averaged over ``samples`` (each >= max(distances) + 1 tokens)."""
    rng = np.random.default_rng(seed)
    total = None
    for sample in samples:
        x = np.asarray(sample[:max(distances) + 1], dtype=np.int64)
        if len(x) < max(distances) + 1:
            raise ValueError(f"fidelity: a sample of {len(sample)} tokens is shorter than max distance + 1 "
                             f"({max(distances) + 1})")
        t = len(x) - 1
        variants = np.repeat(x[None], len(distances) + 1, axis=0)  # row 0 is x itself, row i+1 differs at t - d_i
        for row, d in enumerate(distances, start=1):
            replacement = rng.integers(0, lm.vocab_size - 1)
            variants[row, t - d] = replacement + (replacement >= x[t - d])  # uniform over the other tokens
        last = []  # per mini-batch: (layers, b, D) outputs at position t
        for batch in torch.from_numpy(variants).split(batch_size):
            last.append(torch.stack([h[:, t] for h in lm.layer_outputs(batch)]))
        h = torch.cat(last, dim=1).double()  # (layers, 1 + distances, D)
        relative = (h[:, 1:] - h[:, :1]).norm(dim=-1) / h[:, :1].norm(dim=-1)  # (layers, distances)
        total = relative if total is None else total + relative
    return (total / len(samples)).cpu().numpy()


def first_distance_below(distances: list[int], curve: list[float | None], threshold: float) -> int | None:
    below = [d for d, value in zip(distances, curve) if value is not None and value < threshold]
    return below[0] if below else None


def fidelity(lm: EvalLM, samples: list[np.ndarray], distances: list[int], d_star: int = 1024, seed: int = 0,
             batch_size: int = 8) -> dict:
    """{"distances", "d_star", "samples", "influence" [[I_l(d)] per layer], "etmf" [per distance],
    "etmf_below": {"0.5": d or None, "0.1": ...}, "eclmf" [per layer]}."""
    distances = distances_with_required(distances, d_star)
    table = influence(lm, samples, distances, seed, batch_size)  # (layers, distances)
    etmf = relative_to(table[-1], table[-1, distances.index(1)])
    eclmf = relative_to(table[:, distances.index(d_star)], table[0, distances.index(d_star)])
    return {"distances": distances, "d_star": d_star, "samples": len(samples), "influence": table.tolist(),
            "etmf": etmf,
            "etmf_below": {str(thr): first_distance_below(distances, etmf, thr) for thr in THRESHOLDS},
            "eclmf": eclmf}


def relative_to(values: np.ndarray, reference: float) -> list[float | None]:
    """values / reference, or None everywhere when the reference influence is exactly 0 (below the
    dtype's round-off: the difference of the two outputs vanished), where the ratio is undefined."""
    return [float(v / reference) if reference > 0 else None for v in values]
