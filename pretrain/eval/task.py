"""What an evaluation task declares, so that the runner, the report and the CLI need no task of their own.

A task module (ppl.py, passkey.py, fidelity.py, recall.py) ends with one ``TASK = Task(...)``:
its name, its settings dataclass, how to run it, and how to show its result (flat scalars, a
markdown section, a PNG). pretrain/eval/registry.py lists the tasks; from that list come
``TaskSettings`` (every task's settings in one flat dataclass), ``run_tasks``, the report
(report.py) and the command-line flags (pretrain/evaluate.py).

Settings. A task's settings dataclass derives from ``SharedSettings`` (the tasks to run, the context
lengths, the seed) and adds its own fields, each named ``<task>_...`` (``passkey_trials``) and
declared with ``setting(default, help, check)``: ``help`` is the field's documentation and its
``--passkey-trials`` help, ``check`` the rule ``TaskSettings.validate`` applies to it. A task's
run function gets the whole ``TaskSettings``, which is an instance of its own settings class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .documents import documents
from .lm import EvalLM


@dataclass(frozen=True)
class Check:
    """A rule a setting's value must follow, and the message (``{value}``: the value) when it does not."""

    ok: Callable[[Any], bool]
    message: str


POSITIVE = Check(lambda value: value > 0, "must be > 0, got {value}")
TOKEN_COUNTS = Check(lambda values: bool(values) and all(n > 0 for n in values),
                     "expected positive token counts, got {value}")
TOKEN_COUNTS_OR_EMPTY = Check(lambda values: all(n > 0 for n in values), TOKEN_COUNTS.message)
FRACTIONS = Check(lambda values: bool(values) and all(0.0 <= d <= 1.0 for d in values),
                  "expected fractions in [0, 1], got {value}")
DISTANCES = Check(lambda values: all(d > 0 for d in values), "expected positive distances, got {value}")


def setting(default: Any = MISSING, help: str = "", check: Check | None = None, *,
            default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A settings field: its default, its documentation (also its command-line help) and its check."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, "check": check})


@dataclass
class SharedSettings:
    """Settings every task may read; a task's settings class derives from it."""

    tasks: list[str] = setting(default_factory=list, help="tasks to run (TaskSettings sets the default)")
    lengths: list[int] = setting(default_factory=lambda: [1024, 2048, 4096, 8192, 16384],
                                 help="context lengths of ppl and passkey", check=TOKEN_COUNTS)
    seed: int = setting(0, "seed of the passkey keys, the fidelity replacement tokens and needle keys, and of the "
                           "bootstrap")


@dataclass
class TaskInputs:
    """What a task runs on: the model, its tokenizer (None when none was found) and the evaluation data."""

    lm: EvalLM
    tokenizer: Any
    data: str | Path | None
    """A prepared dataset directory or a source spec (documents.py)."""
    split: str

    def documents(self) -> Iterator[np.ndarray]:
        """The split's tokenized documents, read afresh on every call."""
        return documents(self.data, self.split, self.tokenizer)


@dataclass(frozen=True)
class Task:
    """One evaluation task, as registry.py lists it."""

    name: str
    settings: type[SharedSettings]
    """Its settings dataclass (fields named ``<name>_...``)."""
    run: Callable[[TaskInputs, Any], dict]
    """(inputs, settings) -> the result that results.json stores under ``tasks.<name>``."""
    scalars: Callable[[dict], dict[str, float]]
    """result -> flat figures for logs and TensorBoard (``ppl@1024``)."""
    table: Callable[[dict[str, dict]], str]
    """{label: result} -> a markdown section comparing models."""
    plot: Callable[[dict[str, dict], Path], None]
    """({label: result}, path) -> a PNG comparing models."""
    needs_data: bool
    """Reads ``--data`` (run_tasks fails early without it, or when its split holds no document)."""
    needs_tokenizer: bool
    """Cannot run without the model's tokenizer."""
    default: bool = True
    """Runs when no task list is given."""
    precheck: Callable[[TaskInputs, Any], None] | None = None
    """(inputs, settings) -> None, raising ValueError for bad input before any task runs."""
