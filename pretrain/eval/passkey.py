"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", arXiv 2305.16300).

A prompt of exactly L tokens: the task description, filler text repeated, the needle
"The pass key is 48213. Remember it. 48213 is the pass key." at a chosen depth, more filler,
and the question "What is the pass key? The pass key is". The model continues greedily; the
trial counts as correct when the first number it writes is the key. Accuracy is reported per
(length, depth) cell over ``trials`` random 5-digit keys, with its Wilson 95% score interval
(Wilson 1927): close to its nominal coverage even at 20 trials and at 0 % or 100 %, where the
normal approximation collapses to a zero-width interval. The wording is that of the original
prompt, and also that of the passkeys in our synthetic corpus (data_prep/synthetic.py).

Layout in tokens (each piece tokenized on its own, every piece after the description starting
with a space, so the concatenation is the text's own tokenization with our tokenizers):

    [EOD] [description] [filler x before] [needle] [filler x after] [question]

``before`` is ``depth`` of the filler, rounded to whole filler groups (5 sentences): depth 0 puts
the needle right after the description, depth 1 right before the question (at most one
partial filler group after it). The filler and description hold no digits, so the key is
written in the prompt only inside the needle.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .lm import EvalLM
from .render import percent_interval, pyplot, save
from .task import FRACTIONS, POSITIVE, TOKEN_COUNTS_OR_EMPTY, SharedSettings, Task, TaskInputs, setting

DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal distribution."""
BATCH_TOKENS = 16384
"""Prompt tokens decoded in one batch (trials of a cell share a batch; one prompt per batch at 16k)."""


@dataclass
class PasskeyPrompt:
    tokens: np.ndarray
    """(length,) int64 prompt."""
    key: int
    needle_start: int
    """Token position where the needle begins."""
    needle_tokens: np.ndarray
    """The needle's tokens (they occur exactly once in ``tokens``)."""


def make_prompt(tokenizer, length: int, depth: float, key: int) -> PasskeyPrompt:
    """The passkey prompt of exactly ``length`` tokens with the needle at ``depth`` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth: expected a fraction in [0, 1], got {depth}")
    prefix = [tokenizer.eod_id, *tokenizer.encode(DESCRIPTION)]
    unit = tokenizer.encode(FILLER)
    needle = np.asarray(tokenizer.encode(NEEDLE.format(key=key)), dtype=np.int64)
    question = tokenizer.encode(QUESTION)
    filler_len = length - len(prefix) - len(needle) - len(question)
    if filler_len < 0:
        raise ValueError(f"passkey length {length}: too short, the prompt without filler already takes "
                         f"{length - filler_len} tokens")
    before = round(depth * (filler_len // len(unit))) * len(unit)
    filler = np.resize(np.asarray(unit, dtype=np.int64), filler_len)  # the filler group, repeated and cut
    tokens = np.concatenate([prefix, filler[:before], needle, filler[before:], question]).astype(np.int64)
    return PasskeyPrompt(tokens=tokens, key=key, needle_start=len(prefix) + before, needle_tokens=needle)


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> list[float]:
    """[lo, hi] Wilson score interval of a binomial proportion ``successes / trials``."""
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"wilson_interval: expected 0 <= successes <= trials >= 1, got {successes}/{trials}")
    p, n = successes / trials, trials
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def first_number(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def passkey_accuracy(lm: EvalLM, tokenizer, lengths: list[int], depths: list[float], trials: int,
                     seed: int = 0) -> dict:
    """Greedy retrieval accuracy per (length, depth).

    The trials of a cell are decoded together, in batches of at most ``BATCH_TOKENS`` prompt tokens.
    Returns {"lengths", "depths", "trials", "accuracy": [[acc per depth] per length],
    "mean": {str(L): mean over depths}, "answers": {"L@depth": [generated text per trial]},
    "interval": [[[lo, hi] per depth] per length] (Wilson 95% of each cell's trials),
    "mean_interval": {str(L): [lo, hi]} (Wilson 95% of all trials of the length, pooled)}.
    """
    rng = random.Random(seed)
    correct, answers = [], {}  # correct: [[trials answered right per depth] per length]
    for length in lengths:
        row = []
        batch_size = max(1, BATCH_TOKENS // length)
        for depth in depths:
            prompts = [make_prompt(tokenizer, length, depth, rng.randint(10000, 99999)) for _ in range(trials)]
            answer_len = max(len(tokenizer.encode(f" {p.key}.")) for p in prompts) + 1
            texts = []
            for start in range(0, trials, batch_size):
                batch = torch.from_numpy(np.stack([p.tokens for p in prompts[start:start + batch_size]]))
                texts += [tokenizer.decode(row_ids.tolist()) for row_ids in lm.greedy(batch, answer_len)]
            row.append(sum(first_number(text) == p.key for text, p in zip(texts, prompts)))
            answers[f"{length}@{depth:g}"] = texts
        correct.append(row)
    accuracy = [[k / trials for k in row] for row in correct]
    return {"lengths": lengths, "depths": depths, "trials": trials, "accuracy": accuracy,
            "mean": {str(length): float(np.mean(row)) for length, row in zip(lengths, accuracy)},
            "answers": answers,
            "interval": [[wilson_interval(k, trials) for k in row] for row in correct],
            "mean_interval": {str(length): wilson_interval(sum(row), trials * len(row))
                              for length, row in zip(lengths, correct)}}


@dataclass
class PasskeySettings(SharedSettings):
    passkey_lengths: list[int] = setting(default_factory=list, check=TOKEN_COUNTS_OR_EMPTY,
                                         help="passkey prompt lengths (default: the same as --lengths)")
    passkey_depths: list[float] = setting(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], check=FRACTIONS,
                                          help="needle depths, fractions of the filler (0 = start, 1 = just before "
                                               "the question)")
    passkey_trials: int = setting(5, "random keys per (length, depth) cell", POSITIVE)

    def resolved_passkey_lengths(self) -> list[int]:
        return self.passkey_lengths or self.lengths


def precheck(inputs: TaskInputs, settings: PasskeySettings) -> None:
    """A prompt length too short for the prompt fails here, before any task runs."""
    make_prompt(inputs.tokenizer, min(settings.resolved_passkey_lengths()), 0.0, key=10000)


def run(inputs: TaskInputs, settings: PasskeySettings) -> dict:
    return passkey_accuracy(inputs.lm, inputs.tokenizer, settings.resolved_passkey_lengths(), settings.passkey_depths,
                            settings.passkey_trials, settings.seed)


def scalars(result: dict) -> dict[str, float]:
    """passkey@L: accuracy at length L, mean over depths."""
    return {f"passkey@{length}": accuracy for length, accuracy in result["mean"].items()}


def table(runs: dict[str, dict]) -> str:
    """Accuracy per model and length (mean over depths) with Wilson intervals; "" without lengths."""
    lengths = sorted({int(n) for result in runs.values() for n in result.get("mean", {})})
    if not lengths:
        return ""
    rows = ["| model | " + " | ".join(f"passkey@{n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for label, result in runs.items():
        mean, interval = result.get("mean", {}), result.get("mean_interval", {})
        rows.append(f"| {label} | " + " | ".join(
            percent_interval(mean[str(n)], interval.get(str(n))) if str(n) in mean else "n/a"
            for n in lengths) + " |")
    trials = {result["trials"] * len(result["depths"]) for result in runs.values()}
    return ("### Passkey retrieval (accuracy, mean over depths)\n\n" + "\n".join(rows)
            + f"\n\nBrackets: Wilson 95% intervals over the {', '.join(map(str, sorted(trials)))} trials "
              "of a length (all depths pooled).")


def plot(runs: dict[str, dict], path: Path) -> None:
    """One accuracy heatmap (lengths x depths) per model."""
    plt = pyplot()
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
    save(fig, path)


TASK = Task(name="passkey", settings=PasskeySettings, run=run, scalars=scalars, table=table, plot=plot,
            needs_data=False, needs_tokenizer=True, precheck=precheck)
