"""Evaluation outputs: flat scalars, PNG plots, markdown tables, TensorBoard scalars.

Every plot function takes ``{label: task result}`` so the same code draws one model (the
evaluate CLI) or several side by side (the small-scale reproduction).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def scalars(tasks: dict[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of a tasks dict: ppl@L, passkey@L, etmf_below_0.5, etmf@d*, eclmf/layerN."""
    out: dict[str, float] = {}
    for length, entry in tasks.get("ppl", {}).items():
        if entry["ppl"] is not None:
            out[f"ppl@{length}"] = entry["ppl"]
    for length, accuracy in tasks.get("passkey", {}).get("mean", {}).items():
        out[f"passkey@{length}"] = accuracy
    fid = tasks.get("fidelity")
    if fid:
        for threshold, distance in fid["etmf_below"].items():
            if distance is not None:
                out[f"etmf_below_{threshold}"] = float(distance)
        values = {f"etmf@{fid['d_star']}": fid["etmf"][fid["distances"].index(fid["d_star"])]}
        values.update({f"eclmf/layer{layer}": value for layer, value in enumerate(fid["eclmf"], start=1)})
        out.update({name: value for name, value in values.items() if value is not None})  # None: undefined ratio
    return out


def write_tensorboard(log_dir: Path, values: dict[str, float], step: int) -> None:
    """Scalars under ``eval/<name>`` at ``step`` (the checkpoint's optimizer step)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for name, value in values.items():
        writer.add_scalar(f"eval/{name}", value, step)
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


def plot_fidelity(runs: dict[str, dict], path: Path) -> None:
    """Left: ETMF(d) with the 0.5 / 0.1 lines. Right: ECLMF per layer at d*."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(runs))
    for i, (label, fid) in enumerate(runs.items()):
        etmf = np.array([np.nan if v is None or v <= 0 else v for v in fid["etmf"]])  # log axis: no zeros
        left.plot(fid["distances"], etmf, marker="o", label=label)
        layers = np.arange(1, len(fid["eclmf"]) + 1)
        eclmf = np.array([np.nan if v is None else v for v in fid["eclmf"]])
        right.bar(layers + (i - (len(runs) - 1) / 2) * width, eclmf, width=width,
                  label=f"{label} (d* = {fid['d_star']})")
    for threshold in (0.5, 0.1):
        left.axhline(threshold, color="gray", linestyle="--", linewidth=0.8)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("distance d (tokens)")
    left.set_ylabel("ETMF(d) = I_L(d) / I_L(1)")
    left.set_title("token memory fidelity (last layer)")
    right.set_xticks(np.arange(1, max(len(f["eclmf"]) for f in runs.values()) + 1))
    right.set_xlabel("layer")
    right.set_ylabel("ECLMF(l) = I_l(d*) / I_1(d*)")
    right.set_title("cross-layer memory fidelity")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS = {"ppl": plot_ppl, "passkey": plot_passkey, "fidelity": plot_fidelity}


# ---- markdown ----

def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


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
            mean = runs[label].get("passkey", {}).get("mean", {})
            rows.append(f"| {label} | " + " | ".join(
                f"{mean[str(n)]:.0%}" if str(n) in mean else "n/a" for n in passkey_lengths) + " |")
        sections.append("### Passkey retrieval (accuracy, mean over depths)\n\n" + "\n".join(rows))
    fid_runs = {label: tasks["fidelity"] for label, tasks in runs.items() if "fidelity" in tasks}
    if fid_runs:
        rows = ["| model | ETMF < 0.5 at d = | ETMF < 0.1 at d = | ETMF(d*) | d* | ECLMF per layer (at d*) |",
                "|---|---:|---:|---:|---:|---|"]
        for label, fid in fid_runs.items():
            below = {k: ("never" if v is None else str(v)) for k, v in fid["etmf_below"].items()}
            at_star = fid["etmf"][fid["distances"].index(fid["d_star"])]
            rows.append(f"| {label} | {below['0.5']} | {below['0.1']} | {_fmt(at_star, 3)} | {fid['d_star']} | "
                        + ", ".join(_fmt(v) for v in fid["eclmf"]) + " |")
        sections.append("### Memory fidelity\n\n" + "\n".join(rows)
                        + f"\n\nDistances measured: up to {max(max(f['distances']) for f in fid_runs.values())}; "
                          "\"never\" means ETMF stayed above the threshold over that range.")
    return "\n\n".join(sections) + "\n"
