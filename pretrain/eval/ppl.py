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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .lm import EvalLM
from .render import fmt, pyplot, save
from .task import POSITIVE, SharedSettings, Task, TaskInputs, setting

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


@dataclass
class PplSettings(SharedSettings):
    """ppl measures every length of ``lengths``."""

    ppl_samples: int = setting(8, "documents per length (the first ones of the split that are long enough)", POSITIVE)


def run(inputs: TaskInputs, settings: PplSettings) -> dict[str, dict]:
    return perplexity(inputs.lm, inputs.documents(), settings.lengths, settings.ppl_samples)


def scalars(result: dict[str, dict]) -> dict[str, float]:
    """ppl@L for every length some document reached."""
    return {f"ppl@{length}": entry["ppl"] for length, entry in result.items() if entry["ppl"] is not None}


def table(runs: dict[str, dict[str, dict]]) -> str:
    """PPL per model and length; "" when no length was measured."""
    lengths = sorted({int(n) for ppl in runs.values() for n in ppl})
    if not lengths:
        return ""
    rows = ["| model | " + " | ".join(f"PPL@{n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for label, ppl in runs.items():
        rows.append(f"| {label} | " + " | ".join(fmt(ppl.get(str(n), {}).get("ppl")) for n in lengths) + " |")
    docs = {n: max(ppl.get(str(n), {}).get("documents", 0) for ppl in runs.values()) for n in lengths}
    note = ", ".join(f"{n}: {d}" for n, d in docs.items())
    return ("### Perplexity by context length\n\n" + "\n".join(rows)
            + f"\n\nDocuments per length: {note} (a length no document reaches shows n/a).")


def plot(runs: dict[str, dict], path: Path) -> None:
    """Left: PPL against context length. Right: PPL by position bucket at the longest measured length."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, ppl in runs.items():
        measured = {int(length): entry for length, entry in ppl.items() if entry["ppl"] is not None}
        if not measured:
            continue
        lengths = sorted(measured)
        left.plot(lengths, [measured[n]["ppl"] for n in lengths], marker="o", label=label)
        buckets = measured[lengths[-1]]["buckets"]
        right.plot([b["end"] for b in buckets], [b["ppl"] for b in buckets], marker="o",
                   label=f"{label} (context {lengths[-1]})")
    for ax, xlabel, title in ((left, "context length (tokens)", "perplexity by context length"),
                              (right, "position in the context (bucket end)", "perplexity by position")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save(fig, path)


TASK = Task(name="ppl", settings=PplSettings, run=run, scalars=scalars, table=table, plot=plot,
            needs_data=True, needs_tokenizer=False)
