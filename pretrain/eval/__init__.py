"""Evaluation tasks: perplexity by context length, passkey retrieval, memory fidelity, needle recall.

    python -m pretrain.evaluate --model RUN_OR_HF_DIR --data SRC --tasks ppl,passkey,fidelity,recall

runs them from the command line (pretrain/evaluate.py), which calls ``run_tasks``; so can any
other caller:

    from pretrain.eval import EvalLM, TaskSettings, run_tasks
    out = run_tasks(EvalLM(model), tokenizer, TaskSettings(tasks=["ppl"], lengths=[1024]), data_dir, "validation")
    out["scalars"]   # {"ppl@1024": 12.3, ...}: flat numbers for logs and TensorBoard
    out["tasks"]     # the full results per task (see ppl.py, passkey.py, fidelity.py)

Modules: lm.py (model and tokenizer adapters), documents.py (evaluation text), one module per
task (recall.py: answers of held-out `needles` documents, in distribution), report.py
(results.json, plots, markdown, TensorBoard).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .documents import documents
from .fidelity import fidelity
from .lm import EvalLM, HFTokenizer
from .passkey import make_prompt, passkey_accuracy
from .ppl import perplexity
from .recall import needle_recall
from .report import scalars

TASKS = ("ppl", "passkey", "fidelity", "recall")


@dataclass
class TaskSettings:
    tasks: list[str] = field(default_factory=lambda: ["ppl", "passkey", "fidelity"])
    """Tasks to run, any of: ppl, passkey, fidelity, recall (needs needles-format data)."""
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    """Context lengths (tokens) of ppl (and of passkey unless passkey_lengths is set)."""
    ppl_samples: int = 8
    """Documents per length for ppl (the first ones of the split that are long enough)."""
    passkey_lengths: list[int] = field(default_factory=list)
    """Prompt lengths of passkey; empty = the same as ``lengths``."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle depths as fractions of the filler (0 = start, 1 = just before the question)."""
    passkey_trials: int = 5
    """Random keys per (length, depth) cell."""
    fidelity_distances: list[int] = field(default_factory=list)
    """Distances d of the influence I_l(d); empty = powers of two below the largest length. 1 and every d* are added."""
    fidelity_d_stars: list[int] = field(default_factory=list)
    """Distances at which ECLMF compares layers: choose one inside the memory's reach and one beyond it
    (a FIFO pool reaches back pool_size / notes_per_chunk chunks). Empty = a quarter of the largest
    distance and the largest (2048 and 8192 at the default lengths)."""
    fidelity_samples: int = 32
    """Windows the influence is averaged over, one per document (the first documents long enough;
    fewer when fewer are, the result reports how many)."""
    recall_documents: int = 64
    """Documents of the split whose every answer recall scores (the first ones)."""
    seed: int = 0
    """Seed of passkey keys, fidelity replacement tokens and needle keys, and of the bootstrap."""

    def resolved_passkey_lengths(self) -> list[int]:
        return self.passkey_lengths or self.lengths

    def resolved_distances(self) -> list[int]:
        if self.fidelity_distances:
            return self.fidelity_distances
        return [2**k for k in range(max(self.lengths).bit_length()) if 2**k < max(self.lengths)]

    def resolved_d_stars(self) -> list[int]:
        if self.fidelity_d_stars:
            return self.fidelity_d_stars
        longest = max(self.resolved_distances(), default=1)
        return sorted({max(1, longest // 4), longest})

    def validate(self, key: Callable[[str], str] = str) -> None:
        """One ValueError listing every problem, each naming its field as ``key(field)`` (by default
        the field's name; pretrain/evaluate.py passes its command-line flag, ``--passkey-trials``)."""
        problems = []

        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                problems.append(f"{key(name)}: {message}")

        unknown = [name for name in self.tasks if name not in TASKS]
        need(not unknown, "tasks", f"unknown task(s) {', '.join(unknown)}; expected any of {', '.join(TASKS)}")
        for name in ("lengths", "passkey_lengths"):
            values = getattr(self, name)
            need(all(n > 0 for n in values) and (bool(values) or name == "passkey_lengths"), name,
                 f"expected positive token counts, got {values}")
        for name in ("ppl_samples", "passkey_trials", "fidelity_samples", "recall_documents"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        need(all(0.0 <= d <= 1.0 for d in self.passkey_depths) and bool(self.passkey_depths), "passkey_depths",
             f"expected fractions in [0, 1], got {self.passkey_depths}")
        need(all(d > 0 for d in self.fidelity_distances), "fidelity_distances",
             f"expected positive distances, got {self.fidelity_distances}")
        need(all(d > 0 for d in self.fidelity_d_stars), "fidelity_d_stars",
             f"expected positive distances, got {self.fidelity_d_stars}")
        if problems:
            raise ValueError("invalid evaluation settings: " + "; ".join(problems))


def run_tasks(lm: EvalLM, tokenizer, settings: TaskSettings, data: str | Path | None, split: str) -> dict[str, Any]:
    """Run ``settings.tasks`` on ``lm``; returns {"tasks": {name: result}, "scalars": {...}, "seconds": {...}}.

    ``data`` (a prepared dataset directory or a source spec) is needed by ppl, fidelity and recall;
    ``tokenizer`` by passkey, recall, by text sources and by fidelity's needle influence (skipped without
    one). Deterministic for fixed weights and settings.
    """
    settings.validate()
    needs_data = {"ppl", "fidelity", "recall"} & set(settings.tasks)
    if needs_data:
        if data is None:
            raise ValueError(f"--data: the {' and '.join(sorted(needs_data))} task(s) need evaluation data")
        if next(documents(data, split, tokenizer), None) is None:  # also a missing split fails here, early
            raise ValueError(f"--split {split}: no documents in {data}")
    for name in [task for task in ("passkey", "recall") if task in settings.tasks]:
        if tokenizer is None:
            raise ValueError(f"--tokenizer: the {name} task needs the model's tokenizer")
    if "passkey" in settings.tasks:
        # A too-short prompt length fails here, before any work.
        make_prompt(tokenizer, min(settings.resolved_passkey_lengths()), 0.0, key=10000)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in settings.tasks:
        start = time.perf_counter()
        if name == "ppl":
            results[name] = perplexity(lm, documents(data, split, tokenizer), settings.lengths, settings.ppl_samples)
        elif name == "passkey":
            results[name] = passkey_accuracy(lm, tokenizer, settings.resolved_passkey_lengths(),
                                             settings.passkey_depths, settings.passkey_trials, settings.seed)
        elif name == "recall":
            results[name] = needle_recall(lm, tokenizer, data, split, settings.recall_documents)
        elif name == "fidelity":
            results[name] = fidelity(lm, documents(data, split, tokenizer), settings.resolved_distances(),
                                     settings.resolved_d_stars(), settings.fidelity_samples, tokenizer, settings.seed)
        seconds[name] = round(time.perf_counter() - start, 3)
    return {"tasks": results, "scalars": scalars(results), "seconds": seconds}


__all__ = ["TASKS", "EvalLM", "HFTokenizer", "TaskSettings", "run_tasks"]
