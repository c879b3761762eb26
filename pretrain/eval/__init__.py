"""Evaluation tasks: perplexity by context length, passkey retrieval, memory fidelity, needle recall.

    python -m pretrain.evaluate --model RUN_OR_HF_DIR --data SRC --tasks ppl,passkey,fidelity,recall

runs them from the command line (pretrain/evaluate.py), which calls ``run_tasks``; so can any
other caller:

    from pretrain.eval import EvalLM, TaskSettings, run_tasks
    out = run_tasks(EvalLM(model), tokenizer, TaskSettings(tasks=["ppl"], lengths=[1024]), data_dir, "validation")
    out["scalars"]   # {"ppl@1024": 12.3, ...}: flat numbers for logs and TensorBoard
    out["tasks"]     # the full results per task (see ppl.py, passkey.py, fidelity.py, recall.py)

Modules: one per task (ppl.py, passkey.py, fidelity.py, recall.py: its settings, its measurement,
its scalars, table and plot), registry.py (the list of tasks and ``TaskSettings``), task.py (what
a task declares), lm.py (model and tokenizer adapters), documents.py (evaluation text), report.py
(results for every task: scalars, markdown, plots, TensorBoard), render.py (the plots' and tables'
shared helpers). Adding a task: docs/evaluation.md, "Adding a task".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .lm import EvalLM, HFTokenizer
from .registry import TASKS, TaskSettings
from .report import scalars
from .task import TaskInputs


def run_tasks(lm: EvalLM, tokenizer, settings: TaskSettings, data: str | Path | None, split: str) -> dict[str, Any]:
    """Run ``settings.tasks`` on ``lm``; returns {"tasks": {name: result}, "scalars": {...}, "seconds": {...}}.

    ``data`` (a prepared dataset directory or a source spec) is needed by the tasks that declare
    ``needs_data`` (ppl, fidelity, recall), ``tokenizer`` by those that declare ``needs_tokenizer``
    (passkey, recall), by text sources and by fidelity's needle influence (skipped without one).
    Every input is checked before the first task runs. Deterministic for fixed weights and settings.
    """
    settings.validate()
    inputs = TaskInputs(lm, tokenizer, data, split)
    chosen = [task for name, task in TASKS.items() if name in settings.tasks]
    needs_data = sorted(task.name for task in chosen if task.needs_data)
    if needs_data:
        if data is None:
            raise ValueError(f"--data: the {' and '.join(needs_data)} task(s) need evaluation data")
        if next(inputs.documents(), None) is None:  # also a missing split fails here, early
            raise ValueError(f"--split {split}: no documents in {data}")
    for task in chosen:
        if task.needs_tokenizer and tokenizer is None:
            raise ValueError(f"--tokenizer: the {task.name} task needs the model's tokenizer")
    for task in chosen:
        if task.precheck is not None:
            task.precheck(inputs, settings)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in settings.tasks:
        start = time.perf_counter()
        results[name] = TASKS[name].run(inputs, settings)
        seconds[name] = round(time.perf_counter() - start, 3)
    return {"tasks": results, "scalars": scalars(results), "seconds": seconds}


__all__ = ["TASKS", "EvalLM", "HFTokenizer", "TaskSettings", "run_tasks"]
