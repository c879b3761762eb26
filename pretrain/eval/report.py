"""Evaluation outputs: flat scalars, PNG plots, markdown tables, TensorBoard scalars.

Every plot function takes ``{label: task result}`` so the same code draws one model (the
evaluate CLI) or several side by side (the small-scale reproduction).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .fidelity import THRESHOLDS


def scalars(tasks: dict[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of a tasks dict: ppl@L, passkey@L, recall, recall_passkey, recall_fact,
    etmf_below_0.5, etmf@d*, eclmf@d*/layerN, and the needle's needle_etmf_below_0.5, needle_etmf@d*,
    needle_eclmf@d*/layerN."""
    out: dict[str, float] = {}
    for length, entry in tasks.get("ppl", {}).items():
        if entry["ppl"] is not None:
            out[f"ppl@{length}"] = entry["ppl"]
    for length, accuracy in tasks.get("passkey", {}).get("mean", {}).items():
        out[f"passkey@{length}"] = accuracy
    recall = tasks.get("recall")
    if recall:
        out["recall"] = recall["accuracy"]
        out.update({f"recall_{kind}": entry["accuracy"] for kind, entry in recall["kinds"].items()})
    fid = tasks.get("fidelity")
    if fid:
        blocks = {"": fid, "needle_": fid["needle"]} if fid["needle"] else {"": fid}
        for prefix, block in blocks.items():
            values: dict[str, float | None] = {}
            for threshold, distance in block["etmf_below"].items():
                values[f"{prefix}etmf_below_{threshold}"] = None if distance is None else float(distance)
            for d_star, eclmf in block["eclmf"].items():
                values[f"{prefix}etmf@{d_star}"] = block["etmf"][fid["distances"].index(int(d_star))]
                values.update({f"{prefix}eclmf@{d_star}/layer{layer}": value
                               for layer, value in enumerate(eclmf, start=1)})
            out.update({name: value for name, value in values.items() if value is not None})  # None: undefined
    return out


def write_tensorboard(log_dir: Path, values: dict[str, float], step: int, prefix: str = "eval") -> None:
    """Scalars under ``<prefix>/<name>`` at ``step`` (the checkpoint's optimizer step)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for name, value in values.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)
    writer.close()


# ---- plots ----

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(runs: dict[str, dict], path: Path) -> None:
    """Left: PPL against context length. Right: PPL by position bucket at the longest measured length."""
    plt = _pyplot()
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(runs: dict[str, dict], path: Path) -> None:
    """One accuracy heatmap (lengths x depths) per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs) + 1, 3.8), squeeze=False)
    for ax, (label, result) in zip(axes[0], runs.items()):
        grid = np.array(result["accuracy"])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
        ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length")
        ax.set_title(f"passkey accuracy: {label}")
    fig.colorbar(image, ax=axes[0].tolist())
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _band(pairs: list) -> tuple[np.ndarray, np.ndarray]:
    """[[lo, hi] or None per point] -> (lo, hi) arrays, NaN where undefined."""
    lo = np.array([np.nan if p is None else p[0] for p in pairs])
    hi = np.array([np.nan if p is None else p[1] for p in pairs])
    return lo, hi


def _positive(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None or v <= 0 else v for v in values])  # log axis: no zeros


