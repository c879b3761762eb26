"""Needle recall in distribution: does the model answer the questions of held-out `needles` documents?

Passkey retrieval (passkey.py) asks one question in a prompt the model never trained on, at
lengths it never trained at. Recall asks every question of documents like the training ones
(data_prep/needles.py: a passkey and key -> value facts, questions at the end), so it tells a
model that cannot retrieve at all from one that retrieves but does not extrapolate.

A document is read once, teacher-forced, with the EOD id before it (as in the training stream).
An answer counts as recalled when every one of its tokens is the model's argmax there, which is
what greedy decoding of the answer would write. Each answer's distance is the number of tokens
from its needle's start to the answer's first token. Results: accuracy per kind (passkey, fact),
per distance bucket and overall, each with its Wilson 95% interval (passkey.py).

The needles and answers are found in the text by the needles format's own sentences
(``PASSKEY_NEEDLE``, ``FACT_NEEDLE`` and the questions), so any source of needles-format text
works: a `needles:...` spec, or a dataset prepared from one (its manifest names the source; the
text is regenerated from it, since the shards do not keep where an answer starts). Each text piece
(up to a needle, a needle, up to an answer, an answer) is tokenized on its own, like the passkey
prompt's pieces. Every cut is made before a space (a needle's piece starts with the space before
it, an answer's with its own), where our tokenizers always start a new token, so the pieces give
the text's own tokenization (tested). A cut after the space would read "▁" + "The" instead of
"▁The", a sequence training never showed: that bug made a model that recalls every passkey score 18%.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import MANIFEST, load_manifest
from data_prep.sources import open_source

from .lm import EvalLM
from .passkey import wilson_interval
from .render import band, percent_interval, pyplot, save
from .task import POSITIVE, SharedSettings, Task, TaskInputs, setting

_QUESTION = re.compile(r"^What is (the pass key|the code of (\w+))\? The (?:pass key|code of \w+) is( \d+)\.$",
                       re.MULTILINE)
BUCKET_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096)
"""Distance buckets [edge_i, edge_i+1) in tokens; the last one is open-ended."""


def _answer_spans(text: str) -> list[tuple[str, int, int, int]]:
    """(kind, needle start, answer start, answer end) character offsets of every question of a
    needles-format document whose needle is in the text before it."""
    spans = []
    for match in _QUESTION.finditer(text):
        value = match.group(3).strip()
        needle = (f"The pass key is {value}." if match.group(2) is None
                  else f"The code of {match.group(2)} is {value}.")
        start = text.find(needle)
        if start > 0 and text[start - 1] == " ":
            start -= 1  # the needle's piece starts at its space, as "▁The" is one token (not "▁" + "The")
        if 0 <= start < match.start():
            spans.append(("passkey" if match.group(2) is None else "fact", start, match.start(3), match.end(3)))
    return spans


def _source_spec(data: str | Path) -> str:
    """A text source spec: ``data`` itself, or the source a prepared dataset was made from."""
    if (Path(data) / MANIFEST).is_file():
        return load_manifest(data)["source"]
    return str(data)


def _encode_pieces(tokenizer, text: str, cuts: list[int]) -> tuple[np.ndarray, list[int]]:
    """[EOD] + the tokens of text cut at the character offsets ``cuts`` (sorted), and the token
    position where each cut's piece starts."""
    ids, starts, previous = [tokenizer.eod_id], [], 0
    for cut in [*cuts, len(text)]:
        ids += tokenizer.encode(text[previous:cut])
        starts.append(len(ids))
        previous = cut
    return np.asarray(ids, dtype=np.int64), starts[:-1]


def _summary(correct: list[bool]) -> dict:
    hits = sum(correct)
    return {"count": len(correct), "accuracy": hits / len(correct) if correct else None,
            "interval": wilson_interval(hits, len(correct)) if correct else None}


