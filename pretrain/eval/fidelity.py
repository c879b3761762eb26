"""Memory-fidelity metrics: our own definitions, after the paper's description of ETMF and ECLMF
(arXiv 2510.03279; DESIGN.md §7). docs/evaluation.md explains them with examples.

Samples. Each sample is one window inside one document: its first ``W = max(d) + 1 + NEEDLE_ROOM``
tokens (documents.document_windows; shorter documents are skipped, one window per document).
``t = W - 1`` is the window's last position and ``h^l_t`` the residual stream after block ``l``
(1-based) there.

Bounded change of a pair of inputs (in [0, 1] by the triangle inequality; 0 when both are 0):

    b_l(x, x') = ||h^l_t(x) - h^l_t(x')|| / (||h^l_t(x)|| + ||h^l_t(x')||)

Random-token influence ``I_l(d)``: the mean over samples of ``b_l(x, x')``, ``x'`` = ``x`` with the
token at ``t - d`` replaced by a uniformly drawn different token.

Needle influence ``N_l(d)``: the mean over samples of ``b_l(x_a, x_b)``, where ``x_a`` and ``x_b``
are ``x`` with the passkey needle of passkey.py (" The pass key is {key}. Remember it. {key} is
the pass key.") written over the tokens ending at ``t - d``, for two different random 5-digit
keys whose needles have the same token count. The two inputs differ only in the key, a salient
fact: ``N_L(d)`` measures how much of it still reaches the last position from ``d`` tokens back.
It needs the model's tokenizer.

Ratios (of the means, for both influences; ``1`` is the shortest distance, always measured):

    ETMF(d)       = I_L(d) / I_L(1)      last layer; the curve and the first distance below 0.5 / 0.1
    ECLMF_d*(l)   = I_l(d*) / I_1(d*)    per layer, for each d* (one inside the memory's reach, one beyond)

Intervals: 95% percentile bootstrap over the samples (``BOOTSTRAP_RESAMPLES`` resamples, seeded),
one set of resamples for every statistic, so a ratio's interval carries the correlation of its
numerator and denominator.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .documents import document_windows
from .lm import EvalLM
from .passkey import NEEDLE
from .render import band, fmt, pyplot, save, with_interval
from .task import DISTANCES, POSITIVE, SharedSettings, Task, TaskInputs, setting

THRESHOLDS = (0.5, 0.1)
NEEDLE_ROOM = 64
"""Tokens every window holds beyond max(d) + 1, so that a needle ending at t - max(d) fits. Fixed,
not the tokenizer's needle length, so that random-token results do not depend on whether a
tokenizer is given. The needle has 59 characters: a byte-level tokenizer needs at most 59 tokens."""
BOOTSTRAP_RESAMPLES = 2000
KEY_TRIES = 1000
"""Draws of a second key whose needle has as many tokens as the first one's."""


def distances_with_required(distances: list[int], d_stars: list[int]) -> list[int]:
    """The sorted distances, with 1 (the ratios' reference) and every d* (ECLMF's) added."""
    if any(d < 1 for d in [*distances, *d_stars]):
        raise ValueError(f"fidelity distances: expected positive integers, got {distances} and d* = {d_stars}")
    return sorted(set(distances) | {1} | set(d_stars))


def window_length(distances: list[int]) -> int:
    """Tokens of one sample window: the largest distance, the last position and the needle's room."""
    return max(distances) + 1 + NEEDLE_ROOM


def bounded_change(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., D), (..., D) -> ||a - b|| / (||a|| + ||b||) (...), in [0, 1]; 0 where a = b = 0."""
    total = a.norm(dim=-1) + b.norm(dim=-1)
    return (a - b).norm(dim=-1) / torch.where(total > 0, total, 1.0)


def needle_pair(tokenizer, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Needle tokens for two different random keys, of equal length (so only the key differs)."""
    def needle(key: int) -> np.ndarray:
        return np.asarray(tokenizer.encode(NEEDLE.format(key=key)), dtype=np.int64)

    key_a = rng.randint(10000, 99999)
    a = needle(key_a)
    if len(a) > NEEDLE_ROOM:
        raise ValueError(f"fidelity: the tokenizer spends {len(a)} tokens on the needle, more than the "
                         f"{NEEDLE_ROOM} a window keeps for it")
    for _ in range(KEY_TRIES):
        key_b = rng.randint(10000, 99999)
        b = needle(key_b)
        if key_b != key_a and len(b) == len(a):
            return a, b
    raise ValueError(f"fidelity: no second key found whose needle has the {len(a)} tokens of key {key_a}'s")


