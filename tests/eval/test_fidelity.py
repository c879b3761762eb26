"""Memory-fidelity metrics: exact on toy models with known influence, windows inside one document,
bounded changes, bootstrap intervals, and a needle influence that tells a memory of salient notes
from a fading state."""

import random

import numpy as np
import pytest
import torch

from pretrain.eval import EvalLM, TaskSettings
from pretrain.eval.documents import document_windows
from pretrain.eval.fidelity import (NEEDLE_ROOM, bootstrap_means, bounded_change, distances_with_required, fidelity,
                                    needle_pair, percentile_interval, window_length)
from pretrain.eval.passkey import FILLER
from pretrain.eval.report import markdown_tables, scalars
from tokenizer import Tokenizer

from .conftest import DecayingMemory, NoteMemory, tiny_model

DISTANCES = [1, 2, 4, 8, 16, 32, 64]
EOD = 2


@pytest.fixture(scope="module")
def tokenizer(synthetic_data) -> Tokenizer:
    return Tokenizer(synthetic_data["tokenizer"])


def constant_docs(count: int, tokens: int) -> list[np.ndarray]:
    """Documents of token 0 only, each ending in the EOD id like documents.documents yields them."""
    return [np.append(np.zeros(tokens, dtype=np.int64), EOD) for _ in range(count)]


def analytic_influence(a: float, d: int, T: int) -> float:
    """Constant input 0...0 and one-hot embeddings: h = S e_0 with S = (1 - a^T) / (1 - a), and the
    replacement d back gives h' = (S - a^d) e_0 + a^d e_r, so ||h - h'|| = sqrt(2) a^d and
    b = sqrt(2) a^d / (S + sqrt((S - a^d)^2 + a^2d)) whatever replacement r is drawn."""
    S = (1 - a**T) / (1 - a)
    return np.sqrt(2) * a**d / (S + np.sqrt((S - a**d) ** 2 + a ** (2 * d)))


