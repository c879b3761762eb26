"""Memory-fidelity metrics: exact on a toy model with known influence; plain Mamba2 forgets with distance."""

import numpy as np
import pytest
import torch

from pretrain.eval import EvalLM
from pretrain.eval.fidelity import distances_with_required, fidelity
from pretrain.eval.report import scalars

from .conftest import DecayingMemory, tiny_model

DISTANCES = [1, 2, 4, 8, 16, 32, 64]


def test_toy_model_influence_is_analytic():
    """Constant input x = 0 0 ... 0 and one-hot embeddings: layer l at t = T-1 holds
    h = (1 - a^T) / (1 - a) e_0, and replacing the token d back changes it by a^d (e_r - e_0), so
    I_l(d) = sqrt(2) a_l^d (1 - a_l) / (1 - a_l^T) whatever replacement token is drawn."""
    decays = [0.95, 0.9, 0.7]
    samples = [np.zeros(65, dtype=np.int64)] * 3
    result = fidelity(EvalLM(DecayingMemory(vocab_size=11, decays=decays)), samples, DISTANCES, d_star=16, seed=3)
    T = 65
    expected = np.array([[np.sqrt(2) * a**d * (1 - a) / (1 - a**T) for d in DISTANCES] for a in decays])
    np.testing.assert_allclose(result["influence"], expected, rtol=1e-6)  # float64 round-off at 0.7^64
    np.testing.assert_allclose(result["etmf"], [0.7 ** (d - 1) for d in DISTANCES], rtol=1e-6)
    # 0.7^(d-1) drops below 0.5 first at d = 4 (0.343) and below 0.1 at d = 8 (0.082).
    assert result["etmf_below"] == {"0.5": 4, "0.1": 8}
    i16 = expected[:, DISTANCES.index(16)]
    np.testing.assert_allclose(result["eclmf"], i16 / i16[0], rtol=1e-6)
    assert result["samples"] == 3 and result["d_star"] == 16


def test_required_distances_are_added():
    assert distances_with_required([64, 4], d_star=32) == [1, 4, 32, 64]
    with pytest.raises(ValueError, match="positive"):
        distances_with_required([0, 4], d_star=8)


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
    samples = [rng.integers(0, 64, 257) for _ in range(3)]
    distances = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    result = fidelity(EvalLM(model), samples, distances, d_star=64)
    last = np.array(result["influence"][-1])
    near, middle, far = last[:2].mean(), last[4:6].mean(), last[7:].mean()  # d 1-2, 16-32, 128-256
    assert near > 3 * middle > 0 and middle > 3 * far > 0
    assert result["etmf_below"]["0.5"] is not None and result["etmf_below"]["0.5"] <= 16
    assert len(result["eclmf"]) == 2 and result["eclmf"][0] == 1.0


def test_vanished_reference_influence_gives_undefined_ratios():
    """A layer blind to the past (decay 0) has I(d) = 0 for every d >= 1: ETMF and ECLMF relative to
    it are undefined (None, never NaN or inf in results.json)."""
    result = fidelity(EvalLM(DecayingMemory(vocab_size=5, decays=[0.0, 0.5])), [np.zeros(9, dtype=np.int64)],
                      [1, 2, 4], d_star=4)
    assert result["eclmf"] == [None, None]
    assert result["etmf"] == pytest.approx([1.0, 0.5, 0.125])
    assert "eclmf/layer1" not in scalars({"fidelity": result})