def _last_outputs(lm: EvalLM, variants: np.ndarray, batch_size: int) -> torch.Tensor:
    """variants (rows, W) -> every layer's output at the last position, (layers, rows, D) float64."""
    last = []
    for batch in torch.from_numpy(variants).split(batch_size):
        last.append(torch.stack([h[:, -1] for h in lm.layer_outputs(batch)]))
    return torch.cat(last, dim=1).double()


@torch.no_grad()
def sample_influence(lm: EvalLM, window: np.ndarray, distances: list[int], replacements: np.ndarray,
                     needles: tuple[np.ndarray, np.ndarray] | None, batch_size: int = 8
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """One window's bounded changes: random-token (layers, distances) and needle (layers, distances) or None.

    ``replacements[i]`` is a draw in [0, vocab - 1) for distance i, mapped onto the tokens other
    than the one it replaces; ``needles`` the two needles (None: no needle influence).
    """
    t = len(window) - 1
    rows = [window]  # row 0 is x itself, rows 1..n differ from it at t - d
    for d, r in zip(distances, replacements):
        row = window.copy()
        row[t - d] = r + (r >= window[t - d])  # uniform over the other tokens
        rows.append(row)
    if needles is not None:
        for needle in needles:  # the needle's last token at t - d
            for d in distances:
                row = window.copy()
                row[t - d - len(needle) + 1:t - d + 1] = needle
                rows.append(row)
    h = _last_outputs(lm, np.stack(rows), batch_size)  # (layers, rows, D)
    n = len(distances)
    random_token = bounded_change(h[:, 1:1 + n], h[:, :1]).cpu().numpy()
    if needles is None:
        return random_token, None
    return random_token, bounded_change(h[:, 1 + n:1 + 2 * n], h[:, 1 + 2 * n:]).cpu().numpy()


def bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """values (n, ...) -> (resamples, ...): means over resamples of the n rows drawn with replacement."""
    n = len(values)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)  # (R, n)
    return (counts @ values.reshape(n, -1) / n).reshape(resamples, *values.shape[1:])