def test_toy_model_influence_is_analytic():
    decays = [0.95, 0.9, 0.7]
    T = window_length(DISTANCES)
    assert T == max(DISTANCES) + 1 + NEEDLE_ROOM
    result = fidelity(EvalLM(DecayingMemory(vocab_size=11, decays=decays)), constant_docs(3, T), DISTANCES,
                      d_stars=[16, 32], samples=3, seed=3)
    expected = np.array([[analytic_influence(a, d, T) for d in DISTANCES] for a in decays])
    # atol: the difference of two outputs of norm ~3 carries float64 round-off of ~1e-16 (0.7^64 ~ 1e-10)
    np.testing.assert_allclose(result["influence"], expected, rtol=1e-6, atol=1e-15)
    etmf = expected[-1] / expected[-1, 0]
    np.testing.assert_allclose(result["etmf"], etmf, rtol=1e-6, atol=1e-12)
    assert result["etmf_below"] == {"0.5": DISTANCES[np.argmax(etmf < 0.5)], "0.1": DISTANCES[np.argmax(etmf < 0.1)]}
    assert result["etmf_below"] == {"0.5": 4, "0.1": 8}  # about 0.7^(d - 1): 0.34 at d = 4, 0.08 at d = 8
    for d_star in (16, 32):
        column = expected[:, DISTANCES.index(d_star)]
        np.testing.assert_allclose(result["eclmf"][str(d_star)], column / column[0], rtol=1e-6)
    # Identical samples: every bootstrap resample has the same mean, the interval is the point.
    interval = np.array(result["influence_interval"])
    np.testing.assert_allclose(interval[..., 0], expected, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(interval[..., 1], expected, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(np.array(result["etmf_interval"]), np.stack([etmf, etmf], axis=1), rtol=1e-6, atol=1e-12)
    assert result["samples"] == 3 and result["samples_requested"] == 3 and result["d_stars"] == [16, 32]
    assert result["window"] == T and result["needle"] is None  # no tokenizer, no needle


def test_required_distances_are_added():
    assert distances_with_required([64, 4], d_stars=[32, 8]) == [1, 4, 8, 32, 64]
    with pytest.raises(ValueError, match="positive"):
        distances_with_required([0, 4], d_stars=[8])
    # Default d*: a quarter of the largest distance and the largest.
    assert TaskSettings(lengths=[256, 1024]).resolved_d_stars() == [128, 512]
    assert TaskSettings().resolved_d_stars() == [2048, 8192]
    assert TaskSettings(fidelity_distances=[1, 2], fidelity_d_stars=[300]).resolved_d_stars() == [300]


def test_windows_never_cross_a_document_boundary():
    """Documents of distinct random tokens: each window is the start of one document long enough,
    never holds an EOD, and shorter documents are skipped."""
    rng = np.random.default_rng(0)
    lengths = [50, 120, 30, 200, 121, 119]  # tokens before the EOD
    docs = [np.append(rng.integers(3, 16, n), EOD) for n in lengths]
    windows = document_windows(iter(docs), 120, count=10)
    assert len(windows) == 3  # the documents of 120, 200 and 121 tokens
    for window, doc in zip(windows, [docs[1], docs[3], docs[4]]):
        assert len(window) == 120 and EOD not in window
        np.testing.assert_array_equal(window, doc[:120])
    assert len(document_windows(iter(docs), 120, count=2)) == 2


class Recorder(DecayingMemory):
    """DecayingMemory that keeps every input row it is given."""

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size, decays=[0.5])
        self.rows: list[np.ndarray] = []

    def forward(self, ids, return_hidden_states: bool = False):
        self.rows += list(ids.numpy())
        return super().forward(ids, return_hidden_states)


def test_fidelity_reads_one_document_per_window_and_reports_the_count():
    """Every input the model sees is the start of one long-enough document, at most one token changed
    (a concatenation of documents would match none); fewer documents than requested are reported."""
    rng = np.random.default_rng(1)
    distances = [1, 4, 16]
    length = window_length(distances)
    docs = [np.append(rng.integers(3, 16, n), EOD) for n in (length - 1, length + 5, 10, length, 3 * length)]
    recorder = Recorder(vocab_size=16)
    result = fidelity(EvalLM(recorder), docs, distances, d_stars=[4], samples=8)
    assert result["samples"] == 3 and result["samples_requested"] == 8
    used = {1, 3, 4}
    seen = set()
    for row in recorder.rows:
        matches = [i for i, doc in enumerate(docs) if len(doc) > length and (row != doc[:length]).sum() <= 1]
        assert len(matches) == 1 and matches[0] in used
        seen.add(matches[0])
    assert seen == used and len(recorder.rows) == 3 * (1 + len(distances))


def test_bounded_change_lies_in_unit_interval():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 16, generator=generator) * torch.logspace(-6, 6, 1000).unsqueeze(1)
    b = torch.randn(1000, 16, generator=generator)
    values = bounded_change(a, b)
    assert ((values >= 0) & (values <= 1)).all()
    # Opposite vectors reach the bound (the unbounded ||h - h'|| / ||h|| would say 4 here); equal ones give 0.
    assert bounded_change(a[:3], -3 * a[:3]).tolist() == pytest.approx([1.0] * 3)
    assert bounded_change(a[:3], a[:3]).tolist() == [0.0] * 3
    assert bounded_change(torch.zeros(2, 4), torch.zeros(2, 4)).tolist() == [0.0, 0.0]