def needle_recall(lm: EvalLM, tokenizer, data: str | Path, split: str, documents: int) -> dict:
    """Recall of the answers in the first ``documents`` documents of ``split``.

    Returns {"documents", "answers", "accuracy", "interval", "kinds": {kind: {"count", "accuracy",
    "interval"}}, "buckets": [{"start", "end" (None: open), "count", "accuracy", "interval"}]}
    (accuracy and interval None where nothing was measured). ValueError when the text holds no
    needles-format question.
    """
    source = open_source(_source_spec(data))
    source.require_split(split)
    results: list[tuple[str, int, bool]] = []  # (kind, distance, recalled)
    read = 0
    for text in source.documents(split, 0, documents):
        read += 1
        spans = _answer_spans(text)
        if not spans:
            continue
        cuts = sorted({offset for _, needle, start, end in spans for offset in (needle, start, end)})
        ids, starts = _encode_pieces(tokenizer, text, cuts)
        at = dict(zip(cuts, starts))
        predicted = lm.argmax(torch.from_numpy(ids).unsqueeze(0))[0].cpu().numpy()  # predicted[t]: token t + 1
        for kind, needle, start, end in spans:
            first, last = at[start], at[end]  # the answer's tokens are ids[first:last]
            recalled = bool((predicted[first - 1:last - 1] == ids[first:last]).all())
            results.append((kind, first - at[needle], recalled))
    if not results:
        raise ValueError(f"--data {data}: no needles-format question in the first {documents} documents of "
                         f"'{split}' (recall needs text made by the needles source)")
    buckets = []
    for lo, hi in zip(BUCKET_EDGES, [*BUCKET_EDGES[1:], None]):
        inside = [ok for _, d, ok in results if d >= lo and (hi is None or d < hi)]
        if inside:
            buckets.append({"start": lo, "end": hi, **_summary(inside)})
    overall = _summary([ok for _, _, ok in results])
    return {"documents": read, "answers": overall["count"], "accuracy": overall["accuracy"],
            "interval": overall["interval"],
            "kinds": {kind: _summary([ok for k, _, ok in results if k == kind])
                      for kind in ("passkey", "fact") if any(k == kind for k, _, _ in results)},
            "buckets": buckets}


@dataclass
class RecallSettings(SharedSettings):
    recall_documents: int = setting(64, "documents of the split whose every answer recall scores (the first ones)",
                                    POSITIVE)


def run(inputs: TaskInputs, settings: RecallSettings) -> dict:
    return needle_recall(inputs.lm, inputs.tokenizer, inputs.data, inputs.split, settings.recall_documents)


def scalars(result: dict) -> dict[str, float]:
    """recall (all answers) and recall_<kind> (passkey, fact)."""
    return {"recall": result["accuracy"],
            **{f"recall_{kind}": entry["accuracy"] for kind, entry in result["kinds"].items()}}


def table(runs: dict[str, dict]) -> str:
    """Accuracy per model: overall, per kind and per distance bucket, with Wilson intervals."""
    edges = sorted({(b["start"], b["end"]) for r in runs.values() for b in r["buckets"]}, key=lambda edge: edge[0])
    names = [f"{lo}-{hi}" if hi is not None else f"{lo}+" for lo, hi in edges]
    rows = ["| model | answers | all | passkey | fact | " + " | ".join(f"d {n}" for n in names) + " |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(edges)]
    for label, recall in runs.items():
        kinds = [recall["kinds"].get(kind) for kind in ("passkey", "fact")]
        by_edge = {(b["start"], b["end"]): b for b in recall["buckets"]}
        cells = [percent_interval(recall["accuracy"], recall["interval"])]
        cells += ["n/a" if k is None else percent_interval(k["accuracy"], k["interval"]) for k in kinds]
        cells += [percent_interval(by_edge[e]["accuracy"], by_edge[e]["interval"]) if e in by_edge else "n/a"
                  for e in edges]
        rows.append(f"| {label} | {recall['answers']} | " + " | ".join(cells) + " |")
    return ("### Needle recall in distribution (answers of held-out needles documents)\n\n" + "\n".join(rows)
            + "\n\nd: tokens from the needle to its answer. Brackets: Wilson 95% intervals.")


def plot(runs: dict[str, dict], path: Path) -> None:
    """Recall accuracy by needle distance bucket, one line per model, 95% bands."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, recall in runs.items():
        starts = [b["start"] for b in recall["buckets"]]
        lo, hi = band([b["interval"] for b in recall["buckets"]])
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
    save(fig, path)


# Not a default task: it needs needles-format text (a needles: spec or a dataset prepared from one).
TASK = Task(name="recall", settings=RecallSettings, run=run, scalars=scalars, table=table, plot=plot,
            needs_data=True, needs_tokenizer=True, default=False)