def plot_fidelity(runs: dict[str, dict], path: Path) -> None:
    """Left: ETMF(d), random-token (solid) and needle (dashed), 95% bands, 0.5 / 0.1 lines.
    Right: ECLMF per layer at each d*, with 95% error bars."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, fid in runs.items():
        blocks = [("random token", "-", fid)] + ([("needle", "--", fid["needle"])] if fid["needle"] else [])
        color = None
        for kind, style, block in blocks:
            line, = left.plot(fid["distances"], _positive(block["etmf"]), style, marker="o", markersize=3,
                              color=color, label=f"{label}, {kind}")
            color = line.get_color()  # one colour per model
            lo, hi = _band(block["etmf_interval"])
            left.fill_between(fid["distances"], np.where(lo > 0, lo, np.nan), hi, color=color, alpha=0.15)
        for d_star, eclmf in fid["eclmf"].items():
            lo, hi = _band(fid["eclmf_interval"][d_star])
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(runs: dict[str, dict], path: Path) -> None:
    """Recall accuracy by needle distance bucket, one line per model, 95% bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, recall in runs.items():
        starts = [b["start"] for b in recall["buckets"]]
        lo, hi = _band([b["interval"] for b in recall["buckets"]])
        ax.plot(starts, [b["accuracy"] for b in recall["buckets"]], marker="o", label=label)
        ax.fill_between(starts, lo, hi, alpha=0.2)
    ax.set_xscale("symlog", base=2, linthresh=64)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("needle -> answer distance (tokens, bucket start)")
    ax.set_ylabel("answers recalled")
    ax.set_title("needle recall in distribution")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS = {"ppl": plot_ppl, "passkey": plot_passkey, "fidelity": plot_fidelity, "recall": plot_recall}


# ---- markdown ----

def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    """"0.123 [0.101, 0.15]" (3 significant digits: influences span many decades); the value alone
    when its interval is undefined."""
    if value is None:
        return "n/a"
    if interval is None:
        return f"{value:.3g}"
    return f"{value:.3g} [{interval[0]:.3g}, {interval[1]:.3g}]"


def _percent_interval(value: float, interval: list[float] | None) -> str:
    """"85% [64-95]": accuracy with its 95% interval in percent."""
    if interval is None:
        return f"{value:.0%}"
    return f"{value:.0%} [{100 * interval[0]:.0f}-{100 * interval[1]:.0f}]"


def _never(distance: int | None) -> str:
    return "never" if distance is None else str(distance)