def test_real_model_influence_and_intervals_are_bounded():
    """A tiny MemMamba with large projections and memory fusion (so every path is visible at random init)."""
    model = tiny_model("memmamba", seed=2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("in_proj", "out_proj", "token_out", "layer_out")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    rng = np.random.default_rng(2)
    docs = [np.append(rng.integers(3, 64, 100), EOD) for _ in range(4)]
    result = fidelity(EvalLM(model), docs, [1, 8, 32], d_stars=[8], samples=4)
    influence, interval = np.array(result["influence"]), np.array(result["influence_interval"])
    assert ((influence > 0) & (influence <= 1)).all()
    assert ((interval >= 0) & (interval <= 1)).all()
    assert (interval[..., 0] <= influence + 1e-12).all() and (influence <= interval[..., 1] + 1e-12).all()


def test_bootstrap_interval_matches_the_normal_approximation():
    """For the mean of 400 draws the percentile bootstrap agrees with mean +- 1.96 sd / sqrt(n)."""
    values = np.random.default_rng(3).exponential(1.0, size=(400, 1, 1))
    lo, hi = percentile_interval(bootstrap_means(values, 4000, seed=0))[0][0]
    mean, half = values.mean(), 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert lo == pytest.approx(mean - half, abs=0.15 * half) and hi == pytest.approx(mean + half, abs=0.15 * half)


def test_plain_mamba2_influence_decreases_with_distance():
    """A tiny Mamba2 with large projections (so the SSM path is visible at random init): the last
    layer's influence falls by orders of magnitude from near to far tokens."""
    model = tiny_model("mamba2", seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "in_proj" in name or "out_proj" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    rng = np.random.default_rng(1)
    distances = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    docs = [np.append(rng.integers(0, 64, window_length(distances)), EOD) for _ in range(3)]
    result = fidelity(EvalLM(model), docs, distances, d_stars=[64], samples=3)
    last = np.array(result["influence"][-1])
    near, middle, far = last[:2].mean(), last[4:6].mean(), last[7:].mean()  # d 1-2, 16-32, 128-256
    assert near > 3 * middle > 0 and middle > 3 * far > 0
    assert result["etmf_below"]["0.5"] is not None and result["etmf_below"]["0.5"] <= 16
    assert len(result["eclmf"]["64"]) == 2 and result["eclmf"]["64"][0] == 1.0


def test_vanished_reference_influence_gives_undefined_ratios():
    """A layer blind to the past (decay 0) has I(d) = 0 for every d >= 1: ECLMF relative to it is
    undefined (None, never NaN or inf in results.json), and so is its interval."""
    result = fidelity(EvalLM(DecayingMemory(vocab_size=5, decays=[0.0, 0.5])), constant_docs(1, 80),
                      [1, 2, 4], d_stars=[4])
    assert result["eclmf"] == {"4": [None, None]} and result["eclmf_interval"] == {"4": [None, None]}
    assert None not in result["etmf"]
    assert "eclmf@4/layer1" not in scalars({"fidelity": result}) and "etmf@4" in scalars({"fidelity": result})


# ---- needle influence ----

def digit_tokens(tokenizer) -> list[int]:
    return [i for i in range(tokenizer.vocab_size) if any(c.isdigit() for c in tokenizer.decode([i]))]


def filler_docs(tokenizer, count: int, tokens: int) -> list[np.ndarray]:
    """Digit-free text (the passkey filler), shifted per document so that the windows differ."""
    text = np.asarray(tokenizer.encode(FILLER * (tokens // 10 + count)), dtype=np.int64)
    return [np.append(text[i:i + tokens], tokenizer.eod_id) for i in range(count)]


def last_state(x: np.ndarray, decay: float, salient: np.ndarray | None, vocab: int) -> np.ndarray:
    """The toy models' layer output at the last position, written out: sum_k decay^(T-1-k) e(x_k)
    (+ the count of each salient token)."""
    h = np.bincount(x, weights=decay ** np.arange(len(x))[::-1], minlength=vocab)
    if salient is not None:
        h += np.bincount(x, weights=np.isin(x, salient).astype(float), minlength=vocab)
    return h


def test_needle_pair_differs_only_in_the_key(tokenizer):
    rng = random.Random(0)
    for _ in range(5):
        a, b = needle_pair(tokenizer, rng)
        assert len(a) == len(b) <= NEEDLE_ROOM and (a != b).any()
        text_a, text_b = tokenizer.decode(a.tolist()), tokenizer.decode(b.tolist())
        assert text_a.startswith(" The pass key is ") and text_a.endswith(" is the pass key.")
        assert text_a.replace(text_a[17:22], text_b[17:22]) == text_b  # same sentence, other 5-digit key


@pytest.mark.parametrize("with_notes", [False, True])
def test_needle_influence_equals_direct_recomputation(tokenizer, with_notes):
    """The needle is written over the window so that its last token lies d before the last position,
    the keys are those of needle_pair's draws in window order, and the bounded change compares the two."""
    vocab, decays, distances = tokenizer.vocab_size, [0.9, 0.6], [1, 4, 16, 64]
    salient = np.array(digit_tokens(tokenizer)) if with_notes else None
    model = NoteMemory(vocab, decays, salient.tolist()) if with_notes else DecayingMemory(vocab, decays)
    length = window_length(distances)
    docs = filler_docs(tokenizer, 3, length + 5)
    result = fidelity(EvalLM(model), docs, distances, d_stars=[16], samples=3, tokenizer=tokenizer, seed=5)

    keys = random.Random(5)
    expected = np.zeros((len(decays), len(distances)))
    for doc in docs:
        window = doc[:length]
        needles = needle_pair(tokenizer, keys)
        for j, d in enumerate(distances):
            variants = []
            for needle in needles:
                x = window.copy()
                end = length - 1 - d  # the needle's last token
                x[end - len(needle) + 1:end + 1] = needle
                assert tokenizer.decode(x[:end + 1].tolist()).endswith(" is the pass key.")
                variants.append(x)
            for i, a in enumerate(decays):
                h_a, h_b = (last_state(x, a, salient, vocab) for x in variants)
                expected[i, j] += np.linalg.norm(h_a - h_b) / (np.linalg.norm(h_a) + np.linalg.norm(h_b)) / len(docs)
    np.testing.assert_allclose(result["needle"]["influence"], expected, rtol=1e-9)


def test_needle_fidelity_tells_a_note_memory_from_a_fading_state(tokenizer):
    """Same decay, one model also keeps notes of salient (digit) tokens. The random-token ETMF (a filler
    token replaced) fades alike for both, so it cannot tell them apart; the needle's key reaches the
    last position from any distance only through the notes."""
    vocab, distances = tokenizer.vocab_size, [1, 4, 16, 64, 256]
    docs = filler_docs(tokenizer, 4, window_length(distances))
    results = {}
    for name, model in (("fading", DecayingMemory(vocab, [0.9])),
                        ("notes", NoteMemory(vocab, [0.9], digit_tokens(tokenizer)))):
        results[name] = fidelity(EvalLM(model), docs, distances, d_stars=[16, 256], samples=4, tokenizer=tokenizer)
    fading, notes = results["fading"], results["notes"]
    assert fading["etmf_below"]["0.1"] is not None and notes["etmf_below"]["0.1"] is not None
    assert fading["needle"]["etmf_below"]["0.1"] is not None  # the key fades with the state
    assert notes["needle"]["etmf_below"] == {"0.5": None, "0.1": None}  # the notes keep it
    far = distances.index(256)
    assert notes["needle"]["influence"][-1][far] > 100 * fading["needle"]["influence"][-1][far]
    lo, hi = notes["needle"]["etmf_interval"][far]
    assert 0.5 < lo <= notes["needle"]["etmf"][far] <= hi

    flat = scalars({"fidelity": notes})
    assert flat["needle_etmf@256"] == notes["needle"]["etmf"][far] and "needle_etmf_below_0.5" not in flat
    table = markdown_tables({name: {"fidelity": r} for name, r in results.items()})
    assert "| notes | 4 of 4 |" in table and "| never | never |" in table
    assert f"| fading | 256 | {fading['influence'][-1][far]:.3g} [" in table
