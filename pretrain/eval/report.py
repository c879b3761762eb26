"""Evaluation outputs over every task: flat scalars, PNG plots, markdown tables, TensorBoard scalars.

Each task declares its own scalars, table and plot (its module; registry.py lists them); this module
combines them in the registry's order. Every plot and table takes ``{label: task result}`` so the
same code draws one model (the evaluate CLI) or several side by side (the small-scale reproduction).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .registry import TASKS


def scalars(tasks: dict[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of a tasks dict, task by task: ppl@L, passkey@L, etmf_below_0.5, etmf@d*,
    eclmf@d*/layerN, the needle's needle_etmf_below_0.5, needle_etmf@d*, needle_eclmf@d*/layerN,
    recall, recall_passkey, recall_fact (each task module's ``scalars`` says which)."""
    out: dict[str, float] = {}
    for name, task in TASKS.items():
        if name in tasks:
            out.update(task.scalars(tasks[name]))
    return out


def write_tensorboard(log_dir: Path, values: dict[str, float], step: int, prefix: str = "eval") -> None:
    """Scalars under ``<prefix>/<name>`` at ``step`` (the checkpoint's optimizer step)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for name, value in values.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)
    writer.close()


def _ran(runs: dict[str, dict[str, Any]]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(name, task, {label: result}) for each task, in the registry's order, that any of ``runs`` ran."""
    for name, task in TASKS.items():
        results = {label: tasks[name] for label, tasks in runs.items() if name in tasks}
        if results:
            yield name, task, results


def write_plots(runs: dict[str, dict[str, Any]], directory: Path) -> None:
    """``<task>.png`` in ``directory`` for each task any of ``{label: tasks dict}`` ran, with the models that ran it."""
    for name, task, results in _ran(runs):
        task.plot(results, directory / f"{name}.png")


def markdown_tables(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown tables comparing ``{label: tasks dict}``: one section per task any of them ran, with
    the models that ran it."""
    sections = [section for _, task, results in _ran(runs) if (section := task.table(results))]
    return "\n\n".join(sections) + "\n"