def _fidelity_tables(fid_runs: dict[str, dict]) -> str:
    rows = ["| model | samples | ETMF < 0.5 at d = | ETMF < 0.1 at d = | needle ETMF < 0.5 at d = "
            "| needle ETMF < 0.1 at d = |", "|---|---:|---:|---:|---:|---:|"]
    for label, fid in fid_runs.items():
        needle = fid["needle"]
        needle_below = [_never(needle["etmf_below"][k]) if needle else "n/a" for k in ("0.5", "0.1")]
        rows.append(f"| {label} | {fid['samples']} of {fid['samples_requested']} | {_never(fid['etmf_below']['0.5'])} "
                    f"| {_never(fid['etmf_below']['0.1'])} | {needle_below[0]} | {needle_below[1]} |")
    star_rows = ["| model | d* | I_L(d*) | ETMF(d*) | needle I_L(d*) | needle ETMF(d*) | ECLMF(L) at d* "
                 "| ECLMF per layer (at d*) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, fid in fid_runs.items():
        for d_star in fid["eclmf"]:
            j = fid["distances"].index(int(d_star))
            cells = []
            for block in (fid, fid["needle"]):
                if block is None:
                    cells += ["n/a", "n/a"]
                    continue
                cells += [_with_interval(block["influence"][-1][j], block["influence_interval"][-1][j]),
                          _with_interval(block["etmf"][j], block["etmf_interval"][j])]
            cells.append(_with_interval(fid["eclmf"][d_star][-1], fid["eclmf_interval"][d_star][-1]))
            cells.append(", ".join(_fmt(v) for v in fid["eclmf"][d_star]))
            star_rows.append(f"| {label} | {d_star} | " + " | ".join(cells) + " |")
    longest = max(max(f["distances"]) for f in fid_runs.values())
    return ("### Memory fidelity\n\n" + "\n".join(rows) + "\n\n" + "\n".join(star_rows)
            + f"\n\nDistances measured: up to {longest}; \"never\": the ratio stayed above the threshold over "
              "that range. Samples: windows used (one per document long enough) of those requested. "
              "Brackets: 95% bootstrap intervals over the samples. Random token: the token d back replaced; "
              "needle: a passkey needle ending d back, two keys compared (docs/evaluation.md).")


def _recall_table(recall_runs: dict[str, dict]) -> str:
    edges = sorted({(b["start"], b["end"]) for r in recall_runs.values() for b in r["buckets"]},
                   key=lambda edge: edge[0])
    names = [f"{lo}-{hi}" if hi is not None else f"{lo}+" for lo, hi in edges]
    rows = ["| model | answers | all | passkey | fact | " + " | ".join(f"d {n}" for n in names) + " |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(edges)]
    for label, recall in recall_runs.items():
        kinds = [recall["kinds"].get(kind) for kind in ("passkey", "fact")]
        by_edge = {(b["start"], b["end"]): b for b in recall["buckets"]}
        cells = [_percent_interval(recall["accuracy"], recall["interval"])]
        cells += ["n/a" if k is None else _percent_interval(k["accuracy"], k["interval"]) for k in kinds]
        cells += [_percent_interval(by_edge[e]["accuracy"], by_edge[e]["interval"]) if e in by_edge else "n/a"
                  for e in edges]
        rows.append(f"| {label} | {recall['answers']} | " + " | ".join(cells) + " |")
    return ("### Needle recall in distribution (answers of held-out needles documents)\n\n" + "\n".join(rows)
            + "\n\nd: tokens from the needle to its answer. Brackets: Wilson 95% intervals.")


def markdown_tables(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown tables comparing ``{label: tasks dict}`` over every task any of them ran."""
    labels = list(runs)
    sections = []
    ppl_lengths = sorted({int(n) for tasks in runs.values() for n in tasks.get("ppl", {})})
    if ppl_lengths:
        rows = ["| model | " + " | ".join(f"PPL@{n}" for n in ppl_lengths) + " |",
                "|---|" + "---:|" * len(ppl_lengths)]
        for label in labels:
            ppl = runs[label].get("ppl", {})
            rows.append(f"| {label} | " + " | ".join(_fmt(ppl.get(str(n), {}).get("ppl")) for n in ppl_lengths) + " |")
        docs = {n: max(runs[label].get("ppl", {}).get(str(n), {}).get("documents", 0) for label in labels)
                for n in ppl_lengths}
        note = ", ".join(f"{n}: {d}" for n, d in docs.items())
        sections.append("### Perplexity by context length\n\n" + "\n".join(rows)
                        + f"\n\nDocuments per length: {note} (a length no document reaches shows n/a).")
    passkey_lengths = sorted({int(n) for tasks in runs.values() for n in tasks.get("passkey", {}).get("mean", {})})
    if passkey_lengths:
        rows = ["| model | " + " | ".join(f"passkey@{n}" for n in passkey_lengths) + " |",
                "|---|" + "---:|" * len(passkey_lengths)]
        for label in labels:
            passkey = runs[label].get("passkey", {})
            mean, interval = passkey.get("mean", {}), passkey.get("mean_interval", {})
            rows.append(f"| {label} | " + " | ".join(
                _percent_interval(mean[str(n)], interval.get(str(n))) if str(n) in mean else "n/a"
                for n in passkey_lengths) + " |")
        trials = {runs[label]["passkey"]["trials"] * len(runs[label]["passkey"]["depths"])
                  for label in labels if "passkey" in runs[label]}
        sections.append("### Passkey retrieval (accuracy, mean over depths)\n\n" + "\n".join(rows)
                        + f"\n\nBrackets: Wilson 95% intervals over the {', '.join(map(str, sorted(trials)))} trials "
                          "of a length (all depths pooled).")
    recall_runs = {label: tasks["recall"] for label, tasks in runs.items() if "recall" in tasks}
    if recall_runs:
        sections.append(_recall_table(recall_runs))
    fid_runs = {label: tasks["fidelity"] for label, tasks in runs.items() if "fidelity" in tasks}
    if fid_runs:
        sections.append(_fidelity_tables(fid_runs))
    return "\n\n".join(sections) + "\n"