def percentile_interval(resampled: np.ndarray) -> list:
    """(R, *shape) -> nested lists of shape ``shape`` holding [lo, hi] (2.5 and 97.5 percentiles of the
    finite resampled values) or None where no resample is finite (an undefined ratio)."""
    flat = resampled.reshape(len(resampled), -1)
    out = np.empty(flat.shape[1], dtype=object)
    for i, column in enumerate(flat.T):
        column = column[np.isfinite(column)]
        out[i] = [float(np.percentile(column, 2.5)), float(np.percentile(column, 97.5))] if len(column) else None
    return out.reshape(resampled.shape[1:]).tolist()


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (broadcasting)."""
    numerator, denominator = np.broadcast_arrays(numerator, denominator)
    return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan), where=denominator > 0)


def relative_to(values: np.ndarray, reference: float) -> list[float | None]:
    """values / reference, or None everywhere when the reference influence is exactly 0 (below the
    dtype's round-off: the difference of the two outputs vanished), where the ratio is undefined."""
    return [float(v / reference) if reference > 0 else None for v in values]


def first_distance_below(distances: list[int], curve: list[float | None], threshold: float) -> int | None:
    below = [d for d, value in zip(distances, curve) if value is not None and value < threshold]
    return below[0] if below else None


def summarise(per_sample: np.ndarray, distances: list[int], d_stars: list[int], seed: int) -> dict:
    """per_sample (samples, layers, distances) bounded changes -> influence, ETMF and ECLMF with intervals."""
    mean = per_sample.mean(axis=0)  # (layers, distances)
    boot = bootstrap_means(per_sample, BOOTSTRAP_RESAMPLES, seed)  # (R, layers, distances)
    etmf = relative_to(mean[-1], mean[-1, 0])  # distances[0] == 1
    stars = {str(d): distances.index(d) for d in sorted(set(d_stars))}
    return {"influence": mean.tolist(), "influence_interval": percentile_interval(boot),
            "etmf": etmf, "etmf_interval": percentile_interval(ratio(boot[:, -1], boot[:, -1, :1])),
            "etmf_below": {str(thr): first_distance_below(distances, etmf, thr) for thr in THRESHOLDS},
            "eclmf": {d: relative_to(mean[:, j], mean[0, j]) for d, j in stars.items()},
            "eclmf_interval": {d: percentile_interval(ratio(boot[:, :, j], boot[:, :1, j])) for d, j in stars.items()}}


def fidelity(lm: EvalLM, docs: Iterable[np.ndarray], distances: list[int], d_stars: list[int], samples: int = 32,
             tokenizer=None, seed: int = 0, batch_size: int = 8) -> dict:
    """Random-token (and, given ``tokenizer``, needle) fidelity over windows of the first ``samples``
    documents long enough (each ending in its EOD id, as documents.documents yields them).

    Returns {"distances", "d_stars", "window", "samples" (windows used), "samples_requested",
    "interval_method": {"method", "level", "resamples"}, "influence", "influence_interval", "etmf",
    "etmf_interval", "etmf_below", "eclmf": {str(d*): [per layer]}, "eclmf_interval",
    "needle": the same influence..eclmf_interval keys for the needle influence, or None without a tokenizer}.
    """
    distances = distances_with_required(distances, d_stars)
    length = window_length(distances)
    windows = document_windows(iter(docs), length, samples)
    if not windows:
        raise ValueError(f"--data: no document holds the {length} tokens one fidelity window needs (largest "
                         f"distance + 1 + {NEEDLE_ROOM} for the needle); give shorter --fidelity-distances and "
                         f"--fidelity-d-stars, or longer documents")
    token_rng, key_rng = np.random.default_rng(seed), random.Random(seed)
    random_token, needle = [], []
    for window in windows:
        replacements = token_rng.integers(0, lm.vocab_size - 1, len(distances))
        pair = needle_pair(tokenizer, key_rng) if tokenizer is not None else None
        changes, needle_changes = sample_influence(lm, window, distances, replacements, pair, batch_size)
        random_token.append(changes)
        needle.append(needle_changes)
    return {"distances": distances, "d_stars": sorted(set(d_stars)), "window": length, "samples": len(windows),
            "samples_requested": samples,
            "interval_method": {"method": "percentile bootstrap over the samples", "level": 0.95,
                                "resamples": BOOTSTRAP_RESAMPLES},
            **summarise(np.stack(random_token), distances, d_stars, seed),
            "needle": summarise(np.stack(needle), distances, d_stars, seed) if tokenizer is not None else None}


@dataclass
class FidelitySettings(SharedSettings):
    fidelity_distances: list[int] = setting(
        default_factory=list, check=DISTANCES,
        help="distances d of I_l(d); 1 and every d* are added (default: powers of two below the largest length)")
    fidelity_d_stars: list[int] = setting(
        default_factory=list, check=DISTANCES,
        help="distances at which ECLMF compares layers, one inside the memory's reach and one beyond (a FIFO pool "
             "reaches back pool_size / notes_per_chunk chunks) (default: a quarter of the largest distance and the "
             "largest, 2048 and 8192 at the default lengths)")
    fidelity_samples: int = setting(32, "fidelity windows, one per document: the first documents long enough "
                                        "(fewer when fewer are; the result reports how many)", POSITIVE)

    def resolved_distances(self) -> list[int]:
        if self.fidelity_distances:
            return self.fidelity_distances
        return [2**k for k in range(max(self.lengths).bit_length()) if 2**k < max(self.lengths)]

    def resolved_d_stars(self) -> list[int]:
        if self.fidelity_d_stars:
            return self.fidelity_d_stars
        longest = max(self.resolved_distances(), default=1)
        return sorted({max(1, longest // 4), longest})


def run(inputs: TaskInputs, settings: FidelitySettings) -> dict:
    return fidelity(inputs.lm, inputs.documents(), settings.resolved_distances(), settings.resolved_d_stars(),
                    settings.fidelity_samples, inputs.tokenizer, settings.seed)


def scalars(result: dict) -> dict[str, float]:
    """etmf_below_0.5, etmf@d*, eclmf@d*/layerN, and the needle's needle_etmf_below_0.5, needle_etmf@d*,
    needle_eclmf@d*/layerN; an undefined ratio or a threshold never crossed is left out."""
    out: dict[str, float] = {}
    blocks = {"": result, "needle_": result["needle"]} if result["needle"] else {"": result}
    for prefix, block in blocks.items():
        values: dict[str, float | None] = {}
        for threshold, distance in block["etmf_below"].items():
            values[f"{prefix}etmf_below_{threshold}"] = None if distance is None else float(distance)
        for d_star, eclmf in block["eclmf"].items():
            values[f"{prefix}etmf@{d_star}"] = block["etmf"][result["distances"].index(int(d_star))]
            values.update({f"{prefix}eclmf@{d_star}/layer{layer}": value for layer, value in enumerate(eclmf, start=1)})
        out.update({name: value for name, value in values.items() if value is not None})  # None: undefined
    return out


def _never(distance: int | None) -> str:
    return "never" if distance is None else str(distance)


def table(runs: dict[str, dict]) -> str:
    """Threshold distances per model, then influence, ETMF and ECLMF at every d*, with bootstrap intervals."""
    rows = ["| model | samples | ETMF < 0.5 at d = | ETMF < 0.1 at d = | needle ETMF < 0.5 at d = "
            "| needle ETMF < 0.1 at d = |", "|---|---:|---:|---:|---:|---:|"]
    for label, fid in runs.items():
        needle = fid["needle"]
        needle_below = [_never(needle["etmf_below"][k]) if needle else "n/a" for k in ("0.5", "0.1")]
        rows.append(f"| {label} | {fid['samples']} of {fid['samples_requested']} | {_never(fid['etmf_below']['0.5'])} "
                    f"| {_never(fid['etmf_below']['0.1'])} | {needle_below[0]} | {needle_below[1]} |")
    star_rows = ["| model | d* | I_L(d*) | ETMF(d*) | needle I_L(d*) | needle ETMF(d*) | ECLMF(L) at d* "
                 "| ECLMF per layer (at d*) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, fid in runs.items():
        for d_star in fid["eclmf"]:
            j = fid["distances"].index(int(d_star))
            cells = []
            for block in (fid, fid["needle"]):
                if block is None:
                    cells += ["n/a", "n/a"]
                    continue
                cells += [with_interval(block["influence"][-1][j], block["influence_interval"][-1][j]),
                          with_interval(block["etmf"][j], block["etmf_interval"][j])]
            cells.append(with_interval(fid["eclmf"][d_star][-1], fid["eclmf_interval"][d_star][-1]))
            cells.append(", ".join(fmt(v) for v in fid["eclmf"][d_star]))
            star_rows.append(f"| {label} | {d_star} | " + " | ".join(cells) + " |")
    longest = max(max(f["distances"]) for f in runs.values())
    return ("### Memory fidelity\n\n" + "\n".join(rows) + "\n\n" + "\n".join(star_rows)
            + f"\n\nDistances measured: up to {longest}; \"never\": the ratio stayed above the threshold over "
              "that range. Samples: windows used (one per document long enough) of those requested. "
              "Brackets: 95% bootstrap intervals over the samples. Random token: the token d back replaced; "
              "needle: a passkey needle ending d back, two keys compared (docs/evaluation.md).")


def _positive(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None or v <= 0 else v for v in values])  # log axis: no zeros


def plot(runs: dict[str, dict], path: Path) -> None:
    """Left: ETMF(d), random-token (solid) and needle (dashed), 95% bands, 0.5 / 0.1 lines.
    Right: ECLMF per layer at each d*, with 95% error bars."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, fid in runs.items():
        blocks = [("random token", "-", fid)] + ([("needle", "--", fid["needle"])] if fid["needle"] else [])
        color = None
        for kind, style, block in blocks:
            line, = left.plot(fid["distances"], _positive(block["etmf"]), style, marker="o", markersize=3,
                              color=color, label=f"{label}, {kind}")
            color = line.get_color()  # one colour per model
            lo, hi = band(block["etmf_interval"])
            left.fill_between(fid["distances"], np.where(lo > 0, lo, np.nan), hi, color=color, alpha=0.15)
        for d_star, eclmf in fid["eclmf"].items():
            lo, hi = band(fid["eclmf_interval"][d_star])
            values = np.array([np.nan if v is None else v for v in eclmf])
            layers = np.arange(1, len(eclmf) + 1)
            # A ratio of means can lie just outside its percentile interval: no negative bar lengths.
            yerr = [np.maximum(values - lo, 0), np.maximum(hi - values, 0)]
            right.errorbar(layers, values, yerr=yerr, marker="o", capsize=3,
                           label=f"{label}, d* = {d_star}")
    for threshold in THRESHOLDS:
        left.axhline(threshold, color="gray", linestyle=":", linewidth=0.8)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("distance d (tokens)")
    left.set_ylabel("ETMF(d) = I_L(d) / I_L(1)")
    left.set_title("token memory fidelity (last layer), 95% bands")
    right.set_xticks(np.arange(1, max(len(e) for f in runs.values() for e in f["eclmf"].values()) + 1))
    right.set_xlabel("layer")
    right.set_ylabel("ECLMF(l) = I_l(d*) / I_1(d*)")
    right.set_title("cross-layer memory fidelity (random token)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


TASK = Task(name="fidelity", settings=FidelitySettings, run=run, scalars=scalars, table=table, plot=plot,
            needs_data=True, needs_tokenizer=False)
