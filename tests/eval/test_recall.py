"""Needle recall: answers and needles are found where the needles format puts them, an ideal copier
recalls them, a model that never copies recalls none, and text without needles is a clear error."""

import pytest
import torch
import torch.nn as nn

from data_prep.sources import open_source
from pretrain.eval import EvalLM, TaskSettings, run_tasks
from pretrain.eval.recall import _answer_spans, _encode_pieces, needle_recall
from pretrain.eval.report import markdown_tables, write_plots
from tokenizer import Tokenizer

from .conftest import InductionCopier

SOURCE = "needles:docs=80,seed=3,words=120,facts=3"  # validation: 4 documents


@pytest.fixture(scope="module")
def tokenizer(synthetic_data) -> Tokenizer:
    return Tokenizer(synthetic_data["tokenizer"])


class EveryPositionCopier(InductionCopier):
    """InductionCopier's rule applied at every position (recall reads all positions' predictions)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t in range(1, len(row)):
                logits[b, t, self._next(row[:t + 1])] = 1.0
        return logits


class Constant(nn.Module):
    """Always predicts token 0."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab_size})()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        logits[..., 0] = 1.0
        return logits


def test_spans_point_at_needles_and_answers(tokenizer):
    text = next(open_source(SOURCE).documents("validation"))
    spans = _answer_spans(text)
    assert [kind for kind, *_ in spans].count("passkey") == 1 and len(spans) == 4  # 1 passkey + 3 facts
    cuts = sorted({offset for _, needle, start, end in spans for offset in (needle, start, end)})
    ids, starts = _encode_pieces(tokenizer, text, cuts)
    at = dict(zip(cuts, starts))
    assert ids[0] == tokenizer.eod_id and ids[1:].tolist() == tokenizer.encode(text)  # the text's own tokens
    for kind, needle, start, end in spans:
        answer = tokenizer.decode(ids[at[start]:at[end]].tolist())
        assert answer == text[start:end] and answer.strip().isdigit()
        assert tokenizer.decode(ids[at[needle]:at[needle] + 4].tolist()).startswith(" The ")
        needle_text = text[needle:text.index(".", needle) + 1].lstrip()
        assert needle_text.endswith(f"is{answer}.") and (kind == "passkey") == needle_text.startswith("The pass key")


def test_copier_recalls_and_constant_does_not(tokenizer):
    copier = needle_recall(EvalLM(EveryPositionCopier(tokenizer.vocab_size)), tokenizer, SOURCE, "validation", 4)
    assert copier["documents"] == 4 and copier["answers"] == 16
    assert copier["accuracy"] >= 0.9 and copier["kinds"]["passkey"]["count"] == 4
    assert sum(b["count"] for b in copier["buckets"]) == 16
    assert all(b["start"] < 512 for b in copier["buckets"])  # 120 filler words: every needle is near
    beyond = needle_recall(EvalLM(EveryPositionCopier(tokenizer.vocab_size)), tokenizer, SOURCE, "validation", 10)
    assert beyond["documents"] == 4 and beyond["answers"] == 16  # the split's end, not documents past it
    constant = needle_recall(EvalLM(Constant(tokenizer.vocab_size)), tokenizer, SOURCE, "validation", 4)
    assert constant["accuracy"] == 0.0 and constant["interval"][0] == 0.0 < constant["interval"][1]


def test_run_tasks_reports_recall(tokenizer, tmp_path):
    settings = TaskSettings(tasks=["recall"], recall_documents=2)
    out = run_tasks(EvalLM(EveryPositionCopier(tokenizer.vocab_size)), tokenizer, settings, SOURCE, "validation")
    assert out["scalars"]["recall"] == out["tasks"]["recall"]["accuracy"]
    assert set(out["scalars"]) == {"recall", "recall_passkey", "recall_fact"}
    write_plots({"copier": out["tasks"]}, tmp_path)
    assert [p.name for p in tmp_path.glob("*.png")] == ["recall.png"] and (tmp_path / "recall.png").stat().st_size > 0
    table = markdown_tables({"copier": out["tasks"]})
    assert "Needle recall in distribution" in table and "| copier | 8 |" in table


def test_text_without_needles_is_a_clear_error(tokenizer, pg19_mini):
    with pytest.raises(ValueError, match="no needles-format question"):
        needle_recall(EvalLM(Constant(tokenizer.vocab_size)), tokenizer, f"pg19:{pg19_mini}", "validation", 2)
    with pytest.raises(ValueError, match="recall_documents: must be > 0"):
        TaskSettings(tasks=["recall"], recall_documents=0).validate()
