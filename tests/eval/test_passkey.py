"""Passkey retrieval: the needle sits exactly once at the requested depth; a copying model scores
100 %, an untrained one about 0 %; Wilson intervals have their textbook values."""

import numpy as np
import pytest

from pretrain.eval import EvalLM
from pretrain.eval.passkey import (DESCRIPTION, FILLER, QUESTION, first_number, make_prompt, passkey_accuracy,
                                   wilson_interval)
from pretrain.eval.report import markdown_tables
from tokenizer import Tokenizer

from .conftest import InductionCopier, tiny_model


@pytest.fixture(scope="module")
def tokenizer(synthetic_data) -> Tokenizer:
    return Tokenizer(synthetic_data["tokenizer"])


def occurrences(haystack: np.ndarray, needle: np.ndarray) -> list[int]:
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return np.flatnonzero((windows == needle).all(axis=1)).tolist()


@pytest.mark.parametrize("length", [160, 333, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_once_at_requested_depth(tokenizer, length, depth):
    prompt = make_prompt(tokenizer, length, depth, key=48213)
    assert len(prompt.tokens) == length and prompt.tokens[0] == tokenizer.eod_id
    assert occurrences(prompt.tokens, prompt.needle_tokens) == [prompt.needle_start]

    unit = len(tokenizer.encode(FILLER))
    prefix = 1 + len(tokenizer.encode(DESCRIPTION))
    question = len(tokenizer.encode(QUESTION))
    filler = length - prefix - len(prompt.needle_tokens) - question
    # The needle starts within one filler group of depth * filler (groups are never split before it).
    assert abs((prompt.needle_start - prefix) - depth * filler) <= unit
    assert (prompt.needle_start - prefix) % unit == 0

    text = tokenizer.decode(prompt.tokens[1:])
    assert text.count("The pass key is 48213. Remember it. 48213 is the pass key.") == 1
    assert text.count("48213") == 2  # both inside the needle: the key is written nowhere else
    assert text.endswith("What is the pass key? The pass key is")


def test_too_short_length_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="passkey length 20: too short"):
        make_prompt(tokenizer, 20, 0.5, key=12345)
    with pytest.raises(ValueError, match="passkey depth"):
        make_prompt(tokenizer, 200, 1.5, key=12345)


def test_first_number():
    assert first_number(" 48213. Remember") == 48213
    assert first_number(" the key") is None


def test_wilson_interval_known_values():
    """Values of Wilson's score interval at 95% (z = 1.96), as tabulated e.g. by Newcombe (1998)."""
    assert wilson_interval(0, 20) == pytest.approx([0.0, 0.1611], abs=1e-4)
    assert wilson_interval(20, 20) == pytest.approx([0.8389, 1.0], abs=1e-4)
    assert wilson_interval(10, 20) == pytest.approx([0.2993, 0.7007], abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx([0.2553, 0.3662], abs=1e-4)  # Newcombe's example 81/263


@pytest.mark.parametrize("successes,trials", [(0, 1), (1, 7), (3, 20), (17, 20), (50, 100)])
def test_wilson_interval_solves_its_defining_equation(successes, trials):
    """The bounds are the p with (p_hat - p)^2 = z^2 p (1 - p) / n: the roots of a quadratic in p."""
    z, n, p_hat = 1.959963984540054, trials, successes / trials
    roots = np.sort(np.roots([1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat]).real)
    assert wilson_interval(successes, trials) == pytest.approx(roots.tolist(), abs=1e-12)
    with pytest.raises(ValueError, match="wilson_interval"):
        wilson_interval(trials + 1, trials)


def test_copying_model_scores_100_percent(tokenizer):
    copier = EvalLM(InductionCopier(tokenizer.vocab_size))
    result = passkey_accuracy(copier, tokenizer, lengths=[200, 400], depths=[0.0, 0.5, 1.0], trials=3, seed=1)
    assert set(result) == {"lengths", "depths", "trials", "accuracy", "mean", "answers", "interval", "mean_interval"}
    assert result["accuracy"] == [[1.0] * 3] * 2
    assert result["mean"] == {"200": 1.0, "400": 1.0}
    assert all(len(answers) == 3 for answers in result["answers"].values())
    assert result["interval"] == [[wilson_interval(3, 3)] * 3] * 2
    assert result["mean_interval"] == {"200": wilson_interval(9, 9), "400": wilson_interval(9, 9)}
    lower = round(100 * wilson_interval(9, 9)[0])  # 70
    assert f"| copier | 100% [{lower}-100] | 100% [{lower}-100] |" in markdown_tables({"copier": {"passkey": result}})


def test_untrained_model_scores_about_zero(tokenizer):
    """A random-init MemMamba decoded through its O(1) recurrent cache (prefill + step)."""
    lm = EvalLM(tiny_model("memmamba", vocab_size=tokenizer.vocab_size))
    result = passkey_accuracy(lm, tokenizer, lengths=[200], depths=[0.0, 0.5, 1.0], trials=4, seed=2)
    assert np.mean(result["accuracy"]) <= 0.05
    assert all(isinstance(text, str) and text for answers in result["answers"].values() for text in answers)
