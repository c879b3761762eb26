"""The evaluation tasks, listed once; everything else that knows tasks reads this list.

``TASKS`` maps a task's name to the ``Task`` its module declares (task.py). A new task is one new
module ending in ``TASK = Task(...)`` plus its entry here (the import and the tuple below); then
``run_tasks``, results.json, the scalars, summary.md, the PNGs and the ``--<task>-...`` flags of
pretrain/evaluate.py all include it. The order here is the order of ``--tasks``' list, of the
settings, of the report's sections and of the scalars.

``TaskSettings`` is every task's settings in one flat dataclass (a subclass of each task's settings
class, so each run function gets what it declared): results.json stores it as ``settings``, the
CLI makes one flag per field, and ``validate`` applies every field's check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, make_dataclass

from . import fidelity, passkey, ppl, recall
from .task import Task, setting

TASKS: dict[str, Task] = {task.name: task for task in (ppl.TASK, passkey.TASK, fidelity.TASK, recall.TASK)}


def _validate(self, key: Callable[[str], str] = str) -> None:
    """One ValueError listing every problem, each naming its field as ``key(field)`` (by default the
    field's name; pretrain/evaluate.py passes its command-line flag, ``--passkey-trials``)."""
    problems = []
    unknown = [name for name in self.tasks if name not in TASKS]
    if unknown:
        problems.append(f"{key('tasks')}: unknown task(s) {', '.join(unknown)}; expected any of {', '.join(TASKS)}")
    for f in fields(self):
        check, value = f.metadata.get("check"), getattr(self, f.name)
        if check is not None and not check.ok(value):
            problems.append(f"{key(f.name)}: {check.message.format(value=value)}")
    if problems:
        raise ValueError("invalid evaluation settings: " + "; ".join(problems))


# Fields in order: SharedSettings' (tasks, lengths, seed), then each task's, in the order of TASKS.
TaskSettings = make_dataclass(
    "TaskSettings",
    [("tasks", list[str], setting(default_factory=lambda: [name for name, task in TASKS.items() if task.default],
                                  help=f"comma-separated subset of {','.join(TASKS)}"))],
    bases=tuple(task.settings for task in reversed(TASKS.values())),
    namespace={"validate": _validate, "__doc__": "Every task's settings (see the module docstring)."})
TaskSettings.__module__ = __name__
