"""Perplexity by context length: equals exp(mean NLL) computed independently; data from shards or text."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.sources import open_source
from pretrain.eval import EvalLM
from pretrain.eval.documents import documents
from pretrain.eval.lm import NLL_CHUNK
from pretrain.eval.ppl import bucket_edges, perplexity
from tokenizer import Tokenizer

from .conftest import tiny_model


def independent_ppl(model, docs: list[np.ndarray], length: int) -> float:
    """exp(mean NLL) over the first `length` targets of each document, via log_softmax + gather."""
    nlls = []
    for doc in docs:
        ids = torch.from_numpy(doc[:length + 1].astype(np.int64))[None]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)
        nlls.append(-log_probs[0].gather(1, ids[0, 1:, None]).squeeze(1))
    return math.exp(torch.cat(nlls).mean().item())


@pytest.mark.parametrize("arch", ["memmamba", "mamba2", "transformer"])
def test_ppl_equals_exp_mean_nll(arch):
    model = tiny_model(arch)
    rng = np.random.default_rng(0)
    # Lengths 20..150: only some documents reach each context length.
    docs = [rng.integers(0, 64, n) for n in (20, 150, 60, 90, 150, 40, 120)]
    result = perplexity(EvalLM(model), iter(docs), lengths=[32, 64, 100, 500], samples=3)

    for length in (32, 64, 100):
        chosen = [d for d in docs if len(d) >= length + 1][:3]
        entry = result[str(length)]
        assert entry["documents"] == len(chosen) and entry["tokens"] == len(chosen) * length
        assert entry["ppl"] == pytest.approx(independent_ppl(model, chosen, length), rel=1e-6)
        # Token-weighted buckets recombine to the overall NLL.
        nll_from_buckets = sum((b["end"] - b["start"]) * math.log(b["ppl"]) for b in entry["buckets"]) / length
        assert nll_from_buckets == pytest.approx(entry["nll"], rel=1e-9)
    assert result["100"]["documents"] == 3 and result["64"]["documents"] == 3
    assert result["500"] == {"documents": 0, "tokens": 0, "nll": None, "ppl": None, "buckets": []}
    assert 30 < result["64"]["ppl"] < 150  # an untrained 64-token model is near uniform (ppl ~ 64)


def test_nll_in_slices_equals_full_logits():
    """EvalLM.nll runs the LM head 1024 positions at a time; across slice boundaries it must equal
    cross-entropy on the model's full logits."""
    model = tiny_model("mamba2")
    ids = torch.randint(0, 64, (2, 2 * NLL_CHUNK + 6))
    with torch.no_grad():
        full = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    sliced = EvalLM(model).nll(ids)
    assert sliced.shape == (2, 2 * NLL_CHUNK + 5)
    torch.testing.assert_close(sliced.flatten(), full, rtol=1e-5, atol=1e-5)


def test_bucket_edges():
    assert bucket_edges(1024) == [0, 64, 128, 256, 512, 1024]
    assert bucket_edges(100) == [0, 64, 100]
    assert bucket_edges(48) == [0, 48]


def test_shards_and_text_source_give_the_same_documents(synthetic_data):
    """--data DATA_DIR (prepared shards) and --data synthetic:... (tokenized on the fly) agree."""
    tokenizer = Tokenizer(synthetic_data["tokenizer"])
    from_shards = list(documents(synthetic_data["data"], "validation"))
    from_text = list(documents("synthetic:docs=40,seed=7,words=1500", "validation", tokenizer))
    assert len(from_shards) == len(from_text) == 2
    for a, b in zip(from_shards, from_text):
        assert a.dtype == np.int64 and a[-1] == tokenizer.eod_id
        np.testing.assert_array_equal(a, b)
    expected_text = next(open_source("synthetic:docs=40,seed=7,words=1500").documents("validation"))
    assert tokenizer.decode(from_shards[0][:-1]) == expected_text


def test_bad_data_is_one_clear_error(synthetic_data, tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        next(documents(tmp_path, "validation"))
    with pytest.raises(ValueError, match="split 'dev' is absent"):
        next(documents(synthetic_data["data"], "dev"))
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        next(documents("synthetic:docs=4", "validation"))
